"""The load both serving benchmarks drive (`bench.serve`, `bench.path`): requests at most
`concurrency` in flight, optionally arriving as a Poisson process, and the same split over
client processes.

One Python process parses every SSE event of its streams (~20 us each), so past a few
hundred events a millisecond a single client would be what gets measured: the requests are
dealt round robin to spawned processes, each with its share of the concurrency and rate.
Every worker is started before any sends (a spawn imports for about a second), and a shared
`start_at` on the host's monotonic clock lets them begin together.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from cluster.bench.progress import progress


def processes(concurrency: int, streams_per_process: int, max_processes: int | None = None
              ) -> int:
    """Client processes for `concurrency` streams: one per `streams_per_process`, at most
    `max_processes` (default: the host's cores)."""
    cap = max_processes or os.cpu_count() or 1
    return max(1, min(cap, -(-concurrency // streams_per_process)))


async def drive(call: Callable[[int], Awaitable[dict]], n: int, concurrency: int, *,
                rate: float | None = None, seed: int = 0, duration_s: float | None = None,
                start_at: float | None = None, desc: str = "requests",
                position: int | None = None) -> tuple[list[dict], float, float]:
    """Runs call(0) .. call(n - 1), at most `concurrency` at once, arriving at `rate` per
    second (Poisson, seeded) when given, until `duration_s` has passed when given; from
    `start_at` (time.perf_counter) when given. Returns the results and the start and end."""
    if start_at is not None:
        await asyncio.sleep(max(0.0, start_at - time.perf_counter()))
    sem = asyncio.Semaphore(concurrency)
    results: list[dict] = []
    with progress(total=n, desc=desc, unit="req", position=position) as bar:
        async def task(i: int) -> None:
            async with sem:
                results.append(await call(i))
                bar.update()

        arrivals = np.random.default_rng(seed)
        start = time.perf_counter()
        tasks = []
        for i in range(n):
            if duration_s and time.perf_counter() - start > duration_s:
                break
            tasks.append(asyncio.create_task(task(i)))
            if rate:
                await asyncio.sleep(arrivals.exponential(1.0 / rate))
        await asyncio.gather(*tasks)
        end = time.perf_counter()
    return results, start, end


def _ready(_: int) -> None:
    time.sleep(0.2)  # held, so that each of the pool's workers takes one and starts


async def in_processes(fn: Callable, workers: int, args_of: Callable[[int, float], tuple]
                       ) -> list:
    """fn(*args_of(i, start_at)) in each of `workers` spawned processes, once all of them
    have started; start_at: a second after that, for drive()."""
    loop = asyncio.get_running_loop()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_ready, range(workers)))
        start_at = time.perf_counter() + 1.0
        return await asyncio.gather(*(loop.run_in_executor(pool, fn, *args_of(i, start_at))
                                      for i in range(workers)))
