"""The controller of a canary rollout: a detached, named Ray actor (one per app, namespace
`tandem`, on the head node, no CPU) holding the pure `Rollout`. The canary's pools are Serve
apps of their own (`<app>-canary-<pool>`, no route): adding or removing them redeploys
nothing of the stable app (whose args are in every one of its deployments' versions), so its
frontends and model replicas keep running. Frontends push their /metrics text to the
controller about once a second (`report`) and get back the live share and where the canary's
deployments are; it ticks once a second: the judge's verdict on the current step's window
(canary) against stable's since the rollout began, then `Rollout.tick`. On a rollback or an
abort it sets the share to 0, waits until the frontends have seen it, stops telling them of
the canary and deletes the canary's apps (their replicas drain their streams first). On
promotion, while share 1.0 sends every new request to the canary, it redeploys the stable app
with the canary's sections (a rolling update), then removes the canary in the same way.
"""

from __future__ import annotations

import threading
import time

from cluster.rollout import CANARY, STABLE, Rollout, RolloutPlan
from cluster.rollout_judge import Snapshot, judge, snapshot_from_text, total

NAMESPACE = "tandem"
TICK_S = 1.0
# how long the frontends take to see a new share or route (they refresh about once a second)
FRONTENDS_SEE_S = 2.5


def controller_name(app: str) -> str:
    return f"rollout-{app}"


def tandem_app(doc: dict) -> dict:
    """The tandem application's entry of a Serve config doc."""
    return next(a for a in doc["applications"] if a.get("import_path") == "deployments.app:app")


def app_config(doc: dict):
    from cluster.config import parse_app_config

    return parse_app_config(tandem_app(doc).get("args") or {})


def sections(e) -> dict:
    """A served model's (ModelEntry) config sections, as a Serve config's args hold them."""
    return {"model": e.model.model_dump(), "engine": e.engine.model_dump(),
            "model_pool": e.model_pool and e.model_pool.model_dump(),
            "cpu_pool": e.cpu_pool and e.cpu_pool.model_dump()}


def running(doc: dict) -> dict:
    """`doc` with its tandem app as Serve runs it now (a promotion redeploys it with the
    canary's sections, which the file `tandem up` read does not have)."""
    from ray.serve.context import _get_global_client

    from cluster.local_cluster import _details

    name = tandem_app(doc)["name"]
    app = _details(_get_global_client()).applications.get(name)
    if app is None or app.deployed_app_config is None:
        return doc
    live = app.deployed_app_config.model_dump(exclude_unset=True)
    return {**doc, "applications": [live if a is tandem_app(doc) else a
                                    for a in doc["applications"]]}


def promoted(doc: dict, new: dict) -> dict:
    """`doc` with `new`'s one model in place of the stable version of that model."""
    import copy

    doc = copy.deepcopy(doc)
    args = tandem_app(doc).setdefault("args", {})
    e = app_config(new).served()[0]
    if args.get("models"):
        names = [m.model.name for m in app_config(doc).served()]
        args["models"][names.index(e.model.name)] = sections(e)
    else:
        args.update(sections(e))
    args.pop("canary", None)
    return doc


def canary_apps(doc: dict) -> list[dict]:
    """The Serve app entries of a canary doc's (`with_canary`) pools, one app per pool."""
    tandem = tandem_app(doc)
    cfg = app_config(doc)
    return [{"name": f"{tandem['name']}-canary-{pool}", "route_prefix": None,
             "import_path": "deployments.app:canary_pool",
             "args": {"tandem": tandem["args"], "pool": pool},
             **({"runtime_env": tandem["runtime_env"]} if tandem.get("runtime_env") else {})}
            for pool in cfg.canary.pools()]


def canary_route(doc: dict) -> dict:
    """What a frontend needs to serve a canary doc's canary: its one-model config and, per
    pool, the (app, deployment) of its replicas."""
    from deployments.app import canary_name

    cfg = app_config(doc)
    apps = {a["args"]["pool"]: a["name"] for a in canary_apps(doc)}
    return {"config": cfg.of_model(cfg.canary).model_copy(update={"canary": None}).model_dump(),
            "deployments": {p: [apps[p], canary_name(cfg, p)] for p in cfg.canary.pools()}}


def with_canary(doc: dict, new: dict) -> dict:
    """`doc` with the tandem app's `canary` set to `new`'s model sections (share 0: the
    controller gives the live share)."""
    import copy

    doc = copy.deepcopy(doc)
    args = tandem_app(doc).setdefault("args", {})
    entry = app_config(new).served()
    if len(entry) != 1:
        raise ValueError("the new config must serve one model")
    args["canary"] = {**sections(entry[0]), "share": 0.0}
    return doc


class RolloutCore:
    """The controller's state without Ray: the frontends' latest texts, the windows' baselines
    and the removal of the canary to run when the rollout ends without promotion."""

    def __init__(self, plan: dict, model: str, remove=None, promote=None,
                 now: float | None = None):
        now = time.monotonic() if now is None else now
        self.rollout = Rollout(RolloutPlan.model_validate(plan), started=now)
        self.model, self.remove, self.promote = model, remove, promote
        self.promoted: str | None = None
        self.texts: dict[str, str] = {}
        self.start: tuple[Snapshot, Snapshot] | None = None  # (stable, canary) at the start
        self.step_base: Snapshot | None = None  # canary's at the current step's start
        self.step_seen = 0
        self.verdict = "wait: no metrics yet"
        self.removed: str | None = None

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

    def pending(self) -> str | None:
        """What the end of the rollout still needs: "promote" (the canary's sections
        deployed as the stable version), then "remove" (the canary's apps), once each."""
        state = self.rollout.state
        if state == "promoted" and self.promote and self.promoted is None:
            return "promote"
        if state in ("rolled_back", "aborted", "finished") and self.removed is None:
            return "remove"
        return None

    def after_end(self) -> None:
        """Runs what `pending` names (outside the controller's lock: it takes a while)."""
        what = self.pending()
        if what == "promote":
            self.promoted = "deploying the canary as the stable version"
            try:
                self.promote()
                self.promoted = "the canary's sections are the stable version"
                self.rollout.finish("promoted: the canary's sections are the stable version")
            except Exception as err:  # noqa: BLE001 - reported in status; share stays 1.0
                self.promoted = f"promotion failed: {err!r}"
        elif what == "remove":
            self.removed = "removing the canary"
            try:
                if self.remove:
                    self.remove()
                self.removed = "canary removed"
            except Exception as err:  # noqa: BLE001 - reported in status
                self.removed = f"removing the canary failed: {err!r}"

    def status(self) -> dict:
        r = self.rollout
        return {"state": r.state, "step": r.step, "steps": len(r.plan.steps),
                "share": r.share, "reason": r.reason, "verdict": self.verdict,
                "history": list(r.history), "frontends": len(self.texts),
                "canary": self.removed or "serving", "promotion": self.promoted}


class RolloutController:
    """The actor (see the module): thin around RolloutCore. `route`: the canary's place for
    the frontends (`canary_route`); `apps`: its Serve apps, deleted when it goes."""

    def __init__(self, plan: dict, model: str, route: dict | None = None,
                 apps: list[str] = (), promoted_doc: dict | None = None,
                 http_port: int | None = None):
        self.route, self.apps = route, list(apps)
        promote = None
        if promoted_doc is not None:
            def promote():
                from cluster.local_cluster import deploy

                # the stable app redeployed (a rolling update: its frontends drain their
                # streams) while every new request goes to the canary; the canary's apps
                # stay (deploy keeps apps the doc does not name)
                deploy(promoted_doc, app_config(promoted_doc), http_port=http_port)
        self.core = RolloutCore(plan, model, self._remove, promote)
        self.lock = threading.Lock()
        threading.Thread(target=self._loop, daemon=True).start()

    def _remove(self) -> None:
        """The share is 0 already: once every frontend has seen it, they stop routing to the
        canary (streams it holds go on) and its apps go; Serve waits for each of their
        replicas to drain (deployments/model.py)."""
        from ray import serve

        time.sleep(FRONTENDS_SEE_S)
        self.route = None
        time.sleep(FRONTENDS_SEE_S)
        for name in self.apps:
            serve.delete(name)

    def _loop(self) -> None:
        while True:
            time.sleep(TICK_S)
            with self.lock:
                try:
                    self.core.tick(time.monotonic())
                except Exception as err:  # noqa: BLE001 - the loop goes on; status says it
                    self.core.verdict = f"wait: tick failed: {err!r}"
                end = self.core.pending()
            if end:
                self.core.after_end()

    def report(self, frontend: str, metrics_text: str | bytes) -> dict:
        """A frontend's metrics in; the canary's live share and place out."""
        if isinstance(metrics_text, bytes):
            metrics_text = metrics_text.decode()
        with self.lock:
            self.core.texts[frontend] = metrics_text
            return {"share": self.core.rollout.share, "canary": self.route}

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


def start(plan: RolloutPlan, model: str, app: str, route: dict | None = None,
          apps: list[str] = (), promoted_doc: dict | None = None,
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
    ).remote(plan.model_dump(), model, route, list(apps), promoted_doc, http_port)
    ray.get(actor.status.remote())
    return actor


def get(app: str):
    import ray

    return ray.get_actor(controller_name(app), namespace=NAMESPACE)


def begin(doc: dict, new_doc: dict, plan: RolloutPlan, http_port: int | None = None):
    """A rollout of `new_doc`'s model beside `doc`'s app (on the cluster this process is
    connected to): the canary's pools deployed as apps of their own beside the running app
    (which is sent along unchanged: Serve leaves it as it is), then the controller, which
    gives the frontends the canary's place and its share. Returns the controller."""
    from cluster.local_cluster import deploy

    app = tandem_app(doc)["name"]
    canary_doc = with_canary(doc, new_doc)
    cfg = app_config(canary_doc)
    if cfg.canary.model.name not in {e.model.name for e in cfg.served()}:
        raise ValueError(f"the new config's model {cfg.canary.model.name!r} is not served")
    apps = canary_apps(canary_doc)
    deploy({**doc, "applications": doc["applications"] + apps}, app_config(doc),
           http_port=http_port)
    return start(plan, cfg.canary.model.name, app, canary_route(canary_doc),
                 [a["name"] for a in apps], promoted(doc, new_doc), http_port)

