"""The data-plane benchmark runs end to end on a local cluster it starts, and shows the
data plane's shape: about one engine message per step, not one per token."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_path_benchmark_offline_and_served_side_by_side(model_dir):
    out = subprocess.run(
        [sys.executable, "-m", "cluster.bench.path", "--concurrency", "8", "--num-prompts",
         "16", "--input-len", "32", "--output-len", "24", "--client-processes", "2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout)  # stdout carries the JSON alone
    served, offline = res["served"], res["offline"]
    assert served["errors"] == 0 and served["tokens"] == offline["tokens"] == 16 * 24
    assert served["client_processes"] == 2  # each its share of the requests, all counted
    assert served["output_tok_s"] > 0 and 0 < res["served_vs_offline"]
    assert set(served["cpu_s_per_1k_tokens"]) == {"proxy", "frontend", "model_replica",
                                                   "engine_core"}
    # 8 streams per step share one message: well under one message per token
    assert 0 < served["engine_messages_per_token"] < 0.5
    assert served["ttft_ms"]["p50"] > 0 and served["tpot_ms"]["p50"] > 0


def test_py_spy_summary_counts_self_and_inclusive_shares(tmp_path):
    """A raw py-spy file (collapsed stacks and their sample counts) gives each function's
    share of samples: innermost frame for self time, once per stack for inclusive time
    (a recursive frame counts once)."""
    from cluster.bench import pyspy

    raw = tmp_path / "core.raw"
    raw.write_text(
        "main (/a/core.py:10);step (/a/engine.py:5);forward (/a/model.py:7) 6\n"
        "main (/a/core.py:10);step (/a/engine.py:5);pack (/a/protocol.py:3) 3\n"
        "main (/a/core.py:10);main (/a/core.py:10) 1\n")
    s = pyspy.summarize(raw)
    assert s["samples"] == 10
    assert s["self"][:2] == [[60.0, "forward (model.py:7)"], [30.0, "pack (protocol.py:3)"]]
    incl = dict((k, v) for v, k in s["inclusive"])
    assert incl["main (core.py)"] == 100.0 and incl["step (engine.py)"] == 90.0


def test_stack_sampler_sees_where_a_thread_spends_its_time(tmp_path):
    """The in-process sampler (the engine core's, where py-spy may not attach): a thread
    that spends most of its time in one function shows that function on top, in a file
    the py-spy summary reads; a window's samples are the file's growth."""
    import threading
    import time

    from cluster.bench import pyspy
    from cluster.stack_sampler import StackSampler

    def hot(until: float) -> None:
        while time.monotonic() < until:
            sum(range(1000))

    def cool(until: float) -> None:
        while time.monotonic() < until:
            time.sleep(0.001)

    def release() -> None:
        time.sleep(0)  # gives the GIL up, as a socket send or a CUDA event does

    def hot_then_release(until: float) -> None:
        while time.monotonic() < until:
            t = time.monotonic() + 0.004
            while time.monotonic() < t:
                sum(range(1000))
            release()

    ready = threading.Event()
    sampler_box = {}

    def work() -> None:
        sampler_box["s"] = StackSampler(tmp_path / "w.raw", threading.get_ident(),
                                        interval_s=0.002, flush_s=0.1).start()
        ready.set()
        hot(time.monotonic() + 0.6)
        cool(time.monotonic() + 0.2)
        hot_then_release(time.monotonic() + 0.4)

    t = threading.Thread(target=work)
    t.start()
    ready.wait()
    t.join()
    sampler_box["s"].stop()
    s = pyspy.summarize(tmp_path / "w.raw")
    assert 9000 < s["samples"] < 15000  # 0.1 ms units: the thread's 1.2 s, weighted by time
    incl = {k.split(" (")[0]: v for v, k in s["inclusive"]}
    assert incl["work"] > 90 and incl["hot"] > 40 and incl["hot"] > 2 * incl.get("cool", 0)
    # Python time before a call that gives the GIL up is not charged to that call
    assert incl["release"] < incl["hot_then_release"] / 4
    # the same file read twice: the window between holds nothing
    assert pyspy.summarize(tmp_path / "w.raw", before=pyspy.read(tmp_path / "w.raw"))[
        "samples"] == 0


def test_py_spy_record_reports_why_it_could_not_profile(tmp_path):
    """A pid py-spy cannot profile (here: one that is gone; on the lent GPU machine it gave
    no profile, reason unread) comes back with py-spy's own error, not as an empty profile."""
    from cluster.bench import pyspy
    from tests.skips import skip_or_fail

    if not pyspy.available():
        skip_or_fail("py-spy is not installed (pip install -e .[dev])")
    files, errors = pyspy.record({"gone": 2**22 + 7}, 1, tmp_path)
    assert files == {} and errors["gone"] and "exit" not in errors["gone"][:4]
