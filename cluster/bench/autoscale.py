"""Autoscaling benchmark: replica counts of both pools over time against a load ramp.

    python -m cluster.bench.autoscale [--config deployments/autoscaling/ramp.yaml] [--quick]
        [--plot autoscale.png] [--json]

Starts a local multi-node cluster, deploys the app with the config's autoscaling policies and
drives it in phases: idle, high load (many concurrent streaming requests) until the model pool
has scaled up or a time limit passes, then a trickle of one request at a time until both pools
are back at their minimum (every request must still succeed: replicas leave by draining).
Samples the RUNNING replicas of each pool twice a second and prints them against the load as
a table and a PNG; `--json` prints the summary figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cluster.bench.progress import progress
from cluster.bench.serve import make_prompts, one, session

RAMP = Path(__file__).resolve().parents[2] / "deployments" / "autoscaling" / "ramp.yaml"
POOLS = {"model": "ModelReplica", "frontend": "Ingress"}


@dataclass
class Sample:
    t: float
    concurrency: int
    replicas: dict[str, int]


@dataclass
class Ramp:
    """What one run saw; times in seconds from the start of the run."""

    samples: list[Sample] = field(default_factory=list)
    load_up_at: float = 0.0
    load_down_at: float = 0.0
    end_at: float = 0.0
    requests: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def running_replicas(app: str) -> dict[str, int]:
    from ray import serve

    deps = serve.status().applications[app].deployments
    return {pool: int(deps[name].replica_states.get("RUNNING", 0))
            for pool, name in POOLS.items()}


class Watcher(threading.Thread):
    """Samples replica counts while the load runs (Serve's status is a blocking call), and
    shows them with the requests done on the progress bar."""

    def __init__(self, app: str, ramp: Ramp, start: float, load: list[int], bar):
        super().__init__(daemon=True)
        self.app, self.ramp, self.start_t, self.load, self.bar = app, ramp, start, load, bar
        self.stop = threading.Event()
        self.latest: dict[str, int] = running_replicas(app)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.latest = running_replicas(self.app)
            except Exception:  # a status call that fails mid-update: keep the last sample
                pass
            self.ramp.samples.append(Sample(time.monotonic() - self.start_t, self.load[0],
                                            dict(self.latest)))
            self.bar.set_postfix(load=self.load[0], **self.latest, refresh=False)
            self.bar.update(self.ramp.requests - self.bar.n)
            self.stop.wait(0.5)


async def drive(url: str, model: str, concurrency: int, until, max_s: float, ramp: Ramp,
                load: list[int], max_tokens: int, seed: int) -> None:
    """Keeps `concurrency` streams busy until `until()` holds or max_s passes."""
    prompts = make_prompts(256, (16, 48), 0, seed)
    deadline = time.monotonic() + max_s
    load[0] = concurrency

    async with session(concurrency, 120) as client:
        async def worker(w: int) -> None:
            i = w
            while time.monotonic() < deadline and not until():
                r = await one(client, url, model, prompts[i % len(prompts)], max_tokens, None)
                ramp.requests += 1
                if r["error"] is not None:
                    ramp.failed += 1
                    ramp.errors.append(r["error"])
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


def run_ramp(url: str, app: str, low: dict[str, int], high_concurrency: int = 16,
             up_max_s: float = 90, down_max_s: float = 120, hold_s: float = 5,
             model: str = "tandem-tiny", max_tokens: int = 48, scale_up_by: int = 2) -> Ramp:
    """The load ramp against an app already deployed; `low` is each pool's min replicas.
    High load lasts until the model pool has `scale_up_by` more replicas, then `hold_s`."""
    ramp, load = Ramp(), [0]
    start = time.monotonic()
    bar = progress(desc="idle", unit="req")
    watcher = Watcher(app, ramp, start, load, bar)
    watcher.start()
    try:
        time.sleep(2)
        bar.set_description("high load")
        ramp.load_up_at = time.monotonic() - start
        scaled = lambda: watcher.latest["model"] >= low["model"] + scale_up_by  # noqa: E731
        asyncio.run(drive(url, model, high_concurrency, scaled, up_max_s, ramp, load,
                          max_tokens, seed=1))
        asyncio.run(drive(url, model, high_concurrency, lambda: False, hold_s, ramp, load,
                          max_tokens, seed=3))
        ramp.load_down_at = time.monotonic() - start
        bar.set_description("trickle")
        at_min = lambda: all(watcher.latest[p] <= low[p] for p in POOLS)  # noqa: E731
        asyncio.run(drive(url, model, 1, at_min, down_max_s, ramp, load, 8, seed=2))
        load[0] = 0
        time.sleep(1)
        ramp.end_at = time.monotonic() - start
    finally:
        watcher.stop.set()
        watcher.join()
        bar.close()
    return ramp


def summary(ramp: Ramp) -> dict:
    counts = {p: [s.replicas[p] for s in ramp.samples] for p in POOLS}

    def first(pool: str, pred, after: float) -> float | None:
        for s in ramp.samples:
            if s.t >= after and pred(s.replicas[pool]):
                return round(s.t - after, 1)
        return None

    out: dict = {"requests_total": ramp.requests, "requests_failed": ramp.failed,
                 "error_samples": sorted(set(ramp.errors))[:5]}
    for p in POOLS:
        hi, lo = max(counts[p]), min(counts[p])
        out[p] = {"max_replicas": hi, "min_replicas": lo,
                  "scale_up_s": first(p, lambda n, hi=hi: n == hi, ramp.load_up_at),
                  "scale_down_s": first(p, lambda n, lo=lo: n == lo, ramp.load_down_at)}
    # the model pool's figures are the headline ones
    out.update({k: out["model"][k] for k in ("max_replicas", "min_replicas", "scale_up_s",
                                              "scale_down_s")})
    return out


def table(ramp: Ramp, every_s: float = 2.0) -> str:
    rows, last = ["   t(s)  load  model  frontend"], -every_s
    for s in ramp.samples:
        if s.t - last >= every_s:
            rows.append(f"{s.t:7.1f} {s.concurrency:5d} {s.replicas['model']:6d} "
                        f"{s.replicas['frontend']:9d}")
            last = s.t
    return "\n".join(rows)


def plot(ramp: Ramp, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t for s in ramp.samples]
    fig, ax = plt.subplots(figsize=(8, 4))
    for p in POOLS:
        ax.step(t, [s.replicas[p] for s in ramp.samples], where="post", label=f"{p} replicas")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("seconds")
    ax.set_ylabel("replicas")
    ax2 = ax.twinx()
    ax2.fill_between(t, [s.concurrency for s in ramp.samples], step="post", alpha=0.15,
                     color="grey", label="concurrent requests")
    ax2.set_ylabel("concurrent requests")
    ax.legend(loc="upper right")
    ax.set_title("tandem autoscaling: replicas against load")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(RAMP))
    ap.add_argument("--concurrency", type=int, default=16, help="streams during high load")
    ap.add_argument("--quick", action="store_true", help="shorter phases (under 5 minutes)")
    ap.add_argument("--plot", default="autoscale.png", help="PNG path ('' for none)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from cluster import local_cluster
    from cluster.config import load_serve_config

    doc, cfg = load_serve_config(args.config)
    pools = {"model": cfg.model_pool, "frontend": cfg.frontend_pool}
    low = {p: (c.autoscaling.min_replicas if c.autoscaling else c.num_replicas)
           for p, c in pools.items()}
    app = doc["applications"][0].get("name", "tandem")
    limits = (60, 90) if args.quick else (180, 300)
    with local_cluster.serving(doc, cfg, local_cluster.LocalClusterSpec(model_cpus=8)) as url:
        ramp = run_ramp(url, app, low, args.concurrency, *limits)
    res = summary(ramp)
    if args.plot:
        plot(ramp, args.plot)
        res["plot"] = args.plot
    if args.json:
        print(json.dumps(res, indent=2))
    else:
        print(table(ramp))
        print(f"load up at {ramp.load_up_at:.1f} s, down at {ramp.load_down_at:.1f} s")
        for p in POOLS:
            r = res[p]
            print(f"{p:9s} replicas {r['min_replicas']}..{r['max_replicas']}, scale up "
                  f"{r['scale_up_s']} s after load, down {r['scale_down_s']} s after it stopped")
        print(f"requests {res['requests_total']}, failed {res['requests_failed']}"
              + (f" ({', '.join(res['error_samples'])})" if res["error_samples"] else "")
              + (f"; plot {args.plot}" if args.plot else ""))
    return 0 if res["requests_failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
