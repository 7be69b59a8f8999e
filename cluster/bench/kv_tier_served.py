"""The KV tiers benchmark through the served path (`python -m cluster.bench.kv_tier --served`).

The same multi-turn chat workload as the engine-level runs (cluster/bench/kv_tier.py: `Chat`),
sent over HTTP to a tandem app on a local multi-node cluster (head, Kunpeng node, model
node), as a client would: each turn a streamed `/v1/completions` request whose prompt is the
conversation's token ids, with `return_token_ids` so that the next turn extends the history
token-exact (retokenized text would break the cached prefix at the answer). One model
replica (a CPU engine: the benchmark's synthetic-weight checkpoint, written to disk and
loaded as any checkpoint is), redeployed for each run: tiers off, host tier, host tier +
the cluster pool (its store on the Kunpeng node, in the Kunpeng node's memory, reached over
Ray's object transfer). TTFT is the client's: from sending the request to the first token's
chunk, HTTP, the frontend's tokenizing and routing and the queue in the engine included.
Cached prompt tokens come from each answer's `usage.prompt_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from pathlib import Path

import httpx

from cluster.bench.path import cpu_seconds
from cluster.bench.progress import stdout_to_stderr

APP, PREFIX, MODEL = "kv-tier-bench", "/kv-tier-bench", "kv-tier-bench"


def served_model(model_dir: str) -> str:
    """The benchmark's checkpoint made servable: seeded weights on disk and the default
    model's tokenizer (the same vocabulary size), for the frontend's detokenizing."""
    from cluster.bench.kv_routing import write_checkpoint
    from cluster.config import DEFAULT_MODEL_DIR

    write_checkpoint(model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        src = Path(DEFAULT_MODEL_DIR) / name
        if src.exists():
            shutil.copy(src, Path(model_dir) / name)
    return model_dir


def app_config(args, model_dir: str, host_bytes: int, pool_bytes: int | None) -> dict:
    engine = {"max_model_len": args.max_len, "max_num_seqs": args.concurrency,
              "max_num_batched_tokens": args.batched_tokens, "num_kv_blocks": args.kv_blocks,
              "block_size": args.block_size, "torch_threads": args.threads,
              "dtype": "float32", "kv_host_tier_bytes": host_bytes}
    cfg = {"model": {"path": model_dir, "name": MODEL}, "engine": engine,
           "model_pool": {"num_replicas": 1, "num_cpus": 1},
           "router": {"stats_period_s": 0.5}}
    if pool_bytes is not None:
        cfg["kv_pool"] = {"capacity_bytes": pool_bytes,
                          "write_through_hits": args.write_through_hits,
                          "transport": args.transport}
    return cfg


async def one(client: httpx.AsyncClient, url: str, chat, rid: str, prompt: list[int],
              output_len: int) -> None:
    body = {"model": MODEL, "prompt": prompt, "max_tokens": output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}
    cached, error = 0, True
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as r:
            if r.status_code == 200:
                async for line in r.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    for c in event.get("choices", []):
                        chat.tokens(rid, c.get("token_ids") or [], time.perf_counter())
                    if event.get("usage"):
                        cached = event["usage"]["prompt_tokens_details"]["cached_tokens"]
                        error = False
    except httpx.HTTPError:
        error = True
    chat.finish(rid, cached, error)


async def drive(url: str, chat, in_flight: int, output_len: int) -> float:
    """Every turn of every conversation, `in_flight` requests at a time; the wall time."""
    t0 = time.perf_counter()
    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(
            max_connections=in_flight + 4)) as client:
        tasks: set[asyncio.Task] = set()
        while chat.ready or tasks:
            while chat.ready and len(tasks) < in_flight:
                rid, prompt = chat.send()
                tasks.add(asyncio.create_task(one(client, url, chat, rid, prompt,
                                                  output_len)))
            _, tasks = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    return time.perf_counter() - t0


def machine_cpu_s() -> tuple[float, int]:
    """(CPU seconds all cores spent busy since boot, the number of cores), from /proc/stat."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1


def cpu_roles() -> dict[str, list[int]]:
    """The engine core's and the pool stores' processes (the rest is Serve, Ray, client)."""
    import ray
    from ray.util.state import list_actors

    from cluster.local_cluster import model_replica_stats

    stores = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                         filters=[("class_name", "=", "KVPoolStore"), ("state", "=", "ALIVE")])
    return {"engine_core": [s["core_pid"] for s in model_replica_stats(APP)],
            "pool_stores": [a.pid for a in stores]}


def cpu_report(before: dict, after: dict, wall: float) -> dict:
    """Where the machine's CPU went during a run: a 2-core host running every process of
    the cluster is CPU-bound, and the pool's transfers cost CPU the engine then lacks."""
    (m0, cores), (m1, _) = before["machine"], after["machine"]
    out = {"cpu_busy": round((m1 - m0) / (wall * cores), 3)}
    for role, pids in after["roles"].items():
        out[f"{role}_cpu_s"] = round(sum(cpu_seconds(p) - before["pids"].get(p, 0.0)
                                         for p in pids), 2)
    out["other_cpu_s"] = round(m1 - m0 - sum(v for k, v in out.items()
                                              if k.endswith("_cpu_s")), 2)
    return out


def cpu_snapshot(roles: dict[str, list[int]]) -> dict:
    return {"machine": machine_cpu_s(), "roles": roles,
            "pids": {p: cpu_seconds(p) for pids in roles.values() for p in pids}}


def run(args, url: str, model_dir: str, system, users, host_bytes: int,
        pool_bytes: int | None, reference=None) -> dict:
    from ray import serve

    from cluster.bench.kv_routing import kill_stores
    from cluster.bench.kv_tier import Chat
    from cluster.config import parse_app_config
    from deployments.app import build

    serve.run(build(parse_app_config(app_config(args, model_dir, host_bytes, pool_bytes))),
              name=APP, route_prefix=PREFIX)
    try:
        # one unmeasured request: the replica's first steps are slower; its prompt shares
        # no block with the workload's (token ids the workload never draws)
        warm = Chat([0, 1, 2] * 8, [[[0] * 8]], args.block_size, 0)
        asyncio.run(drive(url, warm, 1, 4))
        chat = Chat(system, users, args.block_size, args.seed, reference)
        roles = cpu_roles()  # the stores are up: the core started them at its start
        before = cpu_snapshot(roles)
        wall = asyncio.run(drive(url, chat, args.in_flight, args.output_len))
        cpu = cpu_report(before, cpu_snapshot(roles), wall)
        time.sleep(1.0)  # the engine core's counters reach its replica twice a second
        tier = serve.get_deployment_handle("ModelReplica", APP).stats.remote().result()[
            "kv_tier"] or {}
    finally:
        serve.delete(APP)
        kill_stores()  # the pool's stores are detached actors: the next run starts empty
    result = chat.result(wall) | cpu
    if tier:  # the engine's own counts: blocks restored per tier, the fetch rule's inputs
        result |= {k: tier[k] for k in ("host_hits", "pool_hits", "fetch_decisions",
                                         "recompute_decisions", "torn", "pool_errors")}
        result["fetch_bw_mb_s"] = round(tier["fetch_bw_bytes_s"] / 1e6, 1)
        result["fetch_latency_ms"] = round(tier["fetch_latency_s"] * 1000, 2)
        result["prefill_tok_s"] = round(tier["prefill_tok_s"], 1)
    result["_outputs"] = chat.outputs
    return result


def main(args, model_dir: str, system, users, host_bytes: int, pool_bytes: int) -> dict:
    with stdout_to_stderr():  # Ray's processes print to stdout: keep it for --json
        return _runs(args, model_dir, system, users, host_bytes, pool_bytes)


def _runs(args, model_dir: str, system, users, host_bytes: int, pool_bytes: int) -> dict:
    from cluster import local_cluster

    served_model(model_dir)
    runs = {}
    with local_cluster.serve_cluster(local_cluster.LocalClusterSpec(model_cpus=2)) as base:
        url = f"{base}{PREFIX}"
        runs["tiers_off"] = run(args, url, model_dir, system, users, 0, None)
        ref = runs["tiers_off"]["_outputs"]
        runs["host_tier"] = run(args, url, model_dir, system, users, host_bytes, None, ref)
        if not args.no_pool:
            runs["host_and_pool"] = run(args, url, model_dir, system, users, host_bytes,
                                        pool_bytes, ref)
    for r in runs.values():
        r.pop("_outputs")
    return runs
