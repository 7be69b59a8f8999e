"""The OpenAI-surface load benchmark against the session's app, and the CPU engine's peer
benchmark (tandem's side: vLLM is not part of the test environment) run end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", *args, "--json"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


def test_surface_benchmark_plain_and_mixed(app_url):
    res = run("cluster.bench.surface", "--url", app_url, "--concurrency", "4",
              "--num-prompts", "8", "--input-len", "16", "--output-len", "16")
    for load in ("plain", "mixed"):
        assert res[load]["errors"] == 0 and res[load]["tokens"] > 0
    assert res["plain"]["tokens"] == 8 * 16
    assert res["mixed_vs_plain"] > 0 and res["workload"]["featured_share"] == 0.25


def test_cpu_peer_benchmark_runs_our_side(model_dir):
    res = run("cluster.bench.cpu_peer", "--skip-peer", "--concurrency", "1", "4",
              "--input-len", "16", "--output-len", "8")
    assert [r["concurrency"] for r in res["results"]] == [1, 4]
    assert all(r["tandem_tok_s"] > 0 for r in res["results"])
