"""Serve's health check on model replicas: an engine loop that broke outside any step is
noticed, its replica is replaced, and requests that met the broken replica before that are
retried on a healthy one (the router passes over the replica that failed them)."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from ray import serve

from deployments.app import build
from tests.helpers import replica_actors

pytestmark = pytest.mark.timeout(300)
BODY = {"model": "tandem-tiny", "prompt": "are you well?", "max_tokens": 6,
        "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def health_app(app_url, app_config):
    _, cfg = app_config
    cfg = cfg.model_copy(deep=True)
    cfg.engine.fault_injection = True
    cfg.model_pool.num_replicas, cfg.model_pool.num_gpus = 2, 0
    cfg.frontend_pool.num_replicas = 1
    cfg.router.policy = "least_load"
    serve.run(build(cfg), name="health", route_prefix="/health-app")
    yield f"{app_url}/health-app"
    serve.delete("health")


def ask_many(url: str, n: int) -> list[httpx.Response]:
    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            return await asyncio.gather(*(c.post(f"{url}/v1/completions", json=BODY)
                                          for _ in range(n)))

    return asyncio.run(main())


def replica_ids(app: str) -> set[str]:
    return {a.name.split("#")[-1] for a in replica_actors("ModelReplica", app)}


def test_broken_engine_loop_is_replaced_and_its_requests_go_elsewhere(health_app):
    expected = httpx.post(f"{health_app}/v1/completions", json=BODY, timeout=60).json()
    text = expected["choices"][0]["text"]
    before = replica_ids("health")
    assert len(before) == 2
    handle = serve.get_deployment_handle("ModelReplica", app_name="health")
    broken = handle.inject_fault.remote().result(timeout_s=30)
    assert broken in before
    # before Serve replaces it, the broken replica looks idle to the router: requests that
    # land there are refused at once and must be retried on the healthy one, not on it again
    answers = ask_many(health_app, 12)
    assert [r.status_code for r in answers] == [200] * 12, [r.text for r in answers]
    assert {r.json()["choices"][0]["text"] for r in answers} == {text}
    deadline = time.monotonic() + 90
    while True:
        now = replica_ids("health")
        if broken not in now and len(now) == 2:
            break
        assert time.monotonic() < deadline, f"the broken replica was not replaced: {now}"
        time.sleep(1)
    answers = ask_many(health_app, 8)
    assert [r.status_code for r in answers] == [200] * 8
    assert {r.json()["choices"][0]["text"] for r in answers} == {text}


def test_fault_injection_is_off_by_default(app_url):
    handle = serve.get_deployment_handle("ModelReplica", app_name="tandem")
    with pytest.raises(Exception, match="fault injection is off"):
        handle.inject_fault.remote().result(timeout_s=30)
