#!/usr/bin/env bash
# The GPU-run issue's runs on a lent H200, batched into one call per group (device time is
# short). Run from the project root on the device machine, with `.device` carried (the Ray
# bundle: `bash ../shared/device/make-ray-bundle.sh pyzmq msgpack llguidance py-spy` once):
#
#   bash infra/device/gpu-runs.sh suite steady engine     # the GPU suite, the engine alone
#   bash infra/device/gpu-runs.sh streams path profile    # the served path (profile: py-spy)
#   bash infra/device/gpu-runs.sh idle idle8b surface     # GPU idle at batch 64; mixed load
#   bash infra/device/gpu-runs.sh deepseek                # its kernels' tests; v2-lite speed
#   bash infra/device/gpu-runs.sh kvtier kvlong kvlink    # the KV tiers' GPU tests; 8B chat
#   bash infra/device/gpu-runs.sh kvray kvfp8             # the 8B chat fetching by Ray; fp8 KV
# (the pool fetches by the transfer engine where the bundle has it: add-transfer-engine.sh)
#
# Every stage writes its log and --json under $OUT (default ./out) and a line to
# $OUT/summary.txt; a failing stage does not stop the next one.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT" /tmp/site
if [ ! -d /tmp/site/ray ]; then
  tar -C /tmp/site -xJf .device/ray-bundle.tar.xz
  mkdir -p /tmp/site/ray/dashboard/client/build/static
fi
export PYTHONPATH=/tmp/site:$PWD PATH=/tmp/site/bin:$PATH
# the transfer engine's system libraries, where the bundle has them (add-transfer-engine.sh):
# after the image's own
if [ -d /tmp/site/mooncake_sys ]; then
  export LD_LIBRARY_PATH=${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}/tmp/site/mooncake_sys
fi
PY=python3
commit=${COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
echo "commit $commit $(date -u +%FT%TZ) $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)" \
  >> "$OUT/summary.txt"

stage() {  # stage NAME CMD...: runs CMD, its output to $OUT/NAME.log, status to the summary
  local name=$1; shift
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - t0))s: $(tail -n 1 "$OUT/$name.log" | cut -c1-300)" >> "$OUT/summary.txt"
}

model_05b=$HOME/.cache/tandem/models/tandem-0.5b
serve_up() {
  [ -d "$model_05b" ] || $PY -m cluster.cli model init --shape qwen2.5-0.5b --out "$model_05b"
  $PY -m cluster.cli up --config deployments/gpu.yaml --model-gpus 1 --detach
}

for what in "$@"; do
  case $what in
    suite)
      stage suite $PY -m pytest -m gpu tests/gpu -q -p no:cacheprovider --timeout 900 ;;
    steady)
      stage steady-t1 $PY -m cluster.bench.steady --json
      stage steady-greedy $PY -m cluster.bench.steady --temperature 0 --json ;;
    engine)
      stage batch1 $PY -m cluster.bench.engine --batch1 --baseline-prompts 0 --check-prompts 0 --json
      stage 8b-bf16 $PY -m cluster.bench.engine --preset llama3.1-8b --num-prompts 1000 \
        --output-len 32 512 --temperature 1 --baseline-prompts 0 --check-prompts 0 --json
      stage 8b-fp8-kv $PY -m cluster.bench.engine --preset llama3.1-8b --num-prompts 1000 \
        --output-len 32 512 --temperature 1 --baseline-prompts 0 --check-prompts 0 \
        --quantization fp8 --kv-cache-dtype fp8 --json ;;
    deepseek)  # the fused MoE and MLA decode kernels against the PyTorch paths, then speed
      stage deepseek-tests $PY -m pytest -m gpu tests/gpu/test_triton_moe.py \
        tests/gpu/test_triton_mla.py tests/gpu/test_deepseek_gpu.py -q -p no:cacheprovider
      stage v2lite-kernels timeout 130 $PY -m cluster.bench.engine --preset deepseek-v2-lite \
        --baseline-prompts 0 --check-prompts 0 --json
      # the PyTorch paths beside the kernels on a shorter run (their eager MoE is slow)
      for how in kernels torch; do
        stage v2lite-short-$how timeout 80 $PY -m cluster.bench.engine \
          --preset deepseek-v2-lite --num-prompts 64 --input-len 100 512 --output-len 64 64 \
          --baseline-prompts 0 --check-prompts 0 --json \
          $([ $how = torch ] && echo --no-deepseek-kernels)
      done ;;
    kvtier)  # host tier and pool on the GPU: bit-exact restores, then the 8B-shape chat
      stage kvtier-tests $PY -m pytest -m gpu tests/gpu/test_kv_tier_gpu.py -q -p no:cacheprovider
      # 160 conversations: the engine's cache (room for its batch of 16) is a tenth of them
      stage kvtier-8b $PY -m cluster.bench.kv_tier --device cuda --shape llama3.1-8b \
        --conversations 160 --turns 4 --system-len 512 --user-len 128 --output-len 32 \
        --concurrency 16 --in-flight 32 --batched-tokens 2048 --json
      ;;
    kvlong)  # long histories (2,048 tokens at the 6th turn), the cache again a tenth of them
      stage kvtier-8b-long $PY -m cluster.bench.kv_tier --device cuda --shape llama3.1-8b \
        --conversations 96 --turns 6 --system-len 128 --user-len 256 --output-len 32 \
        --concurrency 8 --in-flight 16 --batched-tokens 2048 --json ;;
    kvray)  # the 160-chat run with the pool's fetches by Ray, not the transfer engine
      stage kvtier-8b-ray $PY -m cluster.bench.kv_tier --device cuda --shape llama3.1-8b \
        --conversations 160 --turns 4 --system-len 512 --user-len 128 --output-len 32 \
        --concurrency 16 --in-flight 32 --batched-tokens 2048 --transport ray --json ;;
    kvfp8)  # the 160-chat run with an fp8 KV cache: 1 MiB blocks in every tier and the link
      stage kvtier-8b-fp8 $PY -m cluster.bench.kv_tier --device cuda --shape llama3.1-8b \
        --conversations 160 --turns 4 --system-len 512 --user-len 128 --output-len 32 \
        --concurrency 16 --in-flight 32 --batched-tokens 2048 --kv-cache-dtype fp8 --json ;;
    kvlink)  # a pool fetch of the 8B shape's blocks (2 MiB) between two Ray nodes of the host
      stage kvlink $PY -m cluster.bench.kv_link --blocks 1 8 32 --block-bytes 2097152 \
        --repeat 20 --json
      # striped over two stores (two Kunpeng nodes), as an engine's fetch is
      stage kvlink-2 $PY -m cluster.bench.kv_link --blocks 8 32 64 --block-bytes 2097152 \
        --repeat 20 --stores 2 --json ;;
    kvprofile)  # the 8B chat with the pool, its engine loop sampled per run (half the size)
      TANDEM_PROFILE_DIR=$OUT/kvprof stage kvprofile $PY -m cluster.bench.kv_tier \
        --device cuda --shape llama3.1-8b --conversations 80 --turns 4 --system-len 512 \
        --user-len 128 --output-len 32 --concurrency 8 --in-flight 16 --batched-tokens 2048 --json
      for run in host pool; do
        $PY -c "import json, sys; from pathlib import Path; from cluster.bench.pyspy import summarize
print(json.dumps(summarize(Path(sys.argv[1]), top=25)))" "$OUT"/kvprof/kv-tier-$run-*.raw \
          > "$OUT/kvprof-$run.json" 2>&1
      done ;;
    idle)  # GPU idle between decode steps at batch 64, 0.5B shape, sampled and greedy
      stage idle-05b-t1 $PY -m cluster.bench.engine --num-prompts 256 --temperature 1 \
        --baseline-prompts 0 --check-prompts 0 --host-profile --json
      stage idle-05b-greedy $PY -m cluster.bench.engine --num-prompts 256 --temperature 0 \
        --baseline-prompts 0 --check-prompts 0 --host-profile --json ;;
    idle8b)  # the same at temperature 1 on the 8B shape (a short timed run before it)
      stage idle-8b-t1 $PY -m cluster.bench.engine --preset llama3.1-8b --num-prompts 128 \
        --input-len 100 512 --output-len 64 128 --temperature 1 \
        --baseline-prompts 0 --check-prompts 0 --host-profile --json ;;
    surface)  # structured outputs, logprobs and penalties in one request of four vs plain
      stage up serve_up
      stage surface $PY -m cluster.bench.surface --config deployments/gpu.yaml \
        --url http://127.0.0.1:8000 --concurrency 256 \
        --num-prompts 2048 --input-len 128 --output-len 128 --json
      $PY -m cluster.cli stop > "$OUT/stop.log" 2>&1 ;;
    streams)
      stage up serve_up
      stage streams $PY -m cluster.bench.serve --model tandem-0.5b --concurrency 1000 \
        --num-requests 3000 --input-len 64 256 --output-len 32 128 --slo-ttft-ms 200 \
        --ray-metrics --json
      $PY -m cluster.cli stop > "$OUT/stop.log" 2>&1 ;;
    path)
      [ -d "$model_05b" ] || $PY -m cluster.cli model init --shape qwen2.5-0.5b --out "$model_05b"
      stage path $PY -m cluster.bench.path --config deployments/gpu.yaml --model-gpus 1 \
        --concurrency 256 --num-prompts 1024 --input-len 128 --output-len 128 --json ;;
    profile)  # bench.path at c=256, longer, the engine loops sampled from inside (no ptrace here)
      [ -d "$model_05b" ] || $PY -m cluster.cli model init --shape qwen2.5-0.5b --out "$model_05b"
      stage profile $PY -m cluster.bench.path --config deployments/gpu.yaml --model-gpus 1 \
        --concurrency 256 --num-prompts 4096 --input-len 128 --output-len 128 \
        --profile-dir "$OUT/profiles" --json ;;
    *) echo "unknown stage $what" >> "$OUT/summary.txt" ;;
  esac
done
cat "$OUT/summary.txt"
