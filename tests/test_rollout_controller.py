"""The rollout controller on the session cluster: a canary app of its own, its model served
by one stable and one canary replica, traffic from threads. A good canary is promoted
through the plan's steps, with no failed request; the core's rollback decision."""

from __future__ import annotations

import copy
import threading
import time
from urllib.parse import urlparse

import httpx
import pytest

from cluster import rollout_controller as rc
from cluster.rollout import CANARY, STABLE, RolloutPlan
from tests.conftest import TEST_CONFIG

MODEL = "tandem-rollout"
APP, PREFIX = "rollout", "/rollout-app"


def stable_doc() -> dict:
    import yaml

    doc = yaml.safe_load(TEST_CONFIG.read_text())
    app = rc.tandem_app(doc)
    app.update(name=APP, route_prefix=PREFIX)
    args = app["args"]
    args["model"]["name"] = MODEL
    args["model_pool"].update(num_replicas=1, num_gpus=0)
    args["frontend_pool"].update(num_replicas=1)
    return doc


def new_doc() -> dict:  # the new version: an engine change, same checkpoint
    doc = copy.deepcopy(stable_doc())
    rc.tandem_app(doc)["args"]["engine"]["max_num_seqs"] = 16
    return doc


@pytest.fixture(scope="module")
def rollout_app(app_url):
    from ray import serve

    from cluster.local_cluster import deploy

    port = urlparse(app_url).port
    doc = stable_doc()
    deploy(doc, rc.app_config(doc), http_port=port)
    yield f"{app_url}{PREFIX}", doc, port
    try:
        import ray

        ray.kill(rc.get(APP))
    except ValueError:
        pass
    serve.delete(APP)


def ask(http: httpx.Client, url: str) -> str:
    body = {"model": MODEL, "prompt": "rollout", "max_tokens": 3, "ignore_eos": True}
    r = http.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.headers["x-tandem-version"]


class Load:
    """Threads sending requests without a conversation key until stopped."""

    def __init__(self, url: str, n: int = 2):
        self.url, self.versions, self.failures = url, [], []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(n)]

    def _run(self) -> None:
        with httpx.Client() as http:
            while not self.stop.is_set():
                try:
                    self.versions.append(ask(http, self.url))
                except (AssertionError, httpx.HTTPError) as err:
                    self.failures.append(repr(err))

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_):
        self.stop.set()
        for t in self.threads:
            t.join()


def wait_for(controller, pred, timeout_s: float) -> dict:
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        status = ray.get(controller.status.remote())
        if pred(status) or time.monotonic() > deadline:
            return status
        time.sleep(0.3)


# a short plan; latency bounds loose (a loaded 2-core machine), the mechanics are the test
JUDGE = {"min_requests": 3, "min_latency_samples": 3, "max_latency_ratio": 20,
         "latency_slack_s": 2.0}


def canary_deployments() -> list[str]:
    from ray import serve

    return [d for d in serve.status().applications[APP].deployments if d.endswith("-canary")]


def metrics_text(stable: int, canary: int, canary_5xx: int) -> str:
    line = 'tandem_http_requests_total{{model="{}",version="{}",status="{}"}} {}\n'
    return ("# TYPE tandem_http_requests counter\n" + line.format(MODEL, STABLE, 200, stable)
            + line.format(MODEL, CANARY, 200, canary) + line.format(MODEL, CANARY, 500,
                                                                   canary_5xx))


def test_the_core_rolls_back_on_canary_errors_since_the_step_began_and_redeploys_once():
    calls = []
    core = rc.RolloutCore({"steps": [{"share": 0.5, "hold_s": 1}, {"share": 1.0, "hold_s": 1}],
                           "judge": {"min_requests": 5}}, MODEL, lambda: calls.append(1), now=0)
    core.texts["a"] = metrics_text(100, 0, 50)  # before the rollout: not judged
    core.tick(1)
    assert core.rollout.state == "running" and core.verdict.startswith("wait")
    core.texts["a"] = metrics_text(120, 9, 51)  # 1 of 10 in the window failed
    core.tick(2)
    assert core.rollout.state == "rolled_back" and core.rollout.share == 0.0
    core.after_end()
    core.after_end()
    assert calls == [1] and core.status()["redeploy"] == "redeployed without the canary"


def test_a_good_canary_is_promoted_through_the_steps(rollout_app):
    url, doc, port = rollout_app
    plan = RolloutPlan.model_validate({"steps": [{"share": 0.3, "hold_s": 2},
                                                 {"share": 1.0, "hold_s": 2}],
                                       "judge": JUDGE})
    controller = rc.begin(doc, new_doc(), plan, http_port=port)
    assert canary_deployments()
    with Load(url) as load:
        status = wait_for(controller, lambda s: s["state"] != "running", 60)
        assert status["state"] == "promoted", status
        time.sleep(2.5)  # the frontends' cached share (1 s) follows
        n = len(load.versions)
        time.sleep(2)
    assert not load.failures, load.failures[:3]
    assert status["share"] == 1.0 and "tandem up --config" in status["message"]
    assert status["history"][:2] == ["step 0 (share 0.3) passed", "step 1 (share 1.0) passed"]
    assert STABLE in load.versions and CANARY in load.versions
    assert set(load.versions[n:]) == {CANARY}, load.versions[n:]
