"""A CPU decode step's projections alone: the model's GEMMs of one step (every layer's
qkv, o, gate_up and down, and the lm_head) through each way of multiplying an fp32 weight,
on the given threads. Weights are distinct tensors per layer, as in the model, so they
stream from cache as a step does.

    python -m cluster.bench.projections [--model DIR] [--rows 16 32 64] [--threads 1] [--json]

Paths: `F.linear` on the plain [out, in] weight, and the two layouts `model.Linear` chooses
between per shape (cluster/engine/cpu_linear.py): `sgemm`, torch.mm on the weight stored
transposed ([in, out] contiguous); `onednn`, the weight reordered once into oneDNN's
blocked layout (`mkldnn._linear_pointwise`, rows padded as the engine pads them).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from cluster.engine import cpu_linear


def step_shapes(config: dict) -> list[tuple[int, int]]:
    """(in, out) of every projection of one decode step, in order."""
    h, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config.get("num_key_value_heads")
    hd = config.get("head_dim") or h // heads
    layer = [(h, (heads + 2 * (kv or heads)) * hd), (heads * hd, h), (h, 2 * inter), (inter, h)]
    return layer * config["num_hidden_layers"] + [(h, config["vocab_size"])]


def timed(fn, reps: int) -> float:
    for _ in range(max(3, reps // 10)):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps


def paths(shapes: list[tuple[int, int]], rows: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, k, generator=g) for k, n in shapes]
    xs = [torch.randn(rows, k, generator=g) for k, _ in shapes]
    out = {"F.linear": lambda: [F.linear(x, w) for x, w in zip(xs, ws, strict=True)]}
    for layout in cpu_linear.LAYOUTS:
        if layout == "onednn" and not cpu_linear.onednn_available():
            continue
        packed = [cpu_linear.to_layout(w, layout) for w in ws]
        out[layout] = lambda packed=packed, layout=layout: [
            cpu_linear.matmul(x, p, layout, None) for x, p in zip(xs, packed, strict=True)]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint folder (default: the built-in model)")
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.model is None:
        from cluster.config import ModelConfig
        args.model = ModelConfig().path
    config = json.loads((Path(args.model) / "config.json").read_text())
    shapes = step_shapes(config)
    torch.set_num_threads(args.threads)
    flops_per_row = sum(2 * k * n for k, n in shapes)
    res = {"model": str(args.model), "projections": len(shapes), "threads": args.threads,
           "rows": {}}
    for rows in args.rows:
        res["rows"][rows] = {name: {"us": timed(fn, args.reps) * 1e6}
                             for name, fn in paths(shapes, rows).items()}
        for r in res["rows"][rows].values():
            r["gflops"] = flops_per_row * rows / r["us"] / 1e3
    if args.json:
        print(json.dumps(res, indent=1))
    else:
        print(f"{res['projections']} projections of one step, {args.model}, "
              f"{args.threads} thread(s)")
        for rows, by in res["rows"].items():
            print(f"  {rows:4d} rows: " + "  ".join(
                f"{name} {r['us']:,.0f} us ({r['gflops']:.0f} GFLOP/s)" for name, r in by.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
