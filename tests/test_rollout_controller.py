"""The rollout controller on the session cluster: a rollout app of its own, its model
served by one stable replica, canaries of one replica in apps beside it, traffic from
threads. Starting a rollout restarts nothing of the stable app; a good canary is promoted
through the plan's steps and made the stable version with no failed request; a canary that
fails requests is rolled back on its own and stable's clients see no error; an abort under
streaming load fails no stream, the canary's ones included (its replicas drain), and a
request routed to the canary after its removal goes to stable."""

from __future__ import annotations

import copy
import json
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


def ask(http: httpx.Client, url: str) -> tuple[int, str]:
    body = {"model": MODEL, "prompt": "rollout", "max_tokens": 3, "ignore_eos": True}
    r = http.post(f"{url}/v1/completions", json=body, timeout=60)
    return r.status_code, r.headers.get("x-tandem-version", "?")


def stream(http: httpx.Client, url: str, max_tokens: int) -> tuple[int, str]:
    """A streamed completion read to its end; (200, version) only when whole."""
    body = {"model": MODEL, "prompt": "rollout", "max_tokens": max_tokens,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", f"{url}/v1/completions", json=body, timeout=120) as r:
        version = r.headers.get("x-tandem-version", "?")
        if r.status_code != 200:
            return r.status_code, version
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    usage = json.loads(events[-2])["usage"] if len(events) >= 2 else {}
    whole = events[-1:] == ["[DONE]"] and usage.get("completion_tokens") == max_tokens
    return (200 if whole else 599), version


class Load:
    """Threads sending requests without a conversation key until stopped: `done` holds
    (status, version, start, end) of each."""

    def __init__(self, url: str, n: int = 2, max_tokens: int | None = None):
        self.url, self.max_tokens = url, max_tokens
        self.done: list[tuple[int, str, float, float]] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run) for _ in range(n)]

    def _run(self) -> None:
        with httpx.Client() as http:
            while not self.stop.is_set():
                t0 = time.monotonic()
                try:
                    if self.max_tokens:
                        status, version = stream(http, self.url, self.max_tokens)
                    else:
                        status, version = ask(http, self.url)
                except httpx.HTTPError as err:
                    status, version = 0, repr(err)
                self.done.append((status, version, t0, time.monotonic()))

    @property
    def versions(self) -> list[str]:
        return [d[1] for d in self.done]

    def failures(self, version: str | None = None) -> list[tuple]:
        return [d for d in self.done if d[0] != 200 and (version is None or d[1] == version)]

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


def canary_apps() -> list[str]:
    from ray import serve

    return [a for a in serve.status().applications if a.startswith(f"{APP}-canary-")]


def replica_ids() -> set[str]:
    """Every replica of the stable app (frontends and model replicas)."""
    from ray.serve.context import _get_global_client

    from cluster.local_cluster import _details

    app = _details(_get_global_client()).applications[APP]
    return {r.replica_id for d in app.deployments.values() for r in d.replicas}


def removed(controller, timeout_s: float = 120) -> dict:
    status = wait_for(controller, lambda s: s["canary"] == "canary removed", timeout_s)
    assert status["canary"] == "canary removed", status
    assert not canary_apps()
    return status


def metrics_text(stable: int, canary: int, canary_5xx: int) -> str:
    line = 'tandem_http_requests_total{{model="{}",version="{}",status="{}"}} {}\n'
    return ("# TYPE tandem_http_requests counter\n" + line.format(MODEL, STABLE, 200, stable)
            + line.format(MODEL, CANARY, 200, canary) + line.format(MODEL, CANARY, 500,
                                                                   canary_5xx))


def test_the_core_rolls_back_on_canary_errors_since_the_step_began_and_removes_it_once():
    calls = []
    core = rc.RolloutCore({"steps": [{"share": 0.5, "hold_s": 1}, {"share": 1.0, "hold_s": 1}],
                           "judge": {"min_requests": 5}}, MODEL, lambda: calls.append(1), now=0)
    core.texts["a"] = metrics_text(100, 0, 50)  # before the rollout: not judged
    core.tick(1)
    assert core.rollout.state == "running" and core.verdict.startswith("wait")
    core.texts["a"] = metrics_text(120, 9, 51)  # 1 of 10 in the window failed
    core.tick(2)
    assert core.rollout.state == "rolled_back" and core.rollout.share == 0.0
    assert core.pending() == "remove"
    core.after_end()
    core.after_end()
    assert calls == [1] and core.status()["canary"] == "canary removed"
    assert core.pending() is None


def test_promotion_deploys_the_canary_as_stable_then_removes_it():
    calls = []
    core = rc.RolloutCore({"steps": [{"share": 1.0, "hold_s": 1}]}, MODEL,
                          lambda: calls.append("remove"), lambda: calls.append("promote"), now=0)
    assert core.pending() is None
    core.rollout.tick(2, "pass")  # the judge's verdicts are test_rollout.py's
    assert core.rollout.state == "promoted" and core.rollout.share == 1.0
    core.after_end()
    assert core.rollout.state == "finished" and core.rollout.share == 0.0
    core.after_end()
    assert calls == ["promote", "remove"] and core.pending() is None


def test_promoted_puts_the_new_sections_in_place_of_the_model():
    doc = rc.promoted(stable_doc(), new_doc())
    args = rc.tandem_app(doc)["args"]
    assert args["engine"]["max_num_seqs"] == 16 and "canary" not in args
    assert rc.app_config(doc).served()[0].model.name == MODEL


def test_a_failing_canary_is_rolled_back_and_stable_clients_see_no_error(rollout_app):
    url, doc, port = rollout_app
    bad = new_doc()
    rc.tandem_app(bad)["args"]["engine"].update(fault_injection=True, fault_error_share=0.5)
    plan = RolloutPlan.model_validate({"steps": [{"share": 0.5, "hold_s": 60},
                                                 {"share": 1.0, "hold_s": 60}],
                                       "judge": JUDGE})
    with Load(url) as load:
        controller = rc.begin(doc, bad, plan, http_port=port)
        status = wait_for(controller, lambda s: s["state"] != "running", 60)
        assert status["state"] == "rolled_back", status
        assert "error rate" in status["reason"], status
        removed(controller)
        n = len(load.done)
        time.sleep(2)
    assert load.failures(CANARY), "the canary failed none of its requests"
    assert not load.failures(STABLE), load.failures(STABLE)[:3]
    assert {d[1] for d in load.failures()} == {CANARY}
    assert set(load.versions[n:]) == {STABLE} and not load.failures()[n:]


class FallbackProbe:
    """A frontend's routing as a test sees it: the canary's generations (falling back to
    stable's) built here from the rollout's route, routing on a loop of their own (one that
    outlives the test: the handles' routers live on it until Serve shuts down)."""

    def __init__(self, doc: dict, new: dict):
        import asyncio

        from ray import serve

        from cluster.config import AppConfig
        from cluster.frontend import Generations
        from cluster.protocol import EngineRequest, SamplingParams

        route = rc.canary_route(rc.with_canary(doc, new))
        self.canary = Generations(AppConfig.model_validate(route["config"]),
                                  {p: serve.get_deployment_handle(dep, app_name=app)
                                   for p, (app, dep) in route["deployments"].items()})
        cfg = rc.app_config(doc)
        entry = cfg.served()[0]
        self.stable = Generations(cfg.of_model(entry), {
            p: serve.get_deployment_handle(cfg.deployment(entry, p), app_name=APP)
            for p in entry.pools()})
        self.canary.fallback = self.stable
        self.req = EngineRequest("fallback-probe", [1, 2, 3], SamplingParams(max_tokens=1))
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

    def route(self) -> tuple[str, float]:
        """(replica id, seconds) of one routing decision for a canary request."""
        import asyncio

        async def run():
            t0 = time.monotonic()
            replica, _ = await self.canary._route(self.req, next(iter(self.canary.pools)))
            return replica, time.monotonic() - t0

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(120)


def test_an_abort_under_streaming_load_fails_no_stream(rollout_app):
    url, doc, port = rollout_app
    # the canary's steps sleep: its streams are in flight as it goes. 20 s a stream (0.2 s a
    # step): one that began as the canary took traffic outlasts the abort (>= 6 s later) and
    # the 5 s its apps wait before they go, by margin on a loaded 2-core machine
    slow = new_doc()
    rc.tandem_app(slow)["args"]["engine"].update(slow_replica_ranks=[0], slow_step_delay_s=0.2)
    plan = RolloutPlan.model_validate({"steps": [{"share": 0.5, "hold_s": 120},
                                                 {"share": 1.0, "hold_s": 120}],
                                       "judge": JUDGE})
    with Load(url, n=4, max_tokens=100) as load:
        controller = rc.begin(doc, slow, plan, http_port=port)
        probe = FallbackProbe(doc, slow)
        assert probe.canary.same_vocabulary(probe.stable)
        live_canary, _ = probe.route()  # its router now knows the canary's replica
        wait_for(controller, lambda s: False, 6)  # streams start on both versions
        aborted_at = time.monotonic()
        status = ray_get(controller.abort.remote())
        assert status["state"] == "aborted" and status["share"] == 0.0
        removed(controller)
        n = len(load.done)
        # a frontend that still routed to the canary now (its controller's word came late)
        # gets stable's replica within FALLBACK_ROUTE_S: Serve's routing alone fails (the
        # deployment is gone) or waits for replicas that never come
        after, waited = probe.route()
        time.sleep(2)
    assert after in replica_ids() and live_canary not in replica_ids()
    assert probe.canary.fallbacks == 1 and waited < 12, waited
    assert not load.failures(), load.failures()[:3]
    # canary streams were still running when its apps began to go, and finished whole: the
    # replicas drained them
    going = aborted_at + 2 * rc.FRONTENDS_SEE_S
    assert any(d[1] == CANARY and d[3] > going + 1 for d in load.done), load.done
    assert set(load.versions[n:]) == {STABLE}


def test_a_good_canary_is_promoted_and_made_stable_restarting_nothing_first(rollout_app):
    # last in the module: it leaves the new version as the stable one
    url, doc, port = rollout_app
    plan = RolloutPlan.model_validate({"steps": [{"share": 0.3, "hold_s": 2},
                                                 {"share": 1.0, "hold_s": 2}],
                                       "judge": JUDGE})
    before = replica_ids()
    with Load(url) as load:
        controller = rc.begin(doc, new_doc(), plan, http_port=port)
        assert canary_apps()
        # the canary came beside the stable app: none of its replicas was replaced
        assert replica_ids() == before
        status = wait_for(controller, lambda s: s["state"] not in ("running", "paused"), 90)
        assert status["state"] in ("promoted", "finished"), status
        status = removed(controller, 180)
        n = len(load.done)
        time.sleep(2)
    assert not load.failures(), load.failures()[:3]
    assert status["state"] == "finished" and status["share"] == 0.0
    assert status["history"][:2] == ["step 0 (share 0.3) passed", "step 1 (share 1.0) passed"]
    assert status["promotion"] == "the canary's sections are the stable version"
    assert STABLE in load.versions and CANARY in load.versions
    assert set(load.versions[n:]) == {STABLE}, load.versions[n:]
    # the stable version now is the new config, as Serve runs it
    assert rc.tandem_app(rc.running(doc))["args"]["engine"]["max_num_seqs"] == 16


def ray_get(ref):
    import ray

    return ray.get(ref)
