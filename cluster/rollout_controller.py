"""The controller of a canary rollout: a detached, named Ray actor (one per app, namespace
`tandem`, on the head node, no CPU) holding the pure `Rollout`. Frontends push their /metrics
text to it about once a second (`report`) and get the live share back; it ticks once a second:
the judge's verdict on the current step's window (canary) against stable's since the rollout
began, then `Rollout.tick`. On a rollback or an abort it sets the share to 0 and redeploys the
app without the canary; on promotion it holds share 1.0 (the operator makes the new version
stable with `tandem up --config new.yaml`).
"""

from __future__ import annotations

import threading
import time

from cluster.rollout import CANARY, STABLE, Rollout, RolloutPlan
from cluster.rollout_judge import Snapshot, judge, snapshot_from_text, total

NAMESPACE = "tandem"
TICK_S = 1.0
PROMOTED = "promoted: run `tandem up --config <the new config>` to make it stable"


def controller_name(app: str) -> str:
    return f"rollout-{app}"


def tandem_app(doc: dict) -> dict:
    """The tandem application's entry of a Serve config doc."""
    return next(a for a in doc["applications"] if a.get("import_path") == "deployments.app:app")


def app_config(doc: dict):
    from cluster.config import parse_app_config

    return parse_app_config(tandem_app(doc).get("args") or {})


def with_canary(doc: dict, new: dict | None) -> dict:
    """`doc` with the tandem app's `canary` set to `new`'s model sections (share 0: the
    controller gives the live share), or removed (None)."""
    import copy

    doc = copy.deepcopy(doc)
    args = tandem_app(doc).setdefault("args", {})
    if new is None:
        args.pop("canary", None)
        return doc
    entry = app_config(new).served()
    if len(entry) != 1:
        raise ValueError("the new config must serve one model")
    e = entry[0]
    args["canary"] = {"model": e.model.model_dump(), "engine": e.engine.model_dump(),
                      "model_pool": e.model_pool and e.model_pool.model_dump(),
                      "cpu_pool": e.cpu_pool and e.cpu_pool.model_dump(), "share": 0.0}
    return doc


class RolloutCore:
    """The controller's state without Ray: the frontends' latest texts, the windows' baselines
    and the redeploy to run when the rollout ends without promotion."""

    def __init__(self, plan: dict, model: str, redeploy=None, now: float | None = None):
        now = time.monotonic() if now is None else now
        self.rollout = Rollout(RolloutPlan.model_validate(plan), started=now)
        self.model, self.redeploy = model, redeploy
        self.texts: dict[str, str] = {}
        self.start: tuple[Snapshot, Snapshot] | None = None  # (stable, canary) at the start
        self.step_base: Snapshot | None = None  # canary's at the current step's start
        self.step_seen = 0
        self.verdict = "wait: no metrics yet"
        self.redeployed: str | None = None

    def current(self) -> tuple[Snapshot, Snapshot]:
        texts = list(self.texts.values())
        return (total(snapshot_from_text(t, STABLE, self.model) for t in texts),
                total(snapshot_from_text(t, CANARY, self.model) for t in texts))

    def tick(self, now: float) -> None:
        r = self.rollout
        if r.done or not self.texts:
            return
        stable, canary = self.current()
        if self.start is None:
            self.start, self.step_base = (stable, canary), canary
        if self.step_seen != r.step:
            self.step_base, self.step_seen = canary, r.step
        if r.state == "running":
            # stable's reference is all its traffic since the rollout began (at share 1.0 it
            # gets none in the step itself)
            v = judge(stable - self.start[0], canary - self.step_base, r.plan.judge)
            self.verdict = f"{v.kind}: {v.reason}"
            r.tick(now, v.kind, v.reason)
            if r.step != self.step_seen:
                self.step_base, self.step_seen = canary, r.step

    def after_end(self) -> None:
        """Rolled back or aborted: the app without the canary (once)."""
        r = self.rollout
        if r.state in ("rolled_back", "aborted") and self.redeployed is None and self.redeploy:
            self.redeployed = "redeploying without the canary"
            try:
                self.redeploy()
                self.redeployed = "redeployed without the canary"
            except Exception as err:  # noqa: BLE001 - reported in status
                self.redeployed = f"redeploy failed: {err!r}"

    def status(self) -> dict:
        r = self.rollout
        return {"state": r.state, "step": r.step, "steps": len(r.plan.steps),
                "share": r.share, "reason": r.reason, "verdict": self.verdict,
                "history": list(r.history), "frontends": len(self.texts),
                "redeploy": self.redeployed,
                "message": PROMOTED if r.state == "promoted" else None}


class RolloutController:
    """The actor (see the module): thin around RolloutCore."""

    def __init__(self, plan: dict, model: str, stable_doc: dict | None = None,
                 http_port: int | None = None):
        redeploy = None
        if stable_doc is not None:
            def redeploy():
                from cluster.local_cluster import deploy

                deploy(stable_doc, app_config(stable_doc), http_port=http_port)
        self.core = RolloutCore(plan, model, redeploy)
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _loop(self) -> None:
        while True:
            time.sleep(TICK_S)
            with self.lock:
                try:
                    self.core.tick(time.monotonic())
                except Exception as err:  # noqa: BLE001 - the loop goes on; status says it
                    self.core.verdict = f"wait: tick failed: {err!r}"
                end = self.core.rollout.done and self.core.redeployed is None
            if end:
                self.core.after_end()

    def report(self, frontend: str, metrics_text: str | bytes) -> float:
        if isinstance(metrics_text, bytes):
            metrics_text = metrics_text.decode()
        with self.lock:
            self.core.texts[frontend] = metrics_text
            return self.core.rollout.share

    def share(self) -> float:
        return self.core.rollout.share

    def status(self) -> dict:
        with self.lock:
            return self.core.status()

    def pause(self) -> dict:
        with self.lock:
            self.core.rollout.pause(time.monotonic())
            return self.core.status()

    def resume(self) -> dict:
        with self.lock:
            self.core.rollout.resume(time.monotonic())
            return self.core.status()

    def abort(self) -> dict:
        with self.lock:
            self.core.rollout.abort()
            return self.core.status()


def start(plan: RolloutPlan, model: str, app: str, stable_doc: dict | None = None,
          http_port: int | None = None):
    """A new controller for `app` (replacing one left from an earlier rollout)."""
    import ray

    name = controller_name(app)
    try:
        ray.kill(ray.get_actor(name, namespace=NAMESPACE))
        time.sleep(0.5)
    except ValueError:
        pass
    actor = ray.remote(RolloutController).options(
        name=name, namespace=NAMESPACE, lifetime="detached", num_cpus=0, max_concurrency=8,
        resources={"node:__internal_head__": 0.001}, get_if_exists=False,
    ).remote(plan.model_dump(), model, stable_doc, http_port)
    ray.get(actor.status.remote())
    return actor


def get(app: str):
    import ray

    return ray.get_actor(controller_name(app), namespace=NAMESPACE)


def begin(doc: dict, new_doc: dict, plan: RolloutPlan, http_port: int | None = None):
    """A rollout of `new_doc`'s model beside `doc`'s app (on the cluster this process is
    connected to): the app redeployed with the canary (share 0 until the controller gives
    one; the stable replicas stay), then its controller. Returns the controller."""
    from cluster.local_cluster import deploy

    app = tandem_app(doc)["name"]
    canary_doc = with_canary(doc, new_doc)
    cfg = app_config(canary_doc)
    if cfg.canary.model.name not in {e.model.name for e in cfg.served()}:
        raise ValueError(f"the new config's model {cfg.canary.model.name!r} is not served")
    deploy(canary_doc, cfg, http_port=http_port)
    return start(plan, cfg.canary.model.name, app, with_canary(doc, None), http_port)
