"""Progress of the long commands: tqdm on stderr (stdout stays the command's own output),
off when stderr is no terminal unless TANDEM_PROGRESS=1 forces it."""

from __future__ import annotations

import os
import subprocess
import sys

from cluster.bench.progress import progress


def test_model_init_shows_its_progress_on_stderr_when_forced(tmp_path):
    out = tmp_path / "tiny"
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "model", "init", "--out", str(out)],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "TANDEM_PROGRESS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"default model written to {out}\n"
    assert "building tiny" in r.stderr and "100%" in r.stderr and "6/6" in r.stderr
    assert (out / "model.safetensors").exists()


def test_bars_are_off_without_a_terminal_unless_forced(monkeypatch):
    assert not sys.stderr.isatty()  # pytest captures it
    monkeypatch.delenv("TANDEM_PROGRESS", raising=False)
    with progress(total=3) as bar:
        assert bar.disable
    monkeypatch.setenv("TANDEM_PROGRESS", "1")
    with progress(total=3) as bar:
        assert not bar.disable
    monkeypatch.setenv("TANDEM_PROGRESS", "0")
    with progress(total=3) as bar:
        assert bar.disable
