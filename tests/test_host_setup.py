"""infra/host-setup.sh (what `ray up` runs on every host) with the forms ~/tandem-venv takes:
a link to a working venv, a real venv folder, a link that leads nowhere, a link to an empty
folder. Each run has a home of its own; where it is pointed at a venv, that is this checkout's,
which it only reads."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "infra" / "host-setup.sh"


def host_setup(home: Path, venv: Path) -> subprocess.CompletedProcess:
    # no pip configuration and no index: nothing is downloaded, and an install that would
    # need one fails at once
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), TANDEM_VENV=str(venv), TANDEM_SRC=str(ROOT),
               PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")
    return subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env,
                          timeout=300)


def assert_installed_nothing(res: subprocess.CompletedProcess, home: Path, venv: Path) -> None:
    assert res.returncode == 0, res.stdout + res.stderr
    assert not (home / ".tandem" / "installed-pyproject.toml").exists()  # no pip install -e
    assert f"[ -f {venv}/bin/activate ]" in (home / ".bashrc").read_text()


def test_a_link_to_a_working_venv_is_used_as_it_is(tmp_path):
    venv = tmp_path / "tandem-venv"
    venv.symlink_to(ROOT / ".venv")
    res = host_setup(tmp_path, venv)
    assert_installed_nothing(res, tmp_path, venv)
    assert venv.is_symlink() and venv.readlink() == ROOT / ".venv"


def test_a_real_venv_folder_is_used_as_it_is(tmp_path):
    venv = ROOT / ".venv"
    assert not venv.is_symlink()
    assert_installed_nothing(host_setup(tmp_path, venv), tmp_path, venv)


def made_a_venv(res: subprocess.CompletedProcess, where: Path) -> None:
    """A venv is made, then the run stops at installing torch (there is no index): as far
    as these tests go."""
    assert (where / "bin" / "python").exists(), res.stderr
    assert subprocess.run([where / "bin" / "python", "-c", "pass"]).returncode == 0
    assert res.returncode != 0 and "torch" in res.stderr, res.stderr


def test_a_link_that_leads_nowhere_gives_way_to_a_venv(tmp_path):
    """As a link into a checkout that the host cannot see: `python3 -m venv` used to die on
    it with "File exists"."""
    venv = tmp_path / "tandem-venv"
    venv.symlink_to(tmp_path / "gone" / ".venv")
    res = host_setup(tmp_path, venv)
    assert "which does not exist: replacing the link" in res.stderr, res.stderr
    assert not venv.is_symlink()
    made_a_venv(res, venv)


def test_a_link_to_an_empty_folder_gets_the_venv_made_there(tmp_path):
    """As a link to shared storage: `python3 -m venv` refuses a link even to a folder."""
    (tmp_path / "shared").mkdir()
    venv = tmp_path / "tandem-venv"
    venv.symlink_to(tmp_path / "shared")
    res = host_setup(tmp_path, venv)
    assert venv.is_symlink() and venv.readlink() == tmp_path / "shared"
    made_a_venv(res, tmp_path / "shared")
