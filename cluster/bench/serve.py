"""Serving benchmark: drives a running OpenAI-compatible endpoint and reports what clients see.

    python -m cluster.bench.serve --url http://127.0.0.1:8000 --num-requests 200 \\
        --concurrency 32 --input-len 64 256 --output-len 32 128 [--request-rate 8] [--json]

Fixed concurrency, or Poisson arrivals at --request-rate (then --concurrency caps requests in
flight); always bounded by --num-requests or --duration. `--sweep-rates 1 2 4 8` runs the
workload at each rate and `--plot latency.png` draws latency against load. `--prometheus URL`
(or `--ray-metrics`, straight from Ray's node endpoints) samples GPU and CPU utilization from
the cluster's metrics during the run, for experiments such as 1,000 concurrent streams
(`--concurrency 1000 --num-requests 5000`); the load comes from one client process per 200
streams (`--workers`), so that the client is not what gets measured. With `--ray-metrics` it
also reports the engine's own histograms over the run (`engine`: TTFT, queue time, the gap
between a sequence's tokens, idle gaps between steps): set beside the client's figures, they
say whether the time went in the engine or on the way.

Streams every request (SSE, aiohttp) and measures, like vLLM's serving benchmark: TTFT (to the first
content), ITL (gaps between content chunks), TPOT ((e2e - TTFT) / (output tokens - 1)),
e2e latency, output tok/s, and goodput (requests/s meeting the TTFT and ITL SLOs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time

import aiohttp
import httpx
import numpy as np

from cluster.bench import clients

CLIENT_STREAMS = 200  # concurrent streams per client process
WORDS = ("the of and to in is was for on that with as by at from it an be this are or "
         "model cluster token replica serve node cache stream batch kernel").split()


def make_prompts(n: int, in_len: tuple[int, int], shared_prefix: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    prefix = " ".join(rng.choice(WORDS) for _ in range(shared_prefix))
    return [(prefix + " " if prefix else "") +
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(*in_len))) for _ in range(n)]


def session(concurrency: int, timeout: float) -> aiohttp.ClientSession:
    """The benchmark's HTTP client: aiohttp, as vLLM's serving benchmark uses. httpx was the
    client before and was what got measured: against a server that answers at once (200
    streams of 100 events 50 ms apart, one process), httpx took 11.8 CPU s to aiohttp's 1.8
    and its TTFT was p50 1.39 s / p99 6.16 s to aiohttp's 29 / 71 ms."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=concurrency + 8),
        timeout=aiohttp.ClientTimeout(total=timeout))


async def one(client: aiohttp.ClientSession, url: str, model: str, prompt: str | list[int],
              max_tokens: int, key: str | None, extra: dict | None = None) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}, **(extra or {})}
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    t0 = time.perf_counter()
    stamps, out_tokens, error, pool, route = [], 0, None, None, None
    prompt_tokens = cached_tokens = 0
    try:
        async with client.post(f"{url}/v1/completions", json=body, headers=headers) as r:
            # which of the model's pools served it, and why (hybrid routing)
            pool, route = r.headers.get("x-tandem-pool"), r.headers.get("x-tandem-route")
            if r.status != 200:
                error = f"HTTP {r.status}"
                await r.read()
            else:
                async for line in r.content:  # one SSE line per iteration
                    if not line.startswith(b"data: {"):
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        error = ev["error"].get("message", "error")
                    elif ev.get("choices") and ev["choices"][0].get("text"):
                        stamps.append(time.perf_counter())
                    if ev.get("usage"):
                        u = ev["usage"]
                        out_tokens, prompt_tokens = u["completion_tokens"], u["prompt_tokens"]
                        cached_tokens = (u.get("prompt_tokens_details") or {}).get(
                            "cached_tokens", 0)
    except (aiohttp.ClientError, asyncio.TimeoutError) as err:
        error = type(err).__name__
    end = time.perf_counter()
    # start: the host's monotonic clock, the same in every client process (Linux)
    return {"error": error, "ttft": stamps[0] - t0 if stamps else None, "e2e": end - t0,
            "start": t0,
            "itl": list(np.diff(stamps)) if len(stamps) > 1 else [], "out": out_tokens,
            "events": len(stamps), "pool": pool, "route": route, "prompt": prompt_tokens,
            "cached": cached_tokens}


def after_first_wave(ok: list[dict], concurrency: int) -> tuple[list[float], float | None]:
    """TTFTs of the requests sent after the first wave (the first `concurrency` requests,
    which all start at once in a closed loop) had its first tokens, and when that was (s
    after the first start). A synchronized start queues every first prompt at once: with
    1,000 clients of 64-256 words that is ~160,000 prompt tokens, which no single engine
    prefills in 200 ms, so the run's p99 speaks of the start, these of the steady state."""
    if not ok:
        return [], None
    first = sorted(ok, key=lambda r: r["start"])[:concurrency]
    t0 = first[0]["start"]
    end = max(r["start"] + (r["ttft"] if r["ttft"] is not None else r["e2e"]) for r in first)
    later = [r["ttft"] for r in ok if r["start"] > end and r["ttft"] is not None]
    return later, end - t0


def pcts(xs: list[float]) -> dict:
    if not xs:
        return {"p50": None, "p90": None, "p99": None}
    return {f"p{q}": float(np.percentile(xs, q)) * 1000 for q in (50, 90, 99)}


# Ray's exported series: mean GPU busy share of the model replicas (NVML), CPU use of the
# nodes (Ray's node CPU series carry no role label: all nodes). As PromQL for a Prometheus
# server, and as metric names for scraping Ray's per-node endpoints directly.
UTILIZATION = {"gpu_util_perc": ("avg(ray_tandem_gpu_utilization_perc)",
                                 "ray_tandem_gpu_utilization_perc"),
               "cpu_util_perc": ("avg(ray_node_cpu_utilization)", "ray_node_cpu_utilization")}
RAY_TARGETS = "/tmp/ray/prom_metrics_service_discovery.json"


async def from_prometheus(client: httpx.AsyncClient, prom: str) -> dict[str, float]:
    out = {}
    for key, (query, _) in UTILIZATION.items():
        r = await client.get(f"{prom}/api/v1/query", params={"query": query})
        result = r.json()["data"]["result"]
        if result:
            out[key] = float(result[0]["value"][1])
    return out


async def ray_node_samples(client: httpx.AsyncClient, targets_file: str):
    """Every sample of every node's metrics endpoint (the targets Ray writes for Prometheus'
    file discovery), for machines without a Prometheus server."""
    from prometheus_client.parser import text_string_to_metric_families

    with open(targets_file) as f:
        targets = [t for group in json.load(f) for t in group["targets"]]
    for target in targets:
        text = (await client.get(f"http://{target}/metrics")).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                yield sample


async def from_ray_nodes(client: httpx.AsyncClient, targets_file: str) -> dict[str, float]:
    """The same averages from Ray's node endpoints."""
    names = {name: key for key, (_, name) in UTILIZATION.items()}
    seen: dict[str, list[float]] = {}
    async for sample in ray_node_samples(client, targets_file):
        if sample.name in names:
            seen.setdefault(names[sample.name], []).append(sample.value)
    return {k: float(np.mean(v)) for k, v in seen.items()}


# the engine's own latency histograms (from a request's arrival at the engine core), summed
# over the replicas: set beside what the client saw, they say which side the time is on
ENGINE_HISTOGRAMS = {"engine_ttft_ms": "ray_tandem_time_to_first_token_seconds",
                     "engine_queue_ms": "ray_tandem_request_queue_time_seconds",
                     # the gap between a sequence's tokens at the engine: its step time
                     "engine_itl_ms": "ray_tandem_inter_token_latency_seconds",
                     # host time between steps with work waiting (the device idles)
                     "engine_idle_gap_ms": "ray_tandem_gpu_idle_gap_seconds"}
# Ray's metrics agent exports on a period: the last requests' samples arrive this much later
RAY_EXPORT_S = 12.0


async def engine_buckets(client: httpx.AsyncClient, targets_file: str) -> dict:
    """Cumulative bucket counts of ENGINE_HISTOGRAMS by upper bound, summed over nodes."""
    names = {f"{name}_bucket": key for key, name in ENGINE_HISTOGRAMS.items()}
    out: dict[str, dict[float, float]] = {key: {} for key in ENGINE_HISTOGRAMS}
    async for sample in ray_node_samples(client, targets_file):
        key = names.get(sample.name)
        if key is not None:
            le = float(sample.labels["le"])
            out[key][le] = out[key].get(le, 0.0) + sample.value
    return out


def bucket_quantiles(before: dict[float, float], after: dict[float, float]) -> dict:
    """p50/p90/p99 (ms) of the observations between two readings, as the upper bound of the
    bucket each falls in (a histogram knows no more), and their count."""
    les = sorted(after)
    cum = [after[le] - before.get(le, 0.0) for le in les]
    total = cum[-1] if cum else 0.0
    out: dict = {"count": int(total)}
    for q in (50, 90, 99):
        hit = next((le for le, c in zip(les, cum, strict=True) if total and c >= q / 100 * total),
                   None)
        out[f"p{q}_le"] = None if hit is None else hit * 1000
    return out


async def sample_utilization(read, stop: asyncio.Event, every_s: float = 2.0) -> dict:
    seen: dict[str, list[float]] = {k: [] for k in UTILIZATION}
    async with httpx.AsyncClient(timeout=5) as client:
        while not stop.is_set():
            try:
                for key, value in (await read(client)).items():
                    seen[key].append(value)
            except (httpx.HTTPError, OSError, KeyError, ValueError):
                pass
            try:
                await asyncio.wait_for(stop.wait(), every_s)
            except (asyncio.TimeoutError, TimeoutError):
                pass
    return {k: {"mean": float(np.mean(v)), "max": float(np.max(v))} if v else None
            for k, v in seen.items()}


def utilization_reader(args):
    if args.prometheus:
        return lambda client: from_prometheus(client, args.prometheus)
    if args.ray_metrics:
        return lambda client: from_ray_nodes(client, args.ray_metrics)
    return None


async def drive(args, prompts: list[str], lens: list[int], concurrency: int,
                rate: float | None, seed: int, shard: int | None = None,
                start_at: float | None = None) -> tuple[list[dict], float, float]:
    """One client process's requests: at most `concurrency` in flight, Poisson arrivals at
    `rate` when given; the results and when they started and ended. Client processes
    (`shard`) show a bar each, one line apiece."""
    async with session(concurrency, args.timeout) as client:
        return await clients.drive(
            lambda i: one(client, args.url, args.model, prompts[i], lens[i], args.api_key),
            len(prompts), concurrency, rate=rate, seed=seed, duration_s=args.duration,
            start_at=start_at, desc="requests" if shard is None else f"client {shard}",
            position=shard)


def drive_shard(args, prompts, lens, shard: int, workers: int, start_at: float
                ) -> tuple[list[dict], float, float]:
    """Worker process: every workers-th request, its share of the concurrency and rate."""
    conc = -(-args.concurrency // workers)
    rate = args.request_rate / workers if args.request_rate else None
    return asyncio.run(drive(args, prompts[shard::workers], lens[shard::workers], conc, rate,
                             args.seed + shard, shard, start_at))


def client_processes(args) -> int:
    """One Python client tops out near a few hundred streams (it parses every SSE event):
    more streams get more processes, so that the client is never what is measured."""
    return args.workers or clients.processes(args.concurrency, CLIENT_STREAMS)


async def run(args) -> dict:
    prompts = make_prompts(args.num_requests, tuple(args.input_len), args.shared_prefix,
                           args.seed)
    rng = random.Random(args.seed + 1)
    lens = [rng.randint(*args.output_len) for _ in prompts]
    stop = asyncio.Event()
    engine_before = await read_engine(args)
    read = utilization_reader(args)
    sampler = asyncio.create_task(sample_utilization(read, stop)) if read else None
    workers = client_processes(args)
    if workers == 1:
        results, start, end = await drive(args, prompts, lens, args.concurrency,
                                          args.request_rate, args.seed)
    else:
        print(f"{workers} client processes", file=sys.stderr)
        shards = await clients.in_processes(drive_shard, workers, lambda i, start_at: (
            args, prompts, lens, i, workers, start_at))
        results = [r for shard in shards for r in shard[0]]
        start, end = min(sh[1] for sh in shards), max(sh[2] for sh in shards)
    wall = end - start  # from the first request sent to the last answer (not the spawns)
    stop.set()
    utilization = await sampler if sampler else None
    engine = None
    if engine_before is not None:
        await asyncio.sleep(RAY_EXPORT_S)
        after = await read_engine(args)
        engine = {k: bucket_quantiles(engine_before[k], after[k]) for k in after}
    ok = [r for r in results if r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    later, wave_s = after_first_wave(ok, args.concurrency)
    itl = [x for r in ok for x in r["itl"]]
    tpot = [(r["e2e"] - r["ttft"]) / (r["out"] - 1) for r in ok if r["out"] > 1 and r["ttft"]]
    good = [r for r in ok if r["ttft"] is not None and r["ttft"] * 1000 <= args.slo_ttft_ms
            and all(x * 1000 <= args.slo_itl_ms for x in r["itl"])]
    return {"requests": len(results), "errors": len(results) - len(ok), "duration_s": wall,
            "request_throughput": len(ok) / wall,
            "output_tok_s": sum(r["out"] for r in ok) / wall,
            "ttft_ms": pcts(ttft), "itl_ms": pcts(itl), "tpot_ms": pcts(tpot),
            "ttft_ms_after_first_wave": {**pcts(later), "requests": len(later),
                                         "first_wave_s": wave_s},
            "e2e_ms": pcts([r["e2e"] for r in ok]),
            "goodput_req_s": len(good) / wall,
            "slo": {"ttft_ms": args.slo_ttft_ms, "itl_ms": args.slo_itl_ms},
            "error_samples": sorted({r["error"] for r in results if r["error"]})[:5],
            "request_rate": args.request_rate, "concurrency": args.concurrency,
            "utilization": utilization, "engine": engine,
            "client": {"library": f"aiohttp {aiohttp.__version__}", "processes": workers}}


async def read_engine(args) -> dict | None:
    if not args.ray_metrics:
        return None
    async with httpx.AsyncClient(timeout=10) as client:
        try:
            return await engine_buckets(client, args.ray_metrics)
        except (httpx.HTTPError, OSError, ValueError):
            return None


def sweep(args) -> list[dict]:
    out = []
    for rate in args.sweep_rates:
        args.request_rate = rate
        print(f"rate {rate:g} req/s", file=sys.stderr)
        out.append(asyncio.run(run(args)))
    return out


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    load = [r["request_throughput"] for r in results]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label in (("ttft_ms", "TTFT"), ("itl_ms", "ITL"), ("e2e_ms", "e2e")):
        for q, style in (("p50", "-o"), ("p99", "--x")):
            ys = [r[key][q] for r in results]
            if all(y is not None for y in ys):
                ax.plot(load, ys, style, label=f"{label} {q}")
    ax.set_yscale("log")
    ax.set_xlabel("achieved requests/s")
    ax.set_ylabel("latency (ms)")
    ax.set_title("tandem: latency against load")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def report(res: dict) -> None:
    print(f"requests {res['requests']} (errors {res['errors']}) in {res['duration_s']:.1f}"
          f" s: {res['request_throughput']:.2f} req/s, {res['output_tok_s']:.1f} output "
          f"tok/s, goodput {res['goodput_req_s']:.2f} req/s")
    for k in ("ttft_ms", "ttft_ms_after_first_wave", "itl_ms", "tpot_ms", "e2e_ms"):
        v = res[k]
        if v["p50"] is not None:
            print(f"  {k:8s} p50 {v['p50']:8.1f}  p90 {v['p90']:8.1f}  p99 {v['p99']:8.1f}")
    for k, v in (res.get("engine") or {}).items():
        if v["count"]:
            print(f"  {k:8s} p50 <= {v['p50_le']:g}  p90 <= {v['p90_le']:g}  p99 <= "
                  f"{v['p99_le']:g} ({v['count']} requests, engine histogram)")
    for k, v in (res.get("utilization") or {}).items():
        if v:
            print(f"  {k:14s} mean {v['mean']:6.1f}  max {v['max']:6.1f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="tandem-tiny")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--num-requests", type=int, default=200)
    ap.add_argument("--duration", type=float, default=None, help="stop sending after seconds")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals/s")
    ap.add_argument("--input-len", type=int, nargs=2, default=[64, 256], help="words")
    ap.add_argument("--output-len", type=int, nargs=2, default=[32, 128], help="tokens")
    ap.add_argument("--shared-prefix", type=int, default=0, help="words shared by all")
    ap.add_argument("--slo-ttft-ms", type=float, default=1000)
    ap.add_argument("--slo-itl-ms", type=float, default=200)
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sweep-rates", type=float, nargs="+", default=None,
                    help="run at each Poisson rate in turn")
    ap.add_argument("--plot", default=None, help="PNG of latency against load (a sweep)")
    ap.add_argument("--prometheus", default=None,
                    help="Prometheus URL: sample GPU/CPU utilization during the run")
    ap.add_argument("--ray-metrics", nargs="?", const=RAY_TARGETS, default=None,
                    metavar="TARGETS_JSON", help="no Prometheus server: scrape Ray's node "
                    f"endpoints listed in this file (default {RAY_TARGETS}) instead")
    ap.add_argument("--workers", type=int, default=0,
                    help=f"client processes (default: one per {CLIENT_STREAMS} streams)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    results = sweep(args) if args.sweep_rates else [asyncio.run(run(args))]
    if args.plot:
        plot(results, args.plot)
    if args.json:
        print(json.dumps(results if args.sweep_rates else results[0], indent=2))
    else:
        for res in results:
            if args.sweep_rates:
                print(f"--- rate {res['request_rate']:g} req/s")
            report(res)
        if args.plot:
            print(f"plot: {args.plot}")
    return 0 if all(r["errors"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
