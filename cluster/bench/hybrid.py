"""Hybrid routing benchmark: what a CPU pool adds beside a saturated GPU pool.

    python -m cluster.bench.hybrid [--quick] [--json] [--slo-ttft-ms 1000]

A local multi-node cluster serves one model twice in a row: first from its GPU-role pool
alone (one replica on the model node, made slow with the engine's benchmark throttle so
that a laptop-sized load saturates it: +`--gpu-step-delay-s` after every step, 4 sequences
a batch), then with a CPU pool beside it (one replica on the Kunpeng node, the engine on the
CPU, pinned to its core) under `router.policy: hybrid` (overflow only: `cpu_cost_max` 0).
Each run is the same closed-loop ramp of streaming clients (concurrency steps, a fixed time
each; 32-token prompts, 16 tokens out). Per run: goodput (requests started in a step whose
TTFT met the SLO, per second; the best step of the ramp, which is the pool's capacity within
the SLO once it saturates), TTFT p99 of the GPU pool's requests, and how many requests the
hybrid policy overflowed to the CPU pool. Progress goes to stderr, `--json` to stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import httpx
import numpy as np

from cluster.bench.progress import note, progress, stdout_to_stderr
from cluster.bench.serve import one, session

MODEL = "tandem-tiny"


def app_doc(cpu_pool: bool, slo_ms: float, gpu_delay_s: float) -> dict:
    args = {
        "model": {"name": MODEL},
        "engine": {"max_model_len": 512, "max_num_seqs": 4, "max_num_batched_tokens": 512,
                   "num_kv_blocks": 256, "torch_threads": 1, "slow_replica_ranks": [0],
                   "slow_step_delay_s": gpu_delay_s},
        "frontend_pool": {"num_replicas": 1, "num_cpus": 0.5},
        "model_pool": {"num_replicas": 1, "num_cpus": 1, "label_selector": {"node-role": "model"}},
        "router": {"policy": "hybrid", "stats_period_s": 0.25,
                   "hybrid": {"cpu_cost_max": 0, "gpu_busy_max": 0.8, "slo_ttft_ms": slo_ms}}}
    if cpu_pool:  # the GPU role's throttle is not the CPU pool's
        args["cpu_pool"] = {"num_replicas": 1, "num_cpus": 1,
                            "engine": {"slow_replica_ranks": []}}
    return {"proxy_location": "HeadOnly", "http_options": {"host": "127.0.0.1", "port": 8000},
            "applications": [{"name": "tandem", "route_prefix": "/",
                              "import_path": "deployments.app:app", "args": args}]}


async def ramp(url: str, steps: list[int], step_s: float, prompts: list[list[int]],
               max_tokens: int, desc: str) -> list[list[dict]]:
    """Closed loop: at step k, steps[k] clients each send a request as soon as their last one
    ended. Returns each step's requests (by start time)."""
    out: list[list[dict]] = [[] for _ in steps]
    start = time.perf_counter()
    ends = np.cumsum([step_s] * len(steps)) + start

    def step_at(t: float) -> int:
        return int(np.searchsorted(ends, t, side="right"))

    async with session(max(steps), 120) as client:
        with progress(desc=desc, unit="req") as bar:
            async def client_loop(k: int, i: int) -> None:  # client i joins at step k
                n = 0
                while (s := step_at(time.perf_counter())) < len(steps) and i < steps[s]:
                    r = await one(client, url, MODEL, prompts[(i * 7919 + n) % len(prompts)],
                                  max_tokens, None, {"temperature": 0.0})
                    out[s].append(r)
                    n += 1
                    bar.update()

            tasks = []
            for k, c in enumerate(steps):
                joining = range(steps[k - 1] if k else 0, c)
                tasks += [asyncio.create_task(client_loop(k, i)) for i in joining]
                await asyncio.sleep(max(0.0, ends[k] - time.perf_counter()))
            await asyncio.gather(*tasks)
    return out


def summary(per_step: list[list[dict]], steps: list[int], step_s: float, slo_s: float) -> dict:
    def good(r: dict) -> bool:
        return not r["error"] and r["ttft"] is not None and r["ttft"] <= slo_s

    def p99(rs: list[dict]) -> float | None:
        t = [r["ttft"] for r in rs if r["ttft"] is not None]
        return float(np.percentile(t, 99)) * 1000 if t else None

    every = [r for rs in per_step for r in rs]
    return {"goodput": max(sum(map(good, rs)) / step_s for rs in per_step),
            "ttft_p99_ms_gpu": p99([r for r in every if r["pool"] == "gpu"]),
            "ttft_p99_ms": p99(every),
            "failed": sum(1 for r in every if r["error"]),
            "errors": sorted({r["error"] for r in every if r["error"]})[:3],
            "steps": [{"concurrency": c, "requests": len(rs),
                       "goodput": sum(map(good, rs)) / step_s, "ttft_p99_ms": p99(rs),
                       "cpu_pool": sum(1 for r in rs if r["pool"] == "cpu")}
                      for c, rs in zip(steps, per_step, strict=True)],
            "routes": {k: sum(1 for r in every if r["route"] == k)
                       for k in sorted({r["route"] for r in every if r["route"]})}}


def wait_for_pools(url: str, want: dict[str, int], timeout_s: float = 60) -> None:
    """Until the frontend's routers see every pool's replicas (they report load)."""
    deadline = time.monotonic() + timeout_s
    while httpx.get(f"{url}/v1/models/{MODEL}", timeout=30).json().get("pools") != want:
        if time.monotonic() > deadline:
            raise TimeoutError(f"pools not seen after {timeout_s:g} s (want {want})")
        time.sleep(0.25)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m cluster.bench.hybrid", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a short ramp (about 2 min in all)")
    p.add_argument("--slo-ttft-ms", type=float, default=1000.0)
    p.add_argument("--gpu-step-delay-s", type=float, default=0.05,
                   help="the GPU-role pool's throttle after every engine step")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    steps, step_s = ([2, 4, 8, 12], 6.0) if args.quick else ([2, 4, 6, 8, 12, 16], 15.0)
    slo_s = args.slo_ttft_ms / 1000
    rng = np.random.default_rng(0)
    prompts = [rng.integers(10, 4000, 32).tolist() for _ in range(64)]

    from cluster import local_cluster
    from cluster.config import parse_app_config

    runs = {}
    with stdout_to_stderr():  # Ray's processes print to stdout: keep it for --json
        off, on = (app_doc(c, args.slo_ttft_ms, args.gpu_step_delay_s) for c in (False, True))
        cfg_off, cfg_on = (parse_app_config(d["applications"][0]["args"]) for d in (off, on))
        with local_cluster.serving(off, cfg_off) as url:
            for name, doc, cfg, pools in (("off", off, cfg_off, {"gpu": 1}),
                                          ("on", on, cfg_on, {"gpu": 1, "cpu": 1})):
                if name == "on":
                    local_cluster.deploy(doc, cfg)  # the same app, now with its CPU pool
                wait_for_pools(url, pools)
                asyncio.run(ramp(url, [2], 1.5, prompts, 4, f"warm-up ({name})"))
                per_step = asyncio.run(ramp(url, steps, step_s, prompts, 16,
                                            f"CPU pool {name}"))
                runs[name] = summary(per_step, steps, step_s, slo_s)
                note(f"CPU pool {name}: goodput {runs[name]['goodput']:.2f} req/s")
    res = {"goodput_off": runs["off"]["goodput"], "goodput_on": runs["on"]["goodput"],
           "goodput_gain": runs["on"]["goodput"] / max(1e-9, runs["off"]["goodput"]) - 1,
           "ttft_p99_ms_off": runs["off"]["ttft_p99_ms_gpu"],
           "ttft_p99_ms_on": runs["on"]["ttft_p99_ms_gpu"],
           "ttft_p99_ms_on_all": runs["on"]["ttft_p99_ms"],
           "overflowed": runs["on"]["routes"].get("overflow", 0),
           "requests_failed": runs["off"]["failed"] + runs["on"]["failed"],
           "slo_ttft_ms": args.slo_ttft_ms, "step_s": step_s, "runs": runs}
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(f"goodput (TTFT <= {args.slo_ttft_ms:g} ms) {res['goodput_off']:.2f} -> "
              f"{res['goodput_on']:.2f} req/s ({res['goodput_gain']:+.0%}); GPU pool TTFT "
              f"p99 {res['ttft_p99_ms_off']:.0f} -> {res['ttft_p99_ms_on']:.0f} ms; "
              f"{res['overflowed']} overflowed, {res['requests_failed']} failed")
    return 0 if res["requests_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
