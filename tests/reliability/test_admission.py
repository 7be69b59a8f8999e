"""Admission on a second app of the session cluster: API keys (with rotation), body size,
bounded in-flight requests (429 + Retry-After) and deadlines that free KV blocks."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from deployments.app import build
from tests.helpers import wait_kv_free

PREFIX = "/guarded"
MODEL = "tandem-tiny"


@pytest.fixture(scope="module")
def guarded(app_url, app_config, tmp_path_factory):
    keys = tmp_path_factory.mktemp("keys") / "api_keys"
    keys.write_text("# rotated by the operator\nkey-one\nkey-two\n")
    _, cfg = app_config
    cfg = cfg.model_copy(deep=True)
    cfg.ingress.api_keys_file = str(keys)
    cfg.ingress.max_body_bytes = 4096
    cfg.ingress.max_in_flight = 2
    cfg.model_pool.num_replicas, cfg.model_pool.num_gpus = 1, 0
    serve.run(build(cfg), name="guarded", route_prefix=PREFIX)
    yield f"{app_url}{PREFIX}", keys
    serve.delete("guarded")


def post(url, key="key-one", **kw):
    headers = kw.pop("headers", {})
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(f"{url}/v1/completions", headers=headers, timeout=60, **kw)


BODY = {"model": MODEL, "prompt": "hello", "max_tokens": 4}


def test_api_keys_and_rotation(guarded):
    url, keys = guarded
    assert post(url, json=BODY).status_code == 200
    assert post(url, key="key-two", json=BODY).status_code == 200
    for bad in (None, "nope"):
        r = post(url, key=bad, json=BODY)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{url}/health").status_code == 200  # open by default
    assert httpx.get(f"{url}/v1/models").status_code == 401
    keys.write_text("key-three\n")  # rotation without a restart
    # every frontend replica re-reads the file within a second or so of its next request:
    # wait until consecutive requests (spread over the replicas) all see the new keys
    deadline, good = time.monotonic() + 15, 0
    while good < 6:
        assert time.monotonic() < deadline, "the key file's rotation did not reach the app"
        ok = post(url, key="key-one", json=BODY).status_code == 401 and \
            post(url, key="key-three", json=BODY).status_code == 200
        good = good + 1 if ok else 0
        time.sleep(0.2)
    keys.write_text("key-one\nkey-two\n")
    time.sleep(1.2)


def test_body_too_large_is_413(guarded):
    url, _ = guarded
    r = post(url, json={**BODY, "prompt": "x" * 10_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_over_capacity_gets_429_with_retry_after(guarded):
    url, _ = guarded
    slow = {**BODY, "max_tokens": 200, "ignore_eos": True}

    async def burst():
        async with httpx.AsyncClient(timeout=120) as c:
            return await asyncio.gather(*(c.post(
                f"{url}/v1/completions", json=slow,
                headers={"Authorization": "Bearer key-one"}) for _ in range(6)))

    codes = [r.status_code for r in asyncio.run(burst())]
    assert set(codes) <= {200, 429} and codes.count(200) >= 2 and 429 in codes, codes
    busy = next(r for r in asyncio.run(burst()) if r.status_code == 429)
    assert busy.headers["retry-after"] == "1" and busy.json()["error"]["type"]
    assert post(url, json=BODY).status_code == 200  # capacity comes back


@pytest.mark.parametrize("stream", [False, True])
def test_deadline_aborts_and_frees_kv(guarded, stream):
    url, _ = guarded
    body = {**BODY, "max_tokens": 360, "ignore_eos": True, "stream": stream,
            "prompt": "a deadline " * 30}
    t0 = time.monotonic()
    r = post(url, json=body, headers={"X-Request-Timeout": "0.5"})
    assert time.monotonic() - t0 < 10
    if stream:
        assert r.status_code == 200
        events = [ln for ln in r.text.splitlines() if ln.startswith("data: ")]
        assert events[-1] == "data: [DONE]" and "request_timeout" in events[-2]
    else:
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
    stats = wait_kv_free(app="guarded")
    assert stats and all(s["kv_used"] == 0 for s in stats), stats


def test_bad_timeout_header_is_400(guarded):
    url, _ = guarded
    r = post(url, json=BODY, headers={"X-Request-Timeout": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "X-Request-Timeout"


def _send_and_hang_up(url: str, body: dict) -> None:
    """A client that sends a whole request and leaves before any byte of the answer."""
    import json
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    data = json.dumps(body).encode()
    head = (f"POST {u.path}/v1/completions HTTP/1.1\r\nHost: {u.hostname}\r\n"
            "Authorization: Bearer key-one\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode()
    with socket.create_connection((u.hostname, u.port)) as s:
        s.sendall(head + data)
        s.shutdown(socket.SHUT_RDWR)


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_before_the_body_frees_its_slot_and_generation(guarded, stream):
    """Clients that hang up before the response starts must not keep their admission slots
    (the guarded app admits 2) nor their generations (KV blocks) until the deadline."""
    url, _ = guarded
    body = {**BODY, "max_tokens": 400, "ignore_eos": True, "stream": stream,
            "prompt": "gone " * 30}
    for _ in range(3):
        _send_and_hang_up(url, body)
        time.sleep(0.3)

    async def pair():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(
                f"{url}/v1/completions", json=BODY,
                headers={"Authorization": "Bearer key-one"}) for _ in range(2)))

    deadline = time.monotonic() + 10  # the slots come back soon, not at the deadline
    while True:
        codes = [r.status_code for r in asyncio.run(pair())]
        if codes == [200, 200] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert codes == [200, 200], codes
    stats = wait_kv_free(5, app="guarded")
    assert stats and all(s["kv_used"] == 0 and s["running"] == 0 for s in stats), stats
