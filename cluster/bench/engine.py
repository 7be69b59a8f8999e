"""Engine benchmark: our engine and Hugging Face transformers side by side, one process.

    python -m cluster.bench.engine --preset qwen2.5-0.5b --num-prompts 256 \\
        --input-len 100 1024 --output-len 100 1024 [--json]
    python -m cluster.bench.engine --preset llama3.1-8b --batch1      # 128 in, 256 out
    python -m cluster.bench.engine --device cpu --preset default       # CI-sized

Presets are model shapes with seeded random weights (speed does not depend on the values);
`default` is the built-in checkpoint; a folder path is any HF checkpoint. The same weights go
to both engines, so greedy outputs are compared: the run exits non-zero when they disagree.
The timed run then uses an engine built after transformers is freed (its own checkpoint, or
seeded random weights for a shape).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from cluster.bench.progress import progress
from cluster.config import DEFAULT_MODEL_DIR, EngineConfig
from cluster.deepseek_shapes import DEEPSEEK_SHAPES
from cluster.engine.engine import LLMEngine
from cluster.engine.sequence import SamplingParams

PRESETS = {
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 896,
        "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
        "num_key_value_heads": 2, "vocab_size": 151936, "max_position_embeddings": 32768,
        "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "tie_word_embeddings": True,
        "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "llama3.1-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
        "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        "hidden_act": "silu", "torch_dtype": "bfloat16"},
    **DEEPSEEK_SHAPES,  # deepseek-v2-lite, deepseek-v3-tiny
}


def model_folder(preset: str) -> str:
    if preset == "default":
        from cluster.model_init import build

        return str(build(DEFAULT_MODEL_DIR))
    if preset in PRESETS:
        d = Path(tempfile.mkdtemp(prefix=f"tandem-{preset}-"))
        (d / "config.json").write_text(json.dumps(PRESETS[preset]))
        return str(d)
    return preset


def workload(args, vocab: int) -> tuple[list[list[int]], list[int]]:
    rng = np.random.default_rng(args.seed)
    if args.batch1:
        return [rng.integers(0, vocab, 128).tolist()], [256]
    ins = rng.integers(args.input_len[0], args.input_len[1] + 1, args.num_prompts)
    outs = rng.integers(args.output_len[0], args.output_len[1] + 1, args.num_prompts)
    return [rng.integers(0, vocab, int(n)).tolist() for n in ins], [int(n) for n in outs]


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q)) * 1000 if xs else float("nan")


def run_engine(engine: LLMEngine, prompts, out_lens, temperature: float = 0.0) -> dict:
    sync = torch.cuda.synchronize if engine.device.type == "cuda" else (lambda: None)
    # warm-up: Triton compiles its prefill variants once
    engine.generate([prompts[0][:64]], SamplingParams(temperature=0, max_tokens=4,
                                                      ignore_eos=True))
    sync()
    start = time.perf_counter()
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    itl: list[float] = []
    for i, (p, n) in enumerate(zip(prompts, out_lens, strict=True)):
        engine.add_request(str(i), p, SamplingParams(temperature=temperature, max_tokens=n,
                                                     ignore_eos=True))
    produced = 0
    with progress(total=sum(out_lens), desc="engine", unit="tok") as bar:
        while engine.has_work():
            outs = engine.step()
            now = time.perf_counter()
            for o in outs:
                produced += len(o.new_token_ids)
                if o.request_id in first:
                    itl.append(now - last[o.request_id])
                else:
                    first[o.request_id] = now
                last[o.request_id] = now
            bar.update(produced - bar.n)  # tqdm redraws at most every 0.1 s: cheap per step
    sync()
    elapsed = time.perf_counter() - start
    ttft = [first[k] - start for k in first]
    total_in = sum(len(p) for p in prompts)
    s = engine.stats()
    return {"output_tok_s": produced / elapsed, "total_tok_s": (produced + total_in) / elapsed,
            "elapsed_s": elapsed, "output_tokens": produced,
            "ttft_ms_p50": pct(ttft, 50), "ttft_ms_p99": pct(ttft, 99),
            "itl_ms_p50": pct(itl, 50), "itl_ms_p99": pct(itl, 99), "steps": s.steps,
            "kv_blocks": s.kv_blocks_total, "preemptions": s.preemptions}


def _decode_profile(engine: LLMEngine, batch: int, steps: int, temperature: float = 0.0,
                    host_raw: Path | None = None, clock: bool = False):
    """Profiles `steps` pure decode steps at a batch size; returns (profiler, wall seconds).
    host_raw: instead of the CUDA profiler, the host loop's stacks sampled into that file
    (what the host does while the GPU idles: the sampler slows it, so never both at once).
    clock: no profiler; the engine's step clock holds only the measured steps' gaps."""
    from contextlib import nullcontext

    from torch.profiler import ProfilerActivity, profile

    from cluster.stack_sampler import StackSampler

    params = SamplingParams(temperature=temperature, max_tokens=steps + 20, ignore_eos=True)
    for i in range(batch):
        engine.add_request(f"prof-{i}", [1 + i % 100] * 32, params)
    while engine.scheduler.waiting or any(s.num_computed_tokens < s.num_prompt_tokens
                                          for s in engine.scheduler.running):
        engine.step()
    engine.step()
    torch.cuda.synchronize()
    sampler = None
    if host_raw is not None:
        sampler = StackSampler(host_raw, threading.get_ident(), interval_s=0.001).start()
    if clock:  # not the gap to the synchronize above
        engine.runner.clock.reset()
        engine.runner.clock.gaps.clear()
    plain = sampler or clock
    try:
        with nullcontext() if plain else profile(activities=[ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            torch.cuda.synchronize()
            wall = time.perf_counter() - t0
    finally:
        if sampler is not None:
            sampler.stop()
    for i in range(batch):
        engine.abort(f"prof-{i}")
    return prof, wall


def gpu_idle_fraction(engine: LLMEngine, batch: int, steps: int = 50,
                      temperature: float = 0.0) -> float:
    """GPU idle share of decode steps at a batch size: 1 - kernel time / wall time."""
    if engine.device.type != "cuda":
        return float("nan")
    prof, wall = _decode_profile(engine, batch, steps, temperature)
    busy = sum(e.self_device_time_total for e in prof.key_averages()) / 1e6
    return max(0.0, 1 - busy / wall)


def gap_idle_fraction(engine: LLMEngine, batch: int, steps: int = 200,
                      temperature: float = 0.0) -> float:
    """The engine's own measure of the same, with no profiler slowing the host: every gap
    between decode steps (CUDA events, the metric's clock measuring each step) summed over
    the wall time."""
    if engine.device.type != "cuda":
        return float("nan")
    clock = engine.runner.clock
    every, clock.every = clock.every, 1
    try:
        _, wall = _decode_profile(engine, batch, steps, temperature, clock=True)
        clock.collect()
        return sum(clock.gaps) / wall
    finally:
        clock.every = every


def host_profile(engine: LLMEngine, batch: int, steps: int = 200,
                 temperature: float = 0.0) -> dict:
    """Where the host loop's time goes in decode steps at a batch size (stack samples every
    ms; cluster.bench.pyspy's summary), and its ms per step while sampled."""
    from cluster.bench import pyspy

    raw = Path(tempfile.mkdtemp(prefix="tandem-host-")) / f"decode-{batch}.raw"
    _, wall = _decode_profile(engine, batch, steps, temperature, host_raw=raw)
    return {"batch": batch, "ms_per_step_sampled": 1000 * wall / steps,
            **pyspy.summarize(raw, top=25)}


def profile_decode(engine: LLMEngine, batch: int, steps: int = 20) -> None:
    prof, wall = _decode_profile(engine, batch, steps)
    print(f"decode batch {batch}: {wall / steps * 1000:.2f} ms/step", file=sys.stderr)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12),
          file=sys.stderr)


def run_hf(hf, device: str, prompts, out_lens) -> dict:
    from transformers import GenerationConfig

    gen = GenerationConfig(max_new_tokens=max(out_lens), do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    start = time.perf_counter()
    produced = 0
    try:
        res = hf.generate_batch(inputs=prompts, generation_config=gen, progress_bar=False)
        produced = sum(len(r.generated_tokens) for r in res.values())
        if not produced:  # its requests failed inside (DeepSeek's MLA has no paged cache there)
            raise RuntimeError("generate_batch produced no tokens")
        mode = "generate_batch (paged|sdpa)"
    except Exception as err:  # older transformers, or CPU: one generate per prompt
        mode = f"generate per prompt ({type(err).__name__} in generate_batch)"
        for p, n in progress(zip(prompts, out_lens, strict=True), total=len(prompts),
                             desc="transformers", unit="prompt"):
            ids = torch.tensor([p], device=device)
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, pad_token_id=0)
            produced += out.shape[1] - len(p)
    sync()
    elapsed = time.perf_counter() - start
    return {"output_tok_s": produced / elapsed, "elapsed_s": elapsed,
            "output_tokens": produced, "mode": mode, "num_prompts": len(prompts)}


def hf_greedy(hf, device: str, prompts, n: int) -> list[list[int]]:
    out = []
    for p in prompts:
        ids = torch.tensor([p], device=device)
        g = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                        min_new_tokens=n, do_sample=False, pad_token_id=0)
        out.append(g[0, len(p):].tolist())
    return out


@torch.inference_mode()
def greedy_gap(hf, device: str, prompt: list[int], got: list[int]) -> tuple[float, float]:
    """Largest (best logit - our token's logit) under transformers over the continuation,
    and the largest |logit| (the scale that bf16 rounding is relative to)."""
    ids = torch.tensor([prompt + got], device=device)
    logits = hf(ids).logits[0, len(prompt) - 1 : -1].float()
    ours = logits.gather(1, torch.tensor(got, device=device)[:, None]).squeeze(1)
    return float((logits.max(dim=1).values - ours).max()), float(logits.abs().max())


def allowed_gap(tol: float, scale: float) -> float:
    """tol, or 1% of the logit scale (about two bf16 steps there) when that is larger;
    0 stays 0 (fp32 must match exactly)."""
    return max(tol, 0.01 * scale) if tol else 0.0


def greedy_within(hf, device: str, prompt: list[int], got: list[int], tol: float) -> bool:
    """Teacher-forced check of a greedy continuation: at every step our token's logit under
    transformers is within `tol` of its best logit. Exact token equality is the wrong test in
    bf16 on random weights, whose near-flat logits let rounding flip picks between any two
    implementations; a real bug picks tokens far from the best."""
    gap, scale = greedy_gap(hf, device, prompt, got)
    return gap <= allowed_gap(tol, scale)


@torch.inference_mode()
def teacher_forced_logits(engine: LLMEngine, tokens: list[int]) -> torch.Tensor:
    """Our logits at every position of `tokens` (float32), in one prefill into KV blocks
    0..; so only on an idle engine without a prefix cache (whose blocks hold nothing)."""
    from cluster.engine.model_runner import StepInputs

    assert not engine.has_work() and not engine.cfg.enable_prefix_caching
    runner, n = engine.runner, len(tokens)
    blocks = list(range(-(-n // runner.block_size)))
    inp = StepInputs(list(tokens), list(range(n)), list(range(n)), [blocks], [0, n], [n], [0],
                     scored=[(0, 1, n - 1)])
    out = runner.execute(inp)  # the last position's row first, then positions 0..n-2
    return torch.cat([out[1:], out[:1]])


@torch.inference_mode()
def logit_error(ref, device: str, engine: LLMEngine, tokens: list[int]) -> float:
    """Relative L2 distance of our logits from the reference model's over `tokens`."""
    want = ref(torch.tensor([tokens], device=device)).logits[0].float()
    got = teacher_forced_logits(engine, tokens).to(want.device)
    return float((got - want).norm() / want.norm())


def _measure(engine: LLMEngine, prompts, out_lens, check) -> dict:
    got = engine.generate(check, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    return {"engine": run_engine(engine, prompts, out_lens), "check_tokens": got}


def _ready(engine: LLMEngine) -> bool:
    return True


def _ray_hosts(size: int, count: int, cfg: EngineConfig, folder: str, weights: str):
    """`count` engines of `size` GPUs each, every one in its own STRICT_PACK group."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from cluster.engine.tp_workers import EngineHost

    hosts, pgs = [], []
    for _ in range(count):
        pg = placement_group([{"GPU": 1, "CPU": 1}] * size, strategy="STRICT_PACK")
        ray.get(pg.ready())
        where = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0,
                                                 placement_group_capture_child_tasks=True)
        hosts.append(ray.remote(EngineHost).options(
            num_gpus=1, num_cpus=1, scheduling_strategy=where).remote(
                folder, cfg.model_copy(update={"tensor_parallel_size": size}).model_dump(),
                weights))
        pgs.append(pg)
    return hosts, pgs


def _free(hosts, pgs) -> None:
    import ray
    from ray.util.placement_group import remove_placement_group

    for h in hosts:
        ray.kill(h)
    for pg in pgs:
        remove_placement_group(pg)


def tp_main(args, cfg: EngineConfig, folder: str, prompts, out_lens) -> dict:
    """TP=N against TP=1 on the same synthetic weights, and (--dp) N data-parallel TP=1
    replicas sharing the prompts, each engine in Ray actors as in a Serve replica."""
    import ray

    ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False)
    weights = f"synthetic:{args.seed}"
    check = [p[:128] for p in prompts[: args.check_prompts]] or [prompts[0][:128]]
    res: dict = {}
    for size in (1, args.tp):
        hosts, pgs = _ray_hosts(size, 1, cfg, folder, weights)
        res[f"tp{size}"] = ray.get(hosts[0].run.remote(_measure, prompts, out_lens, check))
        _free(hosts, pgs)
    if args.dp:
        hosts, pgs = _ray_hosts(1, args.tp, cfg, folder, weights)
        ray.get([h.run.remote(_ready) for h in hosts])  # engines built before the clock starts
        t0 = time.perf_counter()
        parts = ray.get([h.run.remote(_measure, prompts[i :: args.tp], out_lens[i :: args.tp],
                                      check) for i, h in enumerate(hosts)])
        wall = time.perf_counter() - t0
        res[f"dp{args.tp}"] = {"engine": {"output_tok_s": sum(
            p["engine"]["output_tokens"] for p in parts) / wall, "elapsed_s": wall}}
        _free(hosts, pgs)
    a, b = res["tp1"]["check_tokens"], res[f"tp{args.tp}"]["check_tokens"]
    res["same_tokens_first_32"] = [x == y for x, y in zip(a, b, strict=True)]
    res["speedup"] = res[f"tp{args.tp}"]["engine"]["output_tok_s"] / \
        res["tp1"]["engine"]["output_tok_s"]
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-0.5b",
                    help="qwen2.5-0.5b | llama3.1-8b | deepseek-v2-lite | deepseek-v3-tiny | "
                    "default | a checkpoint folder")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--num-prompts", type=int, default=256)
    ap.add_argument("--input-len", type=int, nargs=2, default=[100, 1024])
    ap.add_argument("--output-len", type=int, nargs=2, default=[100, 1024])
    ap.add_argument("--batch1", action="store_true", help="one 128-token prompt, 256 out")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--baseline-prompts", type=int, default=16,
                    help="prompts given to the transformers baseline (0: skip it)")
    ap.add_argument("--check-prompts", type=int, default=4)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--no-deepseek-kernels", action="store_true",
                    help="DeepSeek shapes: the PyTorch MoE and MLA paths (engine."
                         "deepseek_kernels false)")
    ap.add_argument("--tp", type=int, default=1, help="compare TP=N with TP=1 (Ray actors)")
    ap.add_argument("--dp", action="store_true", help="with --tp N: also N TP=1 replicas")
    ap.add_argument("--quantization", choices=["int8", "fp8"], default=None,
                    help="engine.quantization (the check and errors are against fp32)")
    ap.add_argument("--quantize-lm-head", choices=["yes", "no"], default=None,
                    help="default: engine.quantize_lm_head's")
    ap.add_argument("--fp8-emulation", action="store_true", help="fp8 without FP8 matmuls")
    ap.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="of the timed run and the GPU-idle profile (unseeded, as OpenAI "
                    "traffic by default; the correctness check stays greedy)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--host-profile", action="store_true",
                    help="sample the host loop in batch-64 decode steps after the idle "
                         "measurement (where the host's time goes while the GPU idles)")
    ap.add_argument("--profile", action="store_true", help="top CUDA kernels of decode steps")
    args = ap.parse_args(argv)
    if args.device == "cpu" and args.preset != "default" and args.num_prompts == 256:
        print("hint: on a CPU use --preset default", file=sys.stderr)

    folder = model_folder(args.preset)
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    if args.tp > 1:
        cfg = EngineConfig(device=args.device, dtype=dtype_name,
                           max_model_len=args.max_model_len, max_num_seqs=args.max_num_seqs,
                           max_num_batched_tokens=args.max_num_batched_tokens,
                           cuda_graphs=not args.no_cuda_graphs,
                           deepseek_kernels=not args.no_deepseek_kernels)
        arch_vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
        prompts, out_lens = workload(args, arch_vocab)
        res = tp_main(args, cfg, folder, prompts, out_lens)
        for k in [k for k in res if k.startswith(("tp", "dp"))]:
            res[k].pop("check_tokens", None)
        print(json.dumps(res, indent=2))
        return 0
    dtype = getattr(torch, dtype_name)
    torch.manual_seed(args.seed)
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = AutoConfig.from_pretrained(folder)
    hf = None  # transformers' model: only for the baseline and the greedy check
    if args.baseline_prompts or args.check_prompts:
        if not any(Path(folder).glob("*.safetensors")):  # a shape only: seeded random weights
            with torch.device(args.device):
                hf = AutoModelForCausalLM.from_config(hf_cfg, dtype=dtype)
        else:
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(args.device)
        hf.eval()
    prompts, out_lens = workload(args, hf_cfg.vocab_size)
    result: dict = {"preset": args.preset, "device": args.device, "dtype": dtype_name,
                    "quantization": args.quantization,
                    "num_prompts": len(prompts),
                    "input_tokens": sum(map(len, prompts)), "output_len": args.output_len}

    if args.baseline_prompts:
        k = min(args.baseline_prompts, len(prompts))
        result["baseline"] = run_hf(hf, args.device, prompts[:k], out_lens[:k])
    check = [p[:256] for p in prompts[: args.check_prompts]]

    cfg = EngineConfig(device=args.device, dtype=dtype_name, max_model_len=args.max_model_len,
                       max_num_seqs=args.max_num_seqs,
                       max_num_batched_tokens=args.max_num_batched_tokens,
                       cuda_graphs=not args.no_cuda_graphs,
                       deepseek_kernels=not args.no_deepseek_kernels, torch_threads=None,
                       quantization=args.quantization, fp8_emulation=args.fp8_emulation,
                       kv_cache_dtype=args.kv_cache_dtype,
                       quantize_lm_head={"yes": True, "no": False}.get(args.quantize_lm_head))
    within: list[bool] = []
    if not check:  # a speed run: no fp32 copy of the model (a 31 GB bf16 one would not fit)
        del hf
    else:
        expected = hf_greedy(hf, args.device, check, 32)
        hf_check = hf
        # The check runs on an engine holding transformers' weights and a small KV cache. The
        # timed engine is built after transformers is freed, so that its KV cache is sized as in
        # a replica (an 8B model alive beside it would take 16 GB of it); a shape preset gets
        # seeded random weights there (speed does not depend on the values), a checkpoint its own.
        checker = LLMEngine(folder, cfg.model_copy(update={
            "num_kv_blocks": -(-args.max_model_len // cfg.block_size) + 64,
            "max_num_seqs": max(1, len(check)), "enable_prefix_caching": False}),
            weights=list(hf.state_dict().items()))
        del hf
        got = checker.generate(check, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
        matched = [g == e for g, e in zip(got, expected, strict=True)]
        # quantized: as bf16 (its rounding errors are of that order), judged in fp32 all the same
        exact = dtype_name == "float32" and not args.quantization and args.kv_cache_dtype == "auto"
        tol = 0.0 if exact else 0.1
        # Judged by the model in fp32: in bf16 our tokens must be within tol of its best logit,
        # or at worst as close as transformers' own bf16 tokens are (rounding over many layers
        # moves both implementations off the fp32 picks; a wrong kernel moves far more).
        ref = hf_check if dtype_name == "float32" else copy.deepcopy(hf_check).float()
        del hf_check
        gaps = [greedy_gap(ref, args.device, p, g) for p, g in zip(check, got, strict=True)]
        own = [0.0 if dtype_name == "float32" else greedy_gap(ref, args.device, p, e)[0]
               for p, e in zip(check, expected, strict=True)]
        # a failed request ends short: that is wrong however close its few tokens are
        within = [len(g) == 32 and gap <= max(allowed_gap(tol, scale), hf_gap)
                  for g, (gap, scale), hf_gap in zip(got, gaps, own, strict=True)]
        errors = [logit_error(ref, args.device, checker, p + g) for p, g in zip(check, got,
                                                                                 strict=True)]
        del ref, checker
    if args.device == "cuda":
        torch.cuda.empty_cache()
    checkpoint = any(Path(folder).glob("*.safetensors"))
    engine = LLMEngine(folder, cfg, weights=None if checkpoint else f"synthetic:{args.seed}")
    correct = all(within)
    result["engine"] = run_engine(engine, prompts, out_lens, args.temperature)
    correct = correct and result["engine"]["output_tokens"] == sum(out_lens)  # none failed
    batch = min(64, args.max_num_seqs)
    result["engine"]["gpu_idle_frac"] = gpu_idle_fraction(engine, batch,
                                                          temperature=args.temperature)
    result["engine"]["gpu_idle_gaps_frac"] = gap_idle_fraction(engine, batch,
                                                               temperature=args.temperature)
    if args.profile and args.device == "cuda":
        profile_decode(engine, 1)
        profile_decode(engine, 64)
    if args.host_profile and args.device == "cuda":
        result["engine"]["host_profile"] = host_profile(engine, min(64, args.max_num_seqs),
                                                        temperature=args.temperature)
    # --check-prompts 0: a speed run, nothing checked (not "correct")
    result["check"] = None if not check else {"prompts": len(check), "exact_32": sum(matched),
                       "within_tol": sum(within), "tol": tol,
                       "max_logit_gap": max(g for g, _ in gaps),
                       "transformers_max_logit_gap": max(own),
                       "logit_scale": max(s for _, s in gaps),
                       "logit_rel_err_vs_fp32": max(errors)}
    result["correct"] = correct if check else None
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        e, b = result["engine"], result.get("baseline")
        quantized = f", {args.quantization}" if args.quantization else ""
        print(f"{args.preset} on {args.device} ({dtype_name}{quantized}), {len(prompts)} "
              "prompts")
        print(f"  tandem engine   {e['output_tok_s']:10.1f} output tok/s  "
              f"{e['total_tok_s']:10.1f} total tok/s  TTFT p50 {e['ttft_ms_p50']:.1f} ms  "
              f"ITL p50 {e['itl_ms_p50']:.2f} ms p99 {e['itl_ms_p99']:.2f} ms  "
              f"KV blocks {e['kv_blocks']}  GPU idle {e['gpu_idle_frac']:.3f} (profiled), "
              f"{e['gpu_idle_gaps_frac']:.3f} (step gaps)")
        if b:
            print(f"  transformers    {b['output_tok_s']:10.1f} output tok/s  "
                  f"({b['mode']}, {b['num_prompts']} prompts)")
        print(f"  greedy check vs transformers: {result['check']} -> correct={correct}")
    return 0 if correct else 1


if __name__ == "__main__":
    sys.exit(main())
