"""KV cache tiers benchmark: multi-turn chat with the engine's cache far smaller than the
conversations' histories.

    python -m cluster.bench.kv_tier [--quick] [--json]

An engine-level run (the engine driven in-process, as the model replica's core drives it;
the pool is real Ray store actors in their own processes, reached over Ray's object
transfer): `--conversations` chats share one system prompt; each turn's prompt is the whole
history (system prompt, every earlier user message and answer) plus a new user message.
Turns of different conversations interleave (the next turn goes to a random conversation
whose previous turn has ended), `--concurrency` requests at a time. The engine's cache holds
about a tenth of the working set (every conversation's final history), so a conversation's
history has left the device cache by the time it comes back. Three runs on the same
workload: tiers off; host tier (`--host-share` of the working set); host tier + pool (the
pool sized to hold the whole working set).

"Reusable" prompt tokens: the full blocks at the start of a prompt that an earlier request's
prompt + output already held (its history, and the system prompt after its first use), less
the prompt's last token (always computed: its logits give the first output token). Per run:
prefix_hit_rate (prompt tokens served from any cache or tier / prompt tokens),
reusable_served (tokens served from a cache or tier / reusable tokens),
prefill_tokens_computed, TTFT p50/p99, output tok/s, greedy_differs (greedy output other
than the tiers-off run's), requests_failed (an error; on the CPU in fp32 also a differing
output; in bf16 on a GPU not: see Chat), blocks restored per tier, and the fetch rule's
measurements. The default model shape (`--shape small`: 6 layers, 384 wide, synthetic
weights) computes slower than Ray returns its blocks; `--shape tiny` (the default
checkpoint's shape) computes a block faster than a Ray round trip: there the rule recomputes.

`--replicas 2`: engine core processes sharing the pool behind the load-aware router, with
and without the cluster index (cluster/bench/kv_routing.py) instead of the three runs.

`--served`: the three runs through the served path, over HTTP to a tandem app on a local
multi-node cluster, the pool's store on its Kunpeng node (cluster/bench/kv_tier_served.py).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {
    "tiny": dict(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=4),
    "small": dict(vocab_size=4096, hidden_size=384, intermediate_size=1024,
                  num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2),
}


# GPU runs: the engine benchmark's shape of Llama-3.1-8B, in bf16 (--device cuda)
GPU_SHAPES = ("llama3.1-8b",)


def shape_of(shape: str) -> dict:
    if shape in GPU_SHAPES:
        from cluster.bench.engine import PRESETS

        return PRESETS[shape]
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SHAPES[shape],
            "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "hidden_act": "silu",
            "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": "float32",
            "bos_token_id": 1, "eos_token_id": [2]}


def model_folder(shape: str, max_len: int) -> str:
    d = Path(tempfile.mkdtemp(prefix=f"kv-tier-{shape}-"))
    (d / "config.json").write_text(json.dumps({**shape_of(shape),
                                               "max_position_embeddings": max_len}))
    return str(d)


def workload(args) -> tuple[list[int], list[list[list[int]]]]:
    """The shared system prompt and each conversation's user messages."""
    rng = random.Random(args.seed)

    def text(n: int) -> list[int]:
        return [rng.randrange(3, 4096) for _ in range(n)]

    system = text(args.system_len)
    users = [[text(args.user_len) for _ in range(args.turns)]
             for _ in range(args.conversations)]
    return system, users


def chain(tokens: list[int], bs: int) -> list[bytes]:
    from cluster.prefix_hash import block_hash

    out, h = [], b""
    for i in range(len(tokens) // bs):
        h = block_hash(h, tokens[i * bs : (i + 1) * bs])
        out.append(h)
    return out


class Chat:
    """The multi-turn workload as it runs: which conversations may send their next turn,
    each one's history, the blocks earlier requests held (what makes a prompt's tokens
    reusable), and each request's figures, for either driver (one engine, or several
    behind the router: cluster/bench/kv_routing.py)."""

    def __init__(self, system, users, bs: int, seed: int, reference=None, exact=True):
        # exact (fp32): greedy text other than the reference run's is a failure; in bf16 a
        # prefix computed in other chunks differs in its last bits and near-tied picks of
        # random weights flip (the restored blocks themselves are bit-exact: the GPU tests),
        # so there it is counted apart (greedy_differs), and only errors fail
        self.users, self.bs, self.reference, self.exact = users, bs, reference, exact
        self.rng = random.Random(seed + 1)
        self.history = [list(system) for _ in users]
        self.turn = [0] * len(users)
        self.ready = set(range(len(users)))
        self.seen: set[bytes] = set()
        self.active: dict[str, tuple[int, float, list[int]]] = {}  # rid -> (conv, at, prompt)
        self.outs: dict[str, list[int]] = {}
        self.outputs: dict[str, list[int]] = {}
        self.ttfts: list[float] = []
        self.prompt_tok = self.cached = self.reusable = self.failed = self.out_tok = 0
        self.differs = 0

    def send(self) -> tuple[str, list[int]]:
        """The next turn of a conversation picked at random among the ready ones."""
        c = self.rng.choice(sorted(self.ready))
        self.ready.discard(c)
        prompt = self.history[c] + self.users[c][self.turn[c]]
        rid = f"c{c}-t{self.turn[c]}"
        hashes = chain(prompt, self.bs)[: (len(prompt) - 1) // self.bs]
        n = 0
        while n < len(hashes) and hashes[n] in self.seen:
            n += 1
        self.reusable += n * self.bs
        self.active[rid] = (c, time.perf_counter(), prompt)
        self.outs[rid] = []
        return rid, prompt

    def tokens(self, rid: str, ids: list[int], now: float) -> None:
        if ids and not self.outs[rid]:
            self.ttfts.append(now - self.active[rid][1])
        self.outs[rid] += ids

    def finish(self, rid: str, cached_tokens: int, error: bool) -> None:
        c, _, prompt = self.active.pop(rid)
        out = self.outs[rid]
        self.prompt_tok += len(prompt)
        self.cached += cached_tokens
        self.out_tok += len(out)
        self.outputs[rid] = out
        differs = not error and self.reference is not None and self.reference.get(rid) != out
        self.differs += differs
        if error or (differs and self.exact):
            self.failed += 1
        self.seen.update(chain(prompt + out[:-1], self.bs))  # the last token's KV: never made
        self.history[c] = prompt + out
        self.turn[c] += 1
        if self.turn[c] < len(self.users[c]):
            self.ready.add(c)

    def result(self, wall: float) -> dict:
        return {
            "prefix_hit_rate": round(self.cached / max(1, self.prompt_tok), 4),
            "reusable_tokens": self.reusable,
            "reusable_served": round(min(self.cached, self.reusable) / max(1, self.reusable),
                                     4),
            "prompt_tokens": self.prompt_tok,
            "prefill_tokens_computed": self.prompt_tok - self.cached,
            "ttft_ms_p50": round(float(np.percentile(self.ttfts, 50)) * 1000, 1),
            "ttft_ms_p99": round(float(np.percentile(self.ttfts, 99)) * 1000, 1),
            "output_tok_s": round(self.out_tok / wall, 1),
            "requests": len(self.outputs),
            "requests_failed": self.failed,
            "greedy_differs": self.differs,
            "wall_s": round(wall, 2)}


def run(args, model_dir: str, system, users, host_bytes: int, pool, reference=None) -> dict:
    from cluster.config import EngineConfig
    from cluster.engine.engine import LLMEngine
    from cluster.engine.sequence import SamplingParams
    from cluster.stack_sampler import start_from_env

    bs = args.block_size
    gpu = args.device == "cuda"
    cfg = EngineConfig(device=args.device, dtype="bfloat16" if gpu else "float32",
                       block_size=bs, num_kv_blocks=args.kv_blocks, max_model_len=args.max_len,
                       max_num_seqs=args.concurrency, max_num_batched_tokens=args.batched_tokens,
                       torch_threads=None if gpu else args.threads,
                       kv_host_tier_bytes=host_bytes, kv_cache_dtype=args.kv_cache_dtype)
    engine = LLMEngine(model_dir, cfg, weights="synthetic:0", kv_pool=pool)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    chat = Chat(system, users, bs, args.seed, reference, exact=not gpu)
    # with TANDEM_PROFILE_DIR set: the run's engine loop sampled into
    # <dir>/kv-tier-<run>-<pid>.raw (`cluster.bench.pyspy` reads it)
    sampler = start_from_env("kv-tier-" + ("pool" if pool is not None else
                                           "host" if host_bytes else "off"))
    t0 = time.perf_counter()
    while chat.ready or chat.active:
        while chat.ready and len(chat.active) < args.in_flight:
            rid, prompt = chat.send()
            engine.add_request(rid, prompt, params)
        for o in engine.step():
            chat.tokens(o.request_id, o.new_token_ids, time.perf_counter())
            if o.finish_reason is not None:
                chat.finish(o.request_id, o.num_cached_tokens, o.finish_reason == "error")
    wall = time.perf_counter() - t0
    if sampler is not None:
        sampler.stop()
    tier = engine.blocks.tier.stats() if engine.blocks.tier is not None else {}
    result = {
        **chat.result(wall),
        "preemptions": engine.scheduler.num_preemptions,  # their recompute is not counted
        "device_hit_blocks": engine.blocks.prefix_hits,
        "host_hit_blocks": tier.get("host_hits", 0),
        "pool_hit_blocks": tier.get("pool_hits", 0),
    }
    if tier:
        result |= {k: tier[k] for k in ("host_capacity_bytes", "fetch_decisions",
                                         "recompute_decisions", "torn", "pool_errors",
                                         "spills_dropped", "resends_skipped",
                                         "written_through", "transfer_blocks")}
        result["fetch_bw_mb_s"] = round(tier["fetch_bw_bytes_s"] / 1e6, 1)
        result["fetch_latency_ms"] = round(tier["fetch_latency_s"] * 1000, 2)
        result["prefill_tok_s"] = round(tier["prefill_tok_s"], 1)
    result["_outputs"] = chat.outputs
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.kv_tier", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="24 conversations of 4 turns")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=6)
    p.add_argument("--system-len", type=int, default=64)
    p.add_argument("--user-len", type=int, default=48)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--concurrency", type=int, default=2, help="the engine's batch "
                   "(max_num_seqs); its cache has room for that many of the longest prompts")
    p.add_argument("--in-flight", type=int, default=4, help="requests sent and not answered "
                   "(beyond the batch they queue in the engine)")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--kv-share", type=float, default=0.1,
                   help="the engine's device cache, as a share of the working set (at least "
                   "room for its batch's longest prompts)")
    p.add_argument("--host-share", type=float, default=0.125,
                   help="the host tier's size, as a share of the working set")
    p.add_argument("--shape", choices=sorted(SHAPES) + list(GPU_SHAPES), default="small",
                   help="llama3.1-8b: with --device cuda")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--batched-tokens", type=int, default=256,
                   help="the engine's max_num_batched_tokens (prefill chunk of a step)")
    p.add_argument("--no-pool", action="store_true", help="tiers off and host tier only")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the engine")
    p.add_argument("--replicas", type=int, default=1, help="2 or more: engine cores behind "
                   "the load-aware router, sharing the pool, `--in-flight` requests each; "
                   "two runs, the router counting local caches only and counting the "
                   "pool's blocks (cluster/bench/kv_routing.py)")
    p.add_argument("--prefix-margin", type=float, default=1.0, help="with --replicas")
    p.add_argument("--pool-block-weight", type=float, default=0.5, help="with --replicas")
    p.add_argument("--write-through-hits", type=int, default=None, metavar="N",
                   help="kv_pool.write_through_hits of the pool runs (default: write-back)")
    p.add_argument("--served", action="store_true", help="through the served path: HTTP to "
                   "an app on a local multi-node cluster (cluster/bench/kv_tier_served.py)")
    p.add_argument("--kv-cache-dtype", choices=["auto", "fp8"], default="auto",
                   help="fp8 (GPU): half the bytes a block, in the cache, the tiers and the link")
    p.add_argument("--transport", choices=["auto", "tcp", "ray"], default="auto",
                   help="kv_pool.transport: fetches by Mooncake's transfer engine where it "
                   "loads (auto: RDMA where it finds a device; tcp), or by Ray")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.conversations, args.turns = 24, 4

    import ray

    from cluster.kv_pool import PoolClient
    from cluster.kv_store import start_pool

    bs = args.block_size
    final = args.system_len + args.turns * (args.user_len + args.output_len)
    args.max_len = -(-final // bs) * bs + bs
    ws_blocks = args.conversations * -(-final // bs)
    # a tenth of the working set, but room for the running requests' longest prompts
    args.kv_blocks = max(int(args.kv_share * ws_blocks),
                         args.concurrency * args.max_len // bs + 1)
    model_dir = model_folder(args.shape, args.max_len)
    system, users = workload(args)

    if args.kv_cache_dtype != "auto" and (args.device != "cuda" or args.served
                                          or args.replicas > 1):
        p.error("--kv-cache-dtype fp8 is for the in-process GPU run")
    if (args.shape in GPU_SHAPES) != (args.device == "cuda"):
        p.error(f"--shape {args.shape} and --device {args.device} do not go together")
    a = shape_of(args.shape)
    head_dim = a["hidden_size"] // a["num_attention_heads"]
    # K and V of every layer, float32 (bf16 on the GPU, or fp8)
    dtype_bytes = 1 if args.kv_cache_dtype == "fp8" else 2 if args.device == "cuda" else 4
    block_bytes = 2 * a["num_hidden_layers"] * bs * a["num_key_value_heads"] * head_dim \
        * dtype_bytes
    host_bytes = int(args.host_share * ws_blocks) * block_bytes
    pool_bytes = max(1 << 20, 2 * ws_blocks * (block_bytes + 64))  # the whole working set
    if args.served:
        if args.device != "cpu" or args.replicas > 1:
            p.error("--served runs one CPU model replica")
        from cluster.bench import kv_tier_served

        runs = kv_tier_served.main(args, model_dir, system, users, host_bytes, pool_bytes)
        return report(args, runs, ws_blocks, host_bytes, block_bytes, 1 if "host_and_pool"
                      in runs else 0, None)

    # a Ray of its own ("local"), never another cluster running on this machine
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level="WARNING")
    if args.replicas > 1:
        return routed_main(args, model_dir, system, users, host_bytes, ws_blocks,
                           block_bytes)
    actors = [] if args.no_pool else start_pool(pool_bytes, {}, prefix="kv-tier-bench-",
                                                detached=False, transport=args.transport)
    ray.get([a.stats.remote() for a in actors])  # started before the clock runs
    runs, pool_stats = {}, []
    try:
        off = run(args, model_dir, system, users, 0, None)
        runs["tiers_off"] = off
        ref = off["_outputs"]
        runs["host_tier"] = run(args, model_dir, system, users, host_bytes, None, ref)
        if actors:
            client = PoolClient(actors, write_through_hits=args.write_through_hits,
                                transport=args.transport)
            client.wait_connected()  # before the clock runs
            runs["host_and_pool"] = run(args, model_dir, system, users, host_bytes, client,
                                        ref)
            pool_stats = ray.get([a.stats.remote() for a in actors])
    finally:
        for a in actors:
            ray.kill(a)
        ray.shutdown()
    for r in runs.values():
        r.pop("_outputs")
    return report(args, runs, ws_blocks, host_bytes, block_bytes, len(actors),
                  sum(s["blocks"] for s in pool_stats))


def report(args, runs: dict, ws_blocks: int, host_bytes: int, block_bytes: int, stores: int,
           pool_blocks: int | None) -> int:
    setup = {"shape": args.shape, "device": args.device, "served": args.served,
             "kv_cache_dtype": args.kv_cache_dtype,
             "conversations": args.conversations, "turns": args.turns,
             "concurrency": args.concurrency, "in_flight": args.in_flight,
             "block_size": args.block_size,
             "working_set_blocks": ws_blocks, "engine_kv_blocks": args.kv_blocks,
             "host_tier_blocks": host_bytes // block_bytes, "block_bytes": block_bytes,
             "pool_stores": stores, "pool_blocks_held": pool_blocks,
             "write_through_hits": args.write_through_hits, "transport": args.transport}
    off, pooled = runs["tiers_off"], runs.get("host_and_pool", runs["host_tier"])
    summary = {
        "prefill_computed_ratio": round(pooled["prefill_tokens_computed"] /
                                        max(1, off["prefill_tokens_computed"]), 3),
        "ttft_p50_change": round(pooled["ttft_ms_p50"] / max(1e-9, off["ttft_ms_p50"]) - 1,
                                 3)}
    out = {"setup": setup, "runs": runs, "summary": summary}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"setup: {setup}")
        keys = ("prefix_hit_rate", "reusable_served", "prefill_tokens_computed", "ttft_ms_p50",
                "ttft_ms_p99", "output_tok_s", "requests_failed", "host_hit_blocks",
                "pool_hit_blocks")
        print(f"{'run':16}" + "".join(f"{k:>24}" for k in keys))
        for name, r in runs.items():
            print(f"{name:16}" + "".join(f"{r.get(k, '-')!s:>24}" for k in keys))
        print(f"summary: {summary}")
    return 0


def routed_main(args, model_dir, system, users, host_bytes, ws_blocks, block_bytes) -> int:
    import ray

    from cluster.bench.kv_routing import compare

    if args.device != "cpu" or args.shape in GPU_SHAPES:
        raise SystemExit("--replicas runs CPU engine cores")
    args.in_flight *= args.replicas
    args.pool_bytes = max(1 << 20, 2 * ws_blocks * (block_bytes + 64))
    try:
        runs = compare(args, model_dir, system, users, host_bytes)
    finally:
        ray.shutdown()
    for r in runs.values():
        r.pop("_outputs")
    blind, indexed = runs.values()
    setup = {"shape": args.shape, "replicas": args.replicas, "conversations":
             args.conversations, "turns": args.turns, "concurrency": args.concurrency,
             "in_flight": args.in_flight, "block_size": args.block_size,
             "working_set_blocks": ws_blocks, "engine_kv_blocks": args.kv_blocks,
             "host_tier_blocks": host_bytes // block_bytes,
             "prefix_margin": args.prefix_margin, "pool_block_weight": args.pool_block_weight,
             "write_through_hits": args.write_through_hits}
    summary = {"ttft_p50_change": round(indexed["ttft_ms_p50"] / max(1e-9, blind["ttft_ms_p50"])
                                        - 1, 3),
               "ttft_p99_change": round(indexed["ttft_ms_p99"] / max(1e-9, blind["ttft_ms_p99"])
                                        - 1, 3),
               "prefill_computed_ratio": round(indexed["prefill_tokens_computed"] /
                                               max(1, blind["prefill_tokens_computed"]), 3)}
    report = {"setup": setup, "runs": runs, "summary": summary}
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"setup: {setup}")
        for name, r in runs.items():
            print(f"{name}: {r}")
        print(f"summary: {summary}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
