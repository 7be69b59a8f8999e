"""The data plane's cost: the engine offline against the whole served path, side by side.

    python -m cluster.bench.path --concurrency 16 --num-prompts 128 --input-len 128 \\
        --output-len 128 [--peer-url http://127.0.0.1:8001] [--url URL] [--json]

(1) The engine alone in this process, at most --concurrency requests in flight, the same
prompts (token ids) and engine settings as the served app. (2) The served path over HTTP:
a local cluster this command starts with the app of --config (one model replica unless
--replicas), or a running one at --url; the same prompts as token ids, streamed, with
ignore_eos, so both sides make exactly the same tokens. Prints output tok/s of each and
their ratio, TTFT / TPOT percentiles, CPU seconds per 1,000 streamed tokens of each process
role (Serve's proxy, frontend, model replica, engine core; local cluster only), and engine
messages and SSE events per token; --py-spy N adds where the engine core's and a frontend's
CPU goes (py-spy samples, top functions). --peer-url runs the same client and prompts against
another OpenAI-compatible server (vLLM's, say) on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import aiohttp
import httpx
import numpy as np

from cluster import stack_sampler
from cluster.bench import clients, pyspy
from cluster.bench.progress import progress, stdout_to_stderr
from cluster.bench.serve import one as serve_one
from cluster.bench.serve import pcts, session


def workload(n: int, in_len: int, out_len: int, vocab: int, seed: int) -> list[list[int]]:
    # random ids away from the special tokens at the top of the vocabulary
    rng = np.random.default_rng(seed)
    return [rng.integers(10, min(vocab, 32000) - 10, in_len).tolist() for _ in range(n)]


def offline(cfg, prompts: list[list[int]], out_len: int, concurrency: int,
            profile: bool = False, temperature: float = 0.0) -> dict:
    """The engine alone: requests admitted as others finish, at most `concurrency` at once.
    profile: sample the timed loop (stack_sampler, into $TANDEM_PROFILE_DIR)."""
    from cluster.engine.engine import LLMEngine
    from cluster.engine.sequence import SamplingParams

    engine = LLMEngine(cfg.model.path, cfg.engine)
    params = SamplingParams(temperature=temperature, max_tokens=out_len, ignore_eos=True)
    engine.generate([prompts[0][:16]], SamplingParams(temperature=0.0, max_tokens=4))  # warm
    queue = list(enumerate(prompts))
    first, last, tpot = {}, {}, []
    sampler = stack_sampler.start_from_env("offline") if profile else None
    start = time.perf_counter()
    produced, live = 0, 0
    with progress(total=len(prompts) * out_len, desc="engine offline", unit="tok") as bar:
        while queue or engine.has_work():
            while queue and live < concurrency:
                i, p = queue.pop(0)
                engine.add_request(str(i), p, params)
                first[str(i)] = None
                live += 1
            for o in engine.step():
                now = time.perf_counter()
                produced += len(o.new_token_ids)
                if first[o.request_id] is None and o.new_token_ids:
                    first[o.request_id] = now
                last[o.request_id] = now
                if o.finish_reason:
                    live -= 1
            bar.update(produced - bar.n)
    elapsed = time.perf_counter() - start
    for rid, t in first.items():
        if t is not None and rid in last and out_len > 1:
            tpot.append((last[rid] - t) / (out_len - 1))
    out = {"output_tok_s": produced / elapsed, "elapsed_s": elapsed, "tokens": produced,
           "tpot_ms": pcts(tpot)}
    if sampler is not None:
        sampler.stop()
        out["profile"] = pyspy.summarize(sampler.out)
    return out


async def one(client: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
              max_tokens: int, extra: dict | None = None) -> dict:
    r = await serve_one(client, url, model, prompt, max_tokens, None,
                        {"temperature": 0.0, **(extra or {})})
    out, ttft = r["out"], r["ttft"]
    r["tpot"] = (r["e2e"] - ttft) / (out - 1) if ttft is not None and out > 1 else None
    return r


# Streams per client process: at concurrency 256 on a GPU (2 ms a token) one process would
# have to parse ~120,000 SSE events a second; processes take at most half the host's cores,
# the other half being the served path's (cluster/bench/clients.py)
CLIENT_STREAMS = 32


def client_processes(concurrency: int) -> int:
    return clients.processes(concurrency, CLIENT_STREAMS, (os.cpu_count() or 2) // 2)


async def _drive(url: str, model: str, prompts, out_len: int, concurrency: int, desc: str,
                 extras: list[dict] | None, start_at: float | None = None,
                 position: int | None = None) -> tuple[list[dict], float, float]:
    """One client process's share: its requests, at most `concurrency` in flight; they start
    at `start_at` (the host's monotonic clock, which every process shares) when given."""
    async with session(concurrency, 600) as client:
        await one(client, url, model, prompts[0][:16], 4)  # warm: connections, caches
        return await clients.drive(
            lambda i: one(client, url, model, prompts[i], out_len,
                          extras[i] if extras else None),
            len(prompts), concurrency, start_at=start_at, desc=desc, position=position)


def _shard(*args) -> tuple[list[dict], float, float]:
    return asyncio.run(_drive(*args))


async def served(url: str, model: str, prompts, out_len: int, concurrency: int,
                 desc: str, extras: list[dict] | None = None,
                 processes: int | None = None) -> dict:
    """extras: request fields per prompt (None: plain greedy requests). processes: client
    processes (default: one per CLIENT_STREAMS streams); request i goes to process
    i % processes with its share of the concurrency."""
    n = processes or client_processes(concurrency)
    if n <= 1:
        results, start, end = await _drive(url, model, prompts, out_len, concurrency, desc,
                                           extras)
    else:
        shards = await clients.in_processes(_shard, n, lambda i, start_at: (
            url, model, prompts[i::n], out_len, -(-concurrency // n), f"{desc} {i}",
            extras[i::n] if extras else None, start_at, i))
        results = [r for shard in shards for r in shard[0]]
        start, end = min(sh[1] for sh in shards), max(sh[2] for sh in shards)
    elapsed = end - start
    tokens = sum(r["out"] for r in results)
    return {"output_tok_s": tokens / elapsed, "elapsed_s": elapsed, "tokens": tokens,
            "errors": sum(1 for r in results if r["error"]),
            "first_error": next((r["error"] for r in results if r["error"]), None),
            "ttft_ms": pcts([r["ttft"] for r in results if r["ttft"] is not None]),
            "tpot_ms": pcts([r["tpot"] for r in results if r["tpot"] is not None]),
            "sse_events_per_token": sum(r["events"] for r in results) / max(1, tokens),
            "client_processes": n}


def release_device() -> None:
    """The offline engine's GPU memory back to the device (its graphs and caches)."""
    import gc

    gc.collect()
    if "torch" in sys.modules and sys.modules["torch"].cuda.is_initialized():
        sys.modules["torch"].cuda.empty_cache()


def cpu_seconds(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def haproxy_pids() -> list[int]:
    """HAProxy processes (Serve's ingress with RAY_SERVE_ENABLE_HA_PROXY=1)."""
    pids = []
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/comm") as f:
                if d.isdigit() and f.read().strip() == "haproxy":
                    pids.append(int(d))
        except OSError:
            continue
    return pids


def process_roles() -> dict[str, list[int]]:
    """The local cluster's processes by role (from Ray's state and the replicas' reports)."""
    import ray
    from ray.util.state import list_actors

    from cluster.local_cluster import model_replica_stats, replica_actors

    proxies = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                          filters=[("class_name", "=", "ProxyActor"), ("state", "=", "ALIVE")])
    stats = model_replica_stats()
    return {"proxy": [a.pid for a in proxies] + haproxy_pids(),
            "frontend": [a.pid for a in replica_actors("Ingress")],
            "model_replica": [a.pid for a in replica_actors("ModelReplica")],
            "engine_core": [s["core_pid"] for s in stats]}


def engine_messages() -> int:
    from cluster.local_cluster import model_replica_stats

    return sum(s.get("messages", 0) for s in model_replica_stats())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.path", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="deployments/local.yaml")
    p.add_argument("--url", help="a running tandem app (default: start a local cluster)")
    p.add_argument("--peer-url", help="another OpenAI server to run the same client against")
    p.add_argument("--peer-model", help="the peer's model id (default: its first)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=128)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--replicas", type=int, default=1, help="model replicas of the local app")
    p.add_argument("--model-gpus", type=int, default=0,
                   help="GPUs the local cluster's model node advertises (0: CPU engine)")
    p.add_argument("--torch-threads", type=int, help="the engine's CPU threads (default: the "
                   "config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=0.0,
                   help="every request's (1: OpenAI's default, sampled)")
    p.add_argument("--skip-offline", action="store_true")
    p.add_argument("--client-processes", type=int, help="default: one per "
                   f"{CLIENT_STREAMS} streams, at most half the cores")
    p.add_argument("--py-spy", type=float, metavar="SECONDS",
                   help="profile the engine core and a frontend with py-spy for this long "
                   "during the served run (local cluster); the top functions go to the report")
    p.add_argument("--py-spy-delay", type=float, default=1.0, metavar="SECONDS",
                   help="start the profiles this long into the served run")
    p.add_argument("--py-spy-dir", default=".run/profiles", help="the raw py-spy files")
    p.add_argument("--profile-dir", metavar="DIR",
                   help="sample the offline engine's and the served engine core's loop from "
                   "inside (cluster/stack_sampler.py: no ptrace needed) into DIR; their top "
                   "functions go to the report")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    if args.py_spy and not pyspy.available():
        p.error("--py-spy needs the py-spy command on PATH")

    from cluster.arch import ModelArch
    from cluster.config import load_serve_config

    doc, cfg = load_serve_config(args.config)
    cfg.model_pool.num_replicas = args.replicas
    if args.torch_threads:
        cfg.engine.torch_threads = args.torch_threads
    cfg.model_pool.autoscaling = None
    doc["applications"][0]["args"] = cfg.model_dump(mode="json")
    cfg.engine.max_num_seqs = max(cfg.engine.max_num_seqs, args.concurrency)
    prompts = workload(args.num_prompts, args.input_len, args.output_len,
                       ModelArch.from_hf(cfg.model.path).vocab_size, args.seed)
    res: dict = {"workload": {"concurrency": args.concurrency, "num_prompts": args.num_prompts,
                              "input_len": args.input_len, "output_len": args.output_len,
                              "temperature": args.temperature}}
    # every request's fields past the prompt (served and peer alike)
    extras = [{"temperature": args.temperature}] * len(prompts)
    if args.profile_dir:
        prof_dir = Path(args.profile_dir).resolve()
        os.environ[stack_sampler.ENV] = str(prof_dir)  # the local cluster's processes inherit it
    if not args.skip_offline:
        res["offline"] = offline(cfg, prompts, args.output_len, args.concurrency,
                                 bool(args.profile_dir), args.temperature)
        release_device()  # the served replica's engine sizes its KV cache from free memory
    doc["applications"][0]["args"]["engine"]["max_num_seqs"] = cfg.engine.max_num_seqs

    def run_served(url: str, local: bool) -> dict:
        roles = process_roles() if local else {}
        cpu0 = {r: sum(map(cpu_seconds, pids)) for r, pids in roles.items()}
        msgs0 = engine_messages() if local else 0
        core_raw = None
        if local and args.profile_dir and roles.get("engine_core"):
            core_raw = prof_dir / f"engine-core-{roles['engine_core'][0]}.raw"
            core0 = pyspy.read(core_raw)
        profiling = None
        if local and args.py_spy:
            pids = {r: roles[r][0] for r in ("engine_core", "frontend") if roles.get(r)}
            profiling = ThreadPoolExecutor(1).submit(
                pyspy.record, pids, args.py_spy, Path(args.py_spy_dir), args.py_spy_delay)
        out = asyncio.run(served(url, cfg.model.name, prompts, args.output_len,
                                 args.concurrency, "served", extras,
                                 processes=args.client_processes))
        if profiling is not None:
            files, errors = profiling.result()
            out["profile"] = {r: pyspy.summarize(f) for r, f in files.items()}
            if errors:
                out["py_spy_errors"] = errors
        if core_raw is not None:  # the run's samples: the file then, less the file before
            out.setdefault("profile", {})["engine_core_loop"] = pyspy.summarize(
                core_raw, before=core0)
        if local:
            k = max(1, out["tokens"]) / 1000
            out["cpu_s_per_1k_tokens"] = {r: (sum(map(cpu_seconds, pids)) - cpu0[r]) / k
                                          for r, pids in roles.items()}
            out["engine_messages_per_token"] = (engine_messages() - msgs0) / max(1, out["tokens"])
        return out

    with stdout_to_stderr():  # Ray's processes print to stdout: keep it for --json
        if args.url:
            res["served"] = run_served(args.url, False)
        else:
            from cluster import local_cluster

            spec = local_cluster.LocalClusterSpec(model_gpus=args.model_gpus)
            with local_cluster.serving(doc, cfg, spec) as url:
                res["served"] = run_served(url, True)
    if "offline" in res:
        res["served_vs_offline"] = res["served"]["output_tok_s"] / res["offline"]["output_tok_s"]
    if args.peer_url:
        model = args.peer_model or httpx.get(f"{args.peer_url}/v1/models",
                                             timeout=30).json()["data"][0]["id"]
        res["peer"] = asyncio.run(served(args.peer_url, model, prompts, args.output_len,
                                         args.concurrency, "peer", extras,
                                         processes=args.client_processes))
        res["served_vs_peer"] = res["served"]["output_tok_s"] / res["peer"]["output_tok_s"]
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        report(res)
    return 0 if res["served"]["errors"] == 0 else 1


def report(res: dict) -> None:
    w = res["workload"]
    print(f"{w['num_prompts']} requests, {w['input_len']} in / {w['output_len']} out, "
          f"concurrency {w['concurrency']}")
    for name in ("offline", "served", "peer"):
        if name not in res:
            continue
        r = res[name]
        line = f"  {name:8s} {r['output_tok_s']:9.1f} output tok/s"
        if "ttft_ms" in r:
            line += (f"  TTFT p50/p99 {r['ttft_ms']['p50']:.0f}/{r['ttft_ms']['p99']:.0f} ms  "
                     f"TPOT p50 {r['tpot_ms']['p50']:.1f} ms  errors {r['errors']}")
        print(line)
    if "served_vs_offline" in res:
        print(f"  served / offline: {res['served_vs_offline']:.2f}")
    if "served_vs_peer" in res:
        print(f"  served / peer:    {res['served_vs_peer']:.2f}")
    s = res["served"]
    if "cpu_s_per_1k_tokens" in s:
        print("  CPU s per 1,000 tokens: " + ", ".join(
            f"{k} {v:.3f}" for k, v in s["cpu_s_per_1k_tokens"].items()))
        print(f"  engine messages per token {s['engine_messages_per_token']:.3f}, "
              f"SSE events per token {s['sse_events_per_token']:.3f}")
    profiles = dict(s.get("profile", {}))
    if "profile" in res.get("offline", {}):
        profiles["offline_engine_loop"] = res["offline"]["profile"]
    for role, err in s.get("py_spy_errors", {}).items():
        print(f"  py-spy could not profile the {role}: {err}")
    for role, prof in profiles.items():
        print(f"  profile {role} ({prof['samples']} samples), self %:")
        for pct, frame in prof["self"][:12]:
            print(f"    {pct:5.1f} {frame}")


if __name__ == "__main__":
    sys.exit(main())
