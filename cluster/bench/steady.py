"""The engine alone in the steady state of a many-stream run: `--live` sequences in flight,
each one that finishes replaced by a new request at once, so steps mix prefill chunks with
decode rows as they do when served (the 1,000-stream run's shape by default).

    python -m cluster.bench.steady [--live 1000] [--temperature 1] [--profile] [--json]

Prints ms per step, output tok/s and how many steps replayed a mixed-step CUDA graph;
--profile adds the top CUDA kernels and host ops of 30 steps.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

import torch

from cluster.bench.engine import model_folder
from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.sequence import SamplingParams


class Steady:
    def __init__(self, engine: LLMEngine, args):
        self.engine, self.args = engine, args
        self.rng = random.Random(args.seed)
        self.n = 0

    def add(self) -> None:
        a, rng = self.args, self.rng
        top = min(self.engine.arch.vocab_size, 30000) - 10  # clear of special tokens
        prompt = [rng.randrange(10, top) for _ in range(rng.randint(*a.input_len))]
        params = SamplingParams(temperature=a.temperature, ignore_eos=True,
                                max_tokens=rng.randint(*a.output_len))
        self.engine.add_request(f"r{self.n}", prompt, params)
        self.n += 1

    def step(self) -> int:
        outs = self.engine.step()
        for o in outs:
            if o.finish_reason:
                self.add()
        return sum(len(o.new_token_ids) for o in outs)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cluster.bench.steady", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="qwen2.5-0.5b")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--live", type=int, default=1000)
    ap.add_argument("--input-len", type=int, nargs=2, default=[80, 330], help="tokens")
    ap.add_argument("--output-len", type=int, nargs=2, default=[32, 128])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096)
    ap.add_argument("--warmup-steps", type=int, default=150)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    dtype = "bfloat16" if args.device == "cuda" else "float32"
    engine = LLMEngine(model_folder(args.preset), EngineConfig(
        device=args.device, dtype=dtype, max_model_len=2048, max_num_seqs=max(args.live, 16),
        max_num_batched_tokens=args.max_num_batched_tokens,
        cuda_graphs=not args.no_cuda_graphs), weights="synthetic")
    run = Steady(engine, args)
    for _ in range(args.live):
        run.add()
    for _ in range(args.warmup_steps):
        run.step()
    mixed = engine.runner.mixed_graphs
    replays0 = mixed.replays if mixed else 0
    sync(args.device)
    t0 = time.perf_counter()
    tokens = sum(run.step() for _ in range(args.steps))
    sync(args.device)
    wall = time.perf_counter() - t0
    res = {"live": args.live, "temperature": args.temperature,
           "ms_per_step": wall / args.steps * 1000, "output_tok_s": tokens / wall,
           "mixed_graph_steps": (mixed.replays - replays0) if mixed else 0,
           "steps": args.steps}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"{args.live} live, temperature {args.temperature}: "
              f"{res['ms_per_step']:.2f} ms/step, {res['output_tok_s']:,.0f} out tok/s, "
              f"{res['mixed_graph_steps']} of {args.steps} steps in mixed graphs")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda"
                                         else [])
        with profile(activities=acts) as prof:
            for _ in range(30):
                run.step()
            sync(args.device)
        sort = "self_device_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=18), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
