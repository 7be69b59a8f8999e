"""Decode attention kernel alone: time and effective K/V bandwidth at a batch shape, and a
sweep of its tile settings (GPU). Context lengths are uniform in a range; blocks scattered.

    python -m cluster.bench.attention                      # Llama-3.1-8B shape, batch 256
    python -m cluster.bench.attention --heads 14 --kv-heads 2 --head-dim 64 --batch 1 \\
        --ctx 128 384 --sweep
"""

from __future__ import annotations

import argparse
import itertools

import torch

from cluster.bench.progress import progress

PAGE = 16


def inputs(args):
    g = torch.Generator(device="cuda").manual_seed(0)
    ctx = torch.randint(args.ctx[0], args.ctx[1] + 1, (args.batch,), generator=g, device="cuda")
    blocks = int((ctx + PAGE - 1).div(PAGE, rounding_mode="floor").sum()) + 8
    shape = (blocks, PAGE, args.kv_heads, args.head_dim)
    kc = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    vc = torch.randn(shape, device="cuda", generator=g).to(torch.bfloat16)
    perm = torch.randperm(blocks, device="cuda", generator=g)
    tables = torch.zeros(args.batch, -(-args.max_model_len // PAGE), dtype=torch.int32,
                         device="cuda")
    used = 0
    for b, c in enumerate(ctx.tolist()):
        n = -(-c // PAGE)
        tables[b, :n] = perm[used : used + n]
        used += n
    q = torch.randn(args.batch, args.heads, args.head_dim, device="cuda", generator=g)
    kv_bytes = int(ctx.sum()) * args.kv_heads * args.head_dim * 2 * 2  # K and V, bf16
    return q.to(torch.bfloat16), kc, vc, tables, ctx.int(), kv_bytes


def main(argv=None) -> None:
    from triton.testing import do_bench_cudagraph

    from cluster.engine.triton_attention import paged_decode_attention

    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--ctx", type=int, nargs=2, default=[300, 1200])
    ap.add_argument("--max-model-len", type=int, default=4096)
    ap.add_argument("--sweep", action="store_true", help="tile size x warps x stages x splits")
    args = ap.parse_args(argv)
    q, kc, vc, tables, ctx, kv_bytes = inputs(args)
    scale = args.head_dim ** -0.5

    def timed(**kw) -> float:
        return do_bench_cudagraph(lambda: paged_decode_attention(q, kc, vc, tables, ctx, scale,
                                                                 **kw), rep=20) / 1e3

    base = timed()
    print(f"default: {base * 1e6:.1f} us, {kv_bytes / base / 1e12:.2f} TB/s of K/V "
          f"({kv_bytes / 2**20:.0f} MiB)")
    if args.sweep:
        rows = []
        grid = list(itertools.product((16, 32, 64, 128), (2, 4, 8), (1, 2, 3),
                                      (1, 2, 4, 8, 16)))
        for bn, warps, stages, splits in progress(grid, desc="tile sweep", unit="config"):
            t = timed(block_n=bn, num_warps=warps, num_stages=stages, num_splits=splits)
            rows.append((t, bn, warps, stages, splits))
        for t, bn, warps, stages, splits in sorted(rows)[:8]:
            print(f"  {t * 1e6:8.1f} us {kv_bytes / t / 1e12:5.2f} TB/s  block_n {bn} "
                  f"warps {warps} stages {stages} splits {splits}")


if __name__ == "__main__":
    main()
