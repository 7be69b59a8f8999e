"""tests/skips.py: a skip locally, a failure under CI=true; and no test outside tests/gpu skips
around it (those are kept out of CI by the gpu marker instead)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.skips import skip_or_fail

TESTS = Path(__file__).resolve().parent


def test_skip_or_fail_skips_locally(monkeypatch):
    for value in (None, "", "false", "1"):  # only CI=true is CI
        if value is None:
            monkeypatch.delenv("CI", raising=False)
        else:
            monkeypatch.setenv("CI", value)
        with pytest.raises(pytest.skip.Exception, match="no prometheus"):
            skip_or_fail("no prometheus")


def test_skip_or_fail_fails_in_ci(monkeypatch):
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="no prometheus"):
        skip_or_fail("no prometheus")


def skips_in(path: Path) -> list[str]:
    """`file:line` of each pytest.skip / importorskip call and skip / skipif mark."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Attribute) and node.attr in ("skip", "skipif", "importorskip"):
            base = node.value
            if (isinstance(base, ast.Name) and base.id == "pytest") or (
                    isinstance(base, ast.Attribute) and base.attr == "mark"):
                out.append((node.lineno, f"{path.relative_to(TESTS.parent)}:{node.lineno}"))
    return [hit for _, hit in sorted(out)]


def test_tests_outside_gpu_skip_only_through_skip_or_fail():
    own = {TESTS / "skips.py", Path(__file__).resolve()}
    found = [hit for path in sorted(TESTS.rglob("*.py"))
             if not path.is_relative_to(TESTS / "gpu") and path not in own
             for hit in skips_in(path)]
    assert not found, f"skips that CI would not see fail (use tests.skips.skip_or_fail): {found}"
