"""Sampling profiles of a benchmark's processes with py-spy, summarized by function.

`record` starts one `py-spy record` per process (raw collapsed stacks, --nonblocking so
the process never stops) and waits for them; `summarize` turns a raw file into the
functions that hold the most samples, by self time and by inclusive time. Where the
benchmarks ask "where does this process's CPU go", this answers with shares of samples.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections import Counter
from pathlib import Path


def available() -> bool:
    return shutil.which("py-spy") is not None


def record(pids: dict[str, int], seconds: float, out_dir: Path, delay_s: float = 0.0,
           rate: int = 200) -> dict[str, Path]:
    """Profiles each named pid for `seconds` after `delay_s`; returns the raw files. Blocks:
    run it in a thread beside the load."""
    time.sleep(delay_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, files = [], {}
    for name, pid in pids.items():
        files[name] = out_dir / f"{name}.raw"
        procs.append(subprocess.Popen(
            ["py-spy", "record", "-p", str(pid), "-d", str(seconds), "-r", str(rate),
             "-f", "raw", "-o", str(files[name]), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
    for p in procs:
        p.wait(timeout=seconds + 60)
    return {k: v for k, v in files.items() if v.exists()}


def _frame(f: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    name, _, where = f.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def summarize(raw: Path, top: int = 20) -> dict:
    """Shares of samples (percent) per function: `self` (the innermost frame) and
    `inclusive` (anywhere on the stack, once per sample)."""
    total, incl, own = 0, Counter(), Counter()
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        for f in set(frames):
            incl[f] += count
        own[frames[-1]] += count

    def shares(c: Counter) -> list[list]:
        return [[round(100 * v / max(1, total), 1), k] for k, v in c.most_common(top)]

    return {"samples": total, "self": shares(own), "inclusive": shares(incl)}
