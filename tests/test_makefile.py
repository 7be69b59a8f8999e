"""The Makefile's install and clean rules, run on a copy of it in a temporary folder: the
checkout's own .venv and .run are never touched. What install would do is read with `make -n`
over a .venv of empty files whose dates and torch stamp stand for an installed one; where
install or clean runs for real, .venv/bin/python hands over to this checkout's interpreter
and no pip exists there, so any install would fail the test."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOUR = 3600


@pytest.fixture
def repo(tmp_path) -> Path:
    (tmp_path / "infra").mkdir()
    shutil.copy(ROOT / "Makefile", tmp_path)
    shutil.copy(ROOT / "infra" / "cluster.mk", tmp_path / "infra")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    return tmp_path


def make(repo: Path, *args: str) -> subprocess.CompletedProcess:
    # a TORCH of the caller's (`make test TORCH=...` passes it down in MAKEFLAGS) is not ours
    env = {k: v for k, v in os.environ.items()
           if k not in ("TORCH", "MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    return subprocess.run(["make", "-C", str(repo), "--no-print-directory", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def installed(repo: Path, torch_spec: str | None = "torch==2.13.0") -> Path:
    """.venv as `make install` leaves it (torch_spec None: from before the torch stamp):
    pyproject.toml older than the package's script."""
    venv = repo / ".venv"
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@"\n')
    python.chmod(0o755)
    (venv / "bin" / "tandem").touch()  # not executable: `make stop` leaves it alone
    if torch_spec is not None:
        (venv / "torch-spec").write_text(torch_spec + "\n")
    now = time.time()
    for path, age in [(repo / "pyproject.toml", 2 * HOUR), (python, HOUR),
                      (venv / "bin" / "tandem", HOUR)]:
        os.utime(path, (now - age, now - age))
    return venv


def test_install_on_a_fresh_checkout_makes_the_venv_then_torch_then_the_package(repo):
    out = make(repo, "-n", "install").stdout
    steps = ["-m venv .venv", 'pip install -q "torch==2.13.0"', 'pip install -q -e ".[dev]"']
    assert all(s in out for s in steps), out
    assert [out.index(s) for s in steps] == sorted(out.index(s) for s in steps), out


def test_install_with_nothing_changed_installs_nothing(repo):
    installed(repo)
    for args in ([], ["TORCH=torch==2.13.0"]):  # the spec recorded, given or not
        out = make(repo, "-n", "install", *args).stdout
        assert "pip" not in out, (args, out)


def test_another_torch_reinstalls_torch_and_only_torch(repo):
    installed(repo)
    out = make(repo, "-n", "install", "TORCH=torch").stdout
    assert "pip uninstall -y -q torch" in out and 'pip install -q "torch"' in out, out
    assert 'install -q -e' not in out and "-m venv" not in out, out
    # once installed, a plain make (the default TORCH) keeps that torch
    (repo / ".venv" / "torch-spec").write_text("torch\n")
    assert "pip" not in make(repo, "-n", "install").stdout


def test_a_newer_pyproject_reinstalls_the_package_and_only_it(repo):
    installed(repo)
    os.utime(repo / "pyproject.toml")  # now: newer than the script
    out = make(repo, "-n", "install").stdout
    assert 'pip install -q -e ".[dev]"' in out and "torch" not in out, out


def test_a_venv_from_before_the_stamp_keeps_its_torch_unless_torch_is_given(repo):
    """For real: the venv's python imports torch, so install records that and installs
    nothing (there is no pip); a given TORCH then reinstalls."""
    venv = installed(repo, torch_spec=None)
    res = make(repo, "install")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "keeping its torch" in res.stdout
    assert (venv / "torch-spec").read_text().strip() == "unrecorded"
    assert 'pip install -q "torch==2.13.0"' in make(repo, "-n", "install",
                                                    "TORCH=torch==2.13.0").stdout


def local_run(repo: Path, pid: int) -> Path:
    """.run of a local cluster with this pid, and the folder of a `ray up` cluster."""
    run = repo / ".run"
    (run / "cluster").mkdir(parents=True)
    (run / "state.json").write_text(json.dumps({"pid": pid, "ready": True,
                                                "url": "http://127.0.0.1:8000"}))
    (run / "ray_auth_token").write_text("local")
    (run / "cluster" / "ray_auth_token").write_text("ray up")
    return run


def test_clean_deletes_nothing_of_a_cluster_still_alive(repo):
    """The venv cannot stop it here (its tandem does not run), as after a failed stop."""
    venv = installed(repo)
    live = subprocess.Popen(["sleep", "300"])
    try:
        run = local_run(repo, live.pid)
        res = make(repo, "clean")
        assert res.returncode != 0 and f"pid {live.pid}" in res.stderr, res.stderr
        for kept in (run / "state.json", run / "ray_auth_token",
                     run / "cluster" / "ray_auth_token", venv / "bin" / "python"):
            assert kept.exists(), kept
    finally:
        live.kill()
        live.wait()


def test_clean_of_a_dead_cluster_keeps_only_the_ray_up_folder(repo):
    venv = installed(repo)
    gone = subprocess.Popen(["true"])
    gone.wait()
    run = local_run(repo, gone.pid)
    res = make(repo, "clean")
    assert res.returncode == 0, res.stdout + res.stderr
    assert not venv.exists() and sorted(p.name for p in run.iterdir()) == ["cluster"]
    assert (run / "cluster" / "ray_auth_token").read_text() == "ray up"
    shutil.rmtree(run / "cluster")  # as `make cluster-down` leaves it: .run goes
    assert make(repo, "clean").returncode == 0 and not run.exists()
