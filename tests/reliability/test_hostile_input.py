"""Hostile input against the real ingress: each gets a clear OpenAI-style answer (4xx with
{"error": {...}}, or a normal completion), never a 500 or a hang, and the replicas that
served them are still the same processes afterwards. Then schemathesis fuzzes the ingress
from its own OpenAPI schema."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import httpx
import pytest

from tests.helpers import replica_actors
from tests.skips import skip_or_fail

MODEL = "tandem-tiny"
OK = {"model": MODEL, "prompt": "hello", "max_tokens": 4}


def body(**kw) -> bytes:
    return json.dumps(OK | kw).encode()


def raw(text: str) -> bytes:
    return text.encode()


NESTED = b'{"model": "tandem-tiny", "prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
TEN_MB = body(prompt="x" * 10 * 2**20)

# (name, path, content, headers, expected status, OpenAI `param` or None)
CASES = [
    ("huge max_tokens", "/v1/completions", body(max_tokens=10**30), {}, 400, "max_tokens"),
    ("huge seed", "/v1/completions", body(seed=10**30), {}, 400, "seed"),
    ("huge top_k", "/v1/completions", body(top_k=10**30), {}, 400, "top_k"),
    ("huge temperature", "/v1/completions", body(temperature=1e308), {}, 400, "temperature"),
    ("huge token id", "/v1/completions", body(prompt=[10**30]), {}, 400, "prompt"),
    ("huge stop token id", "/v1/completions", body(stop_token_ids=[10**30]), {}, 400,
     "stop_token_ids"),
    ("negative max_tokens", "/v1/completions", body(max_tokens=-5), {}, 400, "max_tokens"),
    ("zero max_tokens", "/v1/completions", body(max_tokens=0), {}, 400, "max_tokens"),
    ("negative temperature", "/v1/completions", body(temperature=-1), {}, 400, "temperature"),
    ("zero top_p", "/v1/completions", body(top_p=0), {}, 400, "top_p"),
    ("NaN top_p", "/v1/completions", raw('{"model": "tandem-tiny", "prompt": "x", '
                                         '"top_p": NaN}'), {}, 400, "top_p"),
    ("Infinity temperature", "/v1/completions",
     raw('{"model": "tandem-tiny", "prompt": "x", "temperature": Infinity}'), {}, 400,
     "temperature"),
    ("lone surrogate prompt", "/v1/completions", raw('{"model": "tandem-tiny", '
                                                     '"prompt": "\\ud800"}'), {}, 400, "prompt"),
    ("lone surrogate chat", "/v1/chat/completions",
     raw('{"model": "tandem-tiny", "messages": [{"role": "user", "content": "\\udfff"}]}'),
     {}, 400, "messages"),
    ("NUL and bidi controls", "/v1/completions",
     body(prompt="a\u0000b\u202e\u200d\u2066x\ufeff"), {}, 200, None),
    ("emoji and combining marks", "/v1/completions",
     body(prompt="👩🏽‍🚀" * 5 + "e" + "\u0301" * 60), {}, 200, None),
    ("invalid UTF-8 bytes", "/v1/completions", b'{"model": "tandem-tiny", "prompt": "\xff\xfe"}',
     {}, 400, None),
    ("deeply nested JSON", "/v1/completions", NESTED, {}, 400, None),
    ("JSON array body", "/v1/completions", b"[1, 2, 3]", {}, 400, None),
    ("form-encoded body", "/v1/completions", b"model=tandem-tiny&prompt=hi",
     {"content-type": "application/x-www-form-urlencoded"}, 400, None),
    ("empty body", "/v1/completions", b"", {}, 400, None),
    ("10 MB body", "/v1/completions", TEN_MB, {}, 413, None),
    ("wrong type for stream", "/v1/completions", body(stream="yes"), {}, 400, "stream"),
    ("object as prompt", "/v1/completions", body(prompt={"a": 1}), {}, 400, "prompt"),
    ("thousands of stop strings", "/v1/completions",
     body(stop=[f"stop{i}" for i in range(3000)], max_tokens=8), {}, 200, None),
    ("too many stop strings", "/v1/completions", body(stop=["s"] * 5000), {}, 400, "stop"),
    ("huge user field", "/v1/completions", body(user="u" * 500_000), {}, 200, None),
    ("unknown path", "/v1/engines", b"{}", {}, 404, None),
]


@pytest.fixture(scope="module")
def replicas_before(app_url):
    return {d: {a.actor_id for a in replica_actors(d)} for d in ("Ingress", "ModelReplica")}


@pytest.mark.parametrize(("name", "path", "content", "headers", "status", "param"), CASES,
                         ids=[c[0] for c in CASES])
def test_hostile_input(app_url, replicas_before, name, path, content, headers, status, param):
    r = httpx.post(f"{app_url}{path}", content=content,
                   headers={"content-type": "application/json", **headers}, timeout=60)
    assert r.status_code == status, (name, r.status_code, r.text[:300])
    doc = r.json()
    if status == 200:
        assert doc["choices"][0]["finish_reason"] in ("stop", "length")
        return
    err = doc["error"]
    assert err["message"] and err["type"], doc
    if param:
        assert (err["param"] or "").startswith(param), doc


def test_wrong_method_is_405_in_openai_shape(app_url):
    r = httpx.get(f"{app_url}/v1/completions", timeout=30)
    assert r.status_code == 405 and r.json()["error"]["message"]


def test_replicas_survived_the_matrix(app_url, replicas_before, client):
    after = {d: {a.actor_id for a in replica_actors(d)} for d in replicas_before}
    assert after == replicas_before, "a replica died or restarted on hostile input"
    assert client.completions.create(model=MODEL, prompt="still here", max_tokens=4).choices


def test_schemathesis_finds_no_server_errors(app_url, tmp_path):
    """Property-based requests from the ingress's OpenAPI schema: no 5xx, no hang (each
    request has a deadline), responses in the documented shape. Capped at 90 s of
    requests: the suite's 20 minutes on the CI machine."""
    if shutil.which("schemathesis", path=str(sys.prefix) + "/bin") is None:
        skip_or_fail("schemathesis is not installed (pip install -e .[dev])")
    exe = shutil.which("schemathesis", path=str(sys.prefix) + "/bin")
    proc = subprocess.run(
        [exe, "--no-color", "run", f"{app_url}/openapi.json", "--checks", "not_a_server_error",
         "--max-examples", "40", "--request-timeout", "60", "--workers", "2", "--seed", "7",
         "--phases", "examples,coverage,fuzzing", "--max-time", "90",
         "--suppress-health-check", "all"],
        capture_output=True, text=True, timeout=400,
        env={"SCHEMATHESIS_HOOKS": "", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "/v1/completions" in proc.stdout
