"""Soak: moderate steady load for a while, replica memory and errors sampled as it runs.

    python -m cluster.bench.soak [--minutes 10] [--concurrency 8] [--json]

Starts the local multi-node cluster with the test app's shape (two model replicas, two
frontend replicas), drives streaming requests at a fixed concurrency, and every 30 s reads
each model replica's resident memory and KV blocks in use from its own report. Flat memory
and zero errors are the pass mark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import aiohttp

from cluster.bench.progress import note, progress
from cluster.bench.serve import make_prompts, one, session
from cluster.local_cluster import LocalClusterSpec, model_replica_stats, serving

CONFIG = Path(__file__).resolve().parents[2] / "tests" / "test_config.yaml"


async def soak(url: str, minutes: float, concurrency: int) -> dict:
    prompts = make_prompts(512, (16, 96), 0, seed=0)
    end = time.monotonic() + minutes * 60
    done = {"requests": 0, "errors": 0}
    samples: list[dict] = []

    async def worker(w: int, client: aiohttp.ClientSession) -> None:
        i = w
        while time.monotonic() < end:
            r = await one(client, url, "tandem-tiny", prompts[i % len(prompts)], 48, None)
            done["requests"] += 1
            done["errors"] += r["error"] is not None
            i += concurrency

    async def sampler() -> None:
        start = time.monotonic()
        while time.monotonic() < end:
            stats = await asyncio.to_thread(model_replica_stats)
            samples.append({"t_s": round(time.monotonic() - start),
                            "rss_mb": [round(s["rss_mb"]) for s in stats],
                            "kv_used": [s["kv_used"] for s in stats],
                            "requests": done["requests"]})
            note(str(samples[-1]))
            await asyncio.sleep(30)

    async def ticker(bar) -> None:
        start = time.monotonic()
        while time.monotonic() < end:
            await asyncio.sleep(1)
            bar.set_postfix(requests=done["requests"], errors=done["errors"], refresh=False)
            bar.update(min(bar.total, round(time.monotonic() - start)) - bar.n)

    with progress(total=round(minutes * 60), desc="soak", unit="s") as bar:
        async with session(concurrency, 120) as client:
            await asyncio.gather(sampler(), ticker(bar),
                                 *(worker(w, client) for w in range(concurrency)))
    first, last = samples[1] if len(samples) > 1 else samples[0], samples[-1]
    growth = [b - a for a, b in zip(first["rss_mb"], last["rss_mb"], strict=False)]
    return {**done, "minutes": minutes, "samples": samples, "rss_growth_mb": growth}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from cluster.config import load_serve_config

    doc, cfg = load_serve_config(CONFIG)
    spec = LocalClusterSpec(kunpeng_nodes=2, kunpeng_cpus=2, model_gpus=2, model_cpus=8)
    with serving(doc, cfg, spec) as url:
        res = asyncio.run(soak(url, args.minutes, args.concurrency))
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        for s in res["samples"]:
            print(f"{s['t_s']:5d} s  requests {s['requests']:6d}  rss MB {s['rss_mb']}  "
                  f"kv blocks {s['kv_used']}")
        print(f"requests {res['requests']}, errors {res['errors']}, model replica memory "
              f"growth after warm-up (MB): {res['rss_growth_mb']}")
    return 0 if res["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
