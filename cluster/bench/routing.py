"""Routing benchmark: each policy, and Serve's own router, on uneven replicas.

    python -m cluster.bench.routing [--quick] [--json]

A local multi-node cluster (head, Kunpeng node, model node) runs three CPU model replicas of
the default model, one throttled (it sleeps after every engine step, so it runs at roughly
half speed). For each policy the app is redeployed and driven over HTTP with Poisson arrivals
at each request rate, on a workload of shared prefixes (12 long system prompts, many short
user turns) and one without. Each replica's KV cache holds about half of the system prompts,
as a real fleet's cache holds a fraction of its traffic's prefixes: a router that keeps each
prefix on one replica uses the fleet's whole cache. Printed per policy: output tok/s, TTFT
p50/p99, end-to-end p99, prefix-cache hit rate (cached prompt tokens / prompt tokens) and
requests per replica.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import numpy as np

from cluster.bench.progress import note, progress, stdout_to_stderr
from cluster.bench.serve import one, session

POLICIES = ["prefix_aware", "least_load", "power_of_two", "round_robin", "serve_default"]
SYSTEMS, SYSTEM_WORDS = 12, 120  # ~17 KV blocks of 16 tokens each
REPLICAS, KV_BLOCKS = 3, 112  # per replica: ~5 system prompts beside the running requests


def workloads(n: int, seed: int) -> dict[str, list[str]]:
    rng = random.Random(seed)
    words = ("data model token cache route serve replica batch node stream queue prefix "
             "latency memory kernel graph").split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    systems = [f"System {i}: " + text(SYSTEM_WORDS) for i in range(SYSTEMS)]
    return {"shared_prefix": [rng.choice(systems) + " User: " + text(8) for _ in range(n)],
            "no_prefix": [text(SYSTEM_WORDS + 8) for _ in range(n)], "systems": systems}


async def drive(url: str, prompts: list[str], rate: float, max_tokens: int, bar,
                seed: int = 0) -> dict:
    """Poisson arrivals at `rate` per second, each a streamed greedy completion."""
    results = []

    async def send(client, prompt: str) -> None:
        results.append(await one(client, url, "tandem-tiny", prompt, max_tokens, None,
                                 {"temperature": 0.0}))
        bar.update()

    rng = np.random.default_rng(seed)
    start = time.perf_counter()
    async with session(len(prompts), 300) as client:
        tasks = []
        for p in prompts:
            tasks.append(asyncio.create_task(send(client, p)))
            await asyncio.sleep(rng.exponential(1.0 / rate))
        await asyncio.gather(*tasks)
    wall = time.perf_counter() - start
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] or 0.0 for r in ok]
    return {"output_tok_s": sum(r["out"] for r in ok) / wall,
            "ttft_ms_p50": float(np.percentile(ttft, 50)) * 1e3,
            "ttft_ms_p99": float(np.percentile(ttft, 99)) * 1e3,
            "e2e_ms_p99": float(np.percentile([r["e2e"] for r in ok], 99)) * 1e3,
            "prefix_hit_rate": sum(r["cached"] for r in ok) / max(1, sum(r["prompt"]
                                                                       for r in ok)),
            "requests_failed": len(results) - len(ok)}


async def warm(url: str, prefixes: list[str] = ()) -> None:
    """Unmeasured requests, several per replica at once, before a policy's runs: a freshly
    deployed replica's first steps are slower, which would land in one policy's p99. Then
    `prefixes` (--warm-prefixes: each system prompt once, in turn, routed by the policy
    under test), so that the measured run starts from the caches of a fleet that has been
    serving them rather than from empty ones."""
    async with session(4 * REPLICAS, 120) as client:
        await asyncio.gather(*(one(client, url, "tandem-tiny", f"warm up {i} " * 20, 8, None,
                                   {"temperature": 0.0}) for i in range(4 * REPLICAS)))
        for p in prefixes:
            await one(client, url, "tandem-tiny", p + " User: hello", 1, None,
                      {"temperature": 0.0})


def replica_requests() -> dict[int, int]:
    """Requests each model replica has served so far, by replica rank."""
    from cluster.local_cluster import model_replica_stats

    return {s["rank"]: s["requests"] - s["moved"] for s in model_replica_stats("bench")}


def decision_time(n_replicas: int = 64, prompt_tokens: int = 2048, rounds: int = 2000) -> dict:
    """Microseconds per routing decision as the router makes it: loads of n replicas (each
    reporting a full prefix summary), the prompt's block hashes, then the policy's order."""
    from cluster.load import PREFIX_SUMMARY_BLOCKS, ReplicaLoad
    from cluster.prefix_hash import prompt_digests
    from cluster.router import make_policy, order_replicas

    rng = random.Random(0)
    now = time.time()
    prompt = [rng.randrange(32000) for _ in range(prompt_tokens)]
    shared = prompt_digests(prompt, 16)
    stats, prefixes = [], []
    for i in range(n_replicas):
        own = [rng.getrandbits(63) for _ in range(PREFIX_SUMMARY_BLOCKS - 64)]
        prefixes.append(frozenset(own + shared[: (i * 7) % len(shared)]))
        stats.append({"running": rng.randint(0, 64), "waiting": rng.randint(0, 32),
                      "waiting_tokens": rng.randint(0, 20000), "kv_used": rng.randint(0, 900),
                      "kv_total": 1000, "max_num_seqs": 64, "ts": now})
    out = {}
    for name in progress(POLICIES[:-1], desc="decision time", unit="policy"):
        policy = make_policy(name, 1.0)
        times = []
        for _ in range(rounds):
            t0 = time.perf_counter()
            loads = [ReplicaLoad.of(s, 0, p, 0.0) for s, p in zip(stats, prefixes, strict=True)]
            hashes = prompt_digests(prompt, 16) if name == "prefix_aware" else []
            order_replicas(policy, loads, hashes, 0.95, 4.0, 5.0)
            times.append(time.perf_counter() - t0)
        out[name] = {"us_p50": float(np.percentile(times, 50)) * 1e6,
                     "us_p99": float(np.percentile(times, 99)) * 1e6}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="one rate, fewer requests (<5 min)")
    ap.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0])
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--policies", nargs="+", default=POLICIES)
    ap.add_argument("--decision-time", type=int, metavar="N", default=None,
                    help="only time routing decisions over N synthetic replicas, then exit")
    ap.add_argument("--repeat", type=int, default=1,
                    help="runs of every policy (each with its own prompts and arrivals); "
                         "the summary gives the median and range")
    ap.add_argument("--warm-prefixes", action="store_true",
                    help="before each policy's runs, send every system prompt once through "
                         "it (measure from warm caches, not from empty ones)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.decision_time:
        res = decision_time(args.decision_time)
        if args.json:
            print(json.dumps(res, indent=2))
            return 0
        for name, r in res.items():
            print(f"{name:14s} {args.decision_time} replicas: p50 {r['us_p50']:7.1f} us, "
                  f"p99 {r['us_p99']:7.1f} us per decision")
        return 0
    if args.quick:
        args.rates, args.requests = [8.0], 45

    with stdout_to_stderr():  # Ray's processes print to stdout: keep it for --json
        results = run_all(args)
    out = summarize_repeats(results)
    for policy, r in out.items():
        vs = r.get("ttft_p99_vs_serve_default")
        note(f"{policy:14s} TTFT p99 median {r['ttft_ms_p99']:7.1f} ms (range "
             f"{r['ttft_ms_p99_range'][0]:.1f}-{r['ttft_ms_p99_range'][1]:.1f})"
             + (f"; against serve_default, paired per repeat: median {vs['median']:+.0%}, "
                f"range {vs['range'][0]:+.0%} to {vs['range'][1]:+.0%}" if vs else ""))
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


def run_all(args) -> dict[str, list]:
    """Every policy's runs on a local cluster of their own: policy -> one result per repeat."""
    from cluster import local_cluster

    # policy -> one result per repeat; each repeat draws its own prompts and arrivals, and
    # runs the policies in a rotated order, so that drift on a shared machine spreads evenly
    results: dict[str, list] = {p: [] for p in args.policies}
    bar = progress(total=args.repeat * len(args.policies) * 2 * len(args.rates)
                   * args.requests, unit="req")
    with local_cluster.serve_cluster(local_cluster.LocalClusterSpec(model_cpus=4)) as base:
        url = f"{base}/bench"
        try:
            for rep in range(args.repeat):
                runs = workloads(args.requests, rep)
                k = rep % len(args.policies)
                for policy in args.policies[k:] + args.policies[:k]:
                    results[policy].append(run_policy(policy, runs, args, url, bar, rep))
        finally:
            bar.close()
    return results

def run_policy(policy: str, runs: dict, args, url: str, bar, seed: int) -> dict:
    from ray import serve

    from cluster.config import parse_app_config
    from deployments.app import build

    cfg = parse_app_config({
        "engine": {"max_model_len": 512, "max_num_seqs": 16, "num_kv_blocks": KV_BLOCKS,
                   "max_num_batched_tokens": 512, "torch_threads": 1,
                   "slow_replica_ranks": [0], "slow_step_delay_s": 0.02},
        "model_pool": {"num_replicas": REPLICAS, "num_cpus": 1},
        "router": {"policy": policy, "stats_period_s": 0.5}})
    serve.run(build(cfg), name="bench", route_prefix="/bench")
    systems = runs["systems"]
    asyncio.run(warm(url, systems if args.warm_prefixes else ()))
    res = {}
    for wl, prompts in ((k, v) for k, v in runs.items() if k != "systems"):
        for rate in args.rates:
            bar.set_description(f"{policy} {wl} @{rate:g}")
            before = replica_requests()
            r = asyncio.run(drive(url, prompts, rate, args.max_tokens, bar, seed))
            after = replica_requests()
            r["requests_per_replica"] = sorted(
                (n - before.get(rank, 0) for rank, n in after.items()), reverse=True)
            res[f"{wl}@{rate:g}"] = r
            note(f"{policy:14s} {wl:14s} rate {rate:4g}: "
                 f"{r['output_tok_s']:7.1f} tok/s  TTFT p50 {r['ttft_ms_p50']:7.1f}"
                 f" p99 {r['ttft_ms_p99']:7.1f} ms  e2e p99 {r['e2e_ms_p99']:7.1f} ms"
                 f"  hit {r['prefix_hit_rate']:.2f}  per replica "
                 f"{r['requests_per_replica']}")
    serve.delete("bench")
    return summarize(res)


def summarize_repeats(results: dict[str, list[dict]]) -> dict:
    """Per policy: the median and range over repeats of the headline run's TTFT p99, and,
    where Serve's router ran too, each repeat's p99 against its p99 in the same repeat
    (-0.3: 30% lower), median and range; every repeat's figures under `repeats`."""
    out = {}
    base = results.get("serve_default")
    for policy, reps in results.items():
        p99 = [r["ttft_ms_p99"] for r in reps]
        row = {"ttft_ms_p99": float(np.median(p99)), "ttft_ms_p99_range": [min(p99), max(p99)],
               "e2e_ms_p99": float(np.median([r["e2e_ms_p99"] for r in reps])),
               "output_tok_s": float(np.median([r["output_tok_s"] for r in reps])),
               "repeats": reps}
        if base and policy != "serve_default":
            rel = [r["ttft_ms_p99"] / b["ttft_ms_p99"] - 1 for r, b in zip(reps, base,
                                                                           strict=True)]
            row["ttft_p99_vs_serve_default"] = {"median": float(np.median(rel)),
                                                "range": [min(rel), max(rel)]}
        out[policy] = row
    return out


def summarize(res: dict) -> dict:
    """One object per policy: the shared-prefix run at the highest rate, plus every run."""
    key = max((k for k in res if k.startswith("shared_prefix")), key=lambda k: float(
        k.split("@")[1]))
    return {**{k: res[key][k] for k in ("ttft_ms_p99", "e2e_ms_p99", "output_tok_s",
                                         "prefix_hit_rate", "requests_per_replica")},
            "runs": res}


if __name__ == "__main__":
    sys.exit(main())
