"""A canary beside the stable version in one app (config `canary`), on the session cluster:
the frontend sends it its share of requests, sticky per conversation key, labels each
version's metrics, and removing the canary fails no request."""

from __future__ import annotations

import math

import httpx
import pytest

from cluster.rollout import CANARY, SESSION_HEADER, STABLE, to_canary
from cluster.rollout_judge import snapshot_from_text

MODEL = "tandem-canary"  # its own app and model label
PREFIX = "/canary-app"
SHARE = 0.25


def config_with(base, share: float | None):
    cfg = base.model_copy(deep=True)
    cfg.model.name = MODEL
    cfg.model_pool.num_replicas, cfg.model_pool.num_gpus = 1, 0
    cfg.frontend_pool.num_replicas = 1
    if share is not None:
        # an engine change: the same checkpoint with a smaller batch
        cfg = cfg.model_validate({**cfg.model_dump(), "canary": {
            "model": cfg.model.model_dump(), "engine": {**cfg.engine.model_dump(),
                                                        "max_num_seqs": 16},
            "model_pool": cfg.model_pool.model_dump(), "share": share}})
    return cfg


@pytest.fixture(scope="module")
def canary_url(app_url, app_config):
    from ray import serve

    from deployments.app import build

    serve.run(build(config_with(app_config[1], SHARE)), name="canary",
              route_prefix=PREFIX)
    yield f"{app_url}{PREFIX}"
    serve.delete("canary")


def ask(http: httpx.Client, url: str, user: str | None = None, headers: dict | None = None
        ) -> str:
    body = {"model": MODEL, "prompt": "canary", "max_tokens": 3, "ignore_eos": True}
    if user:
        body["user"] = user
    r = http.post(f"{url}/v1/completions", json=body, headers=headers or {}, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-tandem-version"]


def test_the_split_follows_the_share_and_sticks_per_key(canary_url):
    with httpx.Client() as http:
        keyed = {f"user-{i}": ask(http, canary_url, f"user-{i}") for i in range(60)}
        # the rule, exactly: a key goes to the canary iff its bucket is under the share
        assert keyed == {k: CANARY if to_canary(k, SHARE) else STABLE for k in keyed}
        for k in list(keyed)[:5]:  # sticky, also by header
            assert ask(http, canary_url, k) == keyed[k]
            assert ask(http, canary_url, headers={SESSION_HEADER: k}) == keyed[k]
        n = 80
        random_canary = sum(ask(http, canary_url) == CANARY for _ in range(n))
        assert abs(random_canary - n * SHARE) < 4 * math.sqrt(n * SHARE * (1 - SHARE))
        text = http.get(f"{canary_url}/metrics").text
    canary = snapshot_from_text(text, CANARY, MODEL)
    stable = snapshot_from_text(text, STABLE, MODEL)
    want = sum(v == CANARY for v in keyed.values()) + 5 * (keyed[next(iter(keyed))] == CANARY)
    assert canary.requests >= want and canary.errors == 0 == stable.errors
    assert canary.requests + stable.requests >= 60 + 10 + n
    assert canary.ttft.count == canary.requests and canary.itl.count == canary.requests
