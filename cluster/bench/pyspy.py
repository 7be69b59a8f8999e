"""Sampling profiles of a benchmark's processes with py-spy, summarized by function.

`record` starts one `py-spy record` per process (raw collapsed stacks, --nonblocking so
the process never stops) and waits for them; `summarize` turns a raw file into the
functions that hold the most samples, by self time and by inclusive time. Where the
benchmarks ask "where does this process's CPU go", this answers with shares of samples.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path


def executable() -> str | None:
    """py-spy on PATH, or beside this interpreter (a venv's bin that is not on PATH)."""
    return shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))


def available() -> bool:
    return executable() is not None


def record(pids: dict[str, int], seconds: float, out_dir: Path, delay_s: float = 0.0,
           rate: int = 200) -> tuple[dict[str, Path], dict[str, str]]:
    """Profiles each named pid for `seconds` after `delay_s`; returns the raw files and, for
    each pid py-spy could not profile, its error (where ptrace is refused, say). Blocks: run
    it in a thread beside the load."""
    time.sleep(delay_s)
    out_dir.mkdir(parents=True, exist_ok=True)
    procs, files = {}, {}
    for name, pid in pids.items():
        files[name] = out_dir / f"{name}.raw"
        procs[name] = subprocess.Popen(
            [executable() or "py-spy", "record", "-p", str(pid), "-d", str(seconds),
             "-r", str(rate), "-f", "raw", "-o", str(files[name]), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    errors = {}
    for name, p in procs.items():
        _, err = p.communicate(timeout=seconds + 60)
        if p.returncode != 0 or not files[name].exists():
            errors[name] = (err or f"exit {p.returncode}").strip()[:300]  # its first lines
    return {k: v for k, v in files.items() if v.exists()}, errors


def _frame(f: str) -> str:
    # "func (path/to/file.py:123)" -> "func (file.py:123)"
    name, _, where = f.partition(" (")
    return f"{name} ({where.rsplit('/', 1)[-1]}" if where else name


def _function(frame: str) -> str:
    # "func (file.py:123)" -> "func (file.py)": inclusive time is a function's, all its lines
    head, sep, line = frame.rpartition(":")
    return f"{head})" if sep and line.rstrip(")").isdigit() else frame


def read(raw: Path) -> Counter:
    """Sample counts per collapsed stack (empty where the file is not there yet)."""
    counts: Counter = Counter()
    if not raw.exists():
        return counts
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if n.isdigit():
            counts[stack] += int(n)
    return counts


def summarize(raw: Path, top: int = 20, before: Counter | None = None) -> dict:
    """Shares of samples (percent): `self` per line (the innermost frame) and `inclusive`
    per function (anywhere on the stack, once per sample). before: counts read earlier from
    the same growing file, taken off (the samples of a window)."""
    counts = read(raw)
    if before:
        counts.subtract(before)
    total, incl, own = 0, Counter(), Counter()
    for stack, count in counts.items():
        if count <= 0:
            continue
        total += count
        frames = [_frame(f) for f in stack.split(";")]
        for f in {_function(f) for f in frames}:
            incl[f] += count
        own[frames[-1]] += count

    def shares(c: Counter) -> list[list]:
        return [[round(100 * v / max(1, total), 1), k] for k, v in c.most_common(top)]

    return {"samples": total, "self": shares(own), "inclusive": shares(incl)}
