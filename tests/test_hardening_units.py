"""Units of the serving path: the router's own view of replica reports (its clock, replicas
that left), stop strings at the very end of a stream, and checkpoints missing a tensor."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import pytest
import ray
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, ReplicaID

from cluster.router import LoadAwareRouter
from cluster.tokenizer import TextStream, Tokenizer

DEP = DeploymentID(name="ModelReplica", app_name="t")


def make_router(**kw) -> LoadAwareRouter:
    router = LoadAwareRouter(DEP, DeploymentHandleSource.UNKNOWN)
    router.initialize_state(policy="least_load", **kw)
    return router


def replica(uid: str, stats: dict) -> SimpleNamespace:
    """What the router reads of a running replica (Serve's RunningReplica)."""
    return SimpleNamespace(replica_id=ReplicaID(uid, DEP), routing_stats=stats,
                           actor_id=ray.ActorID.from_random())


def first_choice(router, candidates) -> str:
    ranks = asyncio.run(router.choose_replicas(candidates, None))
    return ranks[0][0].replica_id.unique_id


def report(running: int, **kw) -> dict:
    return {"running": running, "waiting": 0, "kv_used": 0, "kv_total": 100,
            "max_num_seqs": 32, **kw}


def test_report_age_is_judged_by_the_routers_own_clock():
    """A replica host whose clock runs an hour behind (or ahead) is not stale for that; a
    replica whose report stopped changing is, after stale_after_s by this router's clock."""
    router = make_router(stale_after_s=5.0)
    skewed = replica("skewed", report(0, ts=time.time() - 3600))
    busy = replica("busy", report(20, ts=time.time() + 3600))
    assert first_choice(router, [skewed, busy]) == "skewed"  # idle, and fresh
    now = time.monotonic()
    assert router.load_of(skewed, now + 6).age_s > 5.0  # no new report for 6 s: stale
    skewed.routing_stats = report(0)  # a new report: fresh again
    assert router.load_of(skewed, now + 6).age_s == 0.0


def test_router_forgets_replicas_that_left():
    router = make_router()
    gen1 = [replica(f"r{i}", report(i, prefix=list(range(4096)))) for i in range(3)]
    first_choice(router, gen1)
    assert len(router._reports) == 3
    gen2 = [gen1[2], replica("r9", report(0))]  # autoscaling replaced two of them
    first_choice(router, gen2)
    assert {k.unique_id for k in router._reports} == {"r2", "r9"}


def test_router_passes_over_replicas_to_avoid():
    router = make_router()
    a, b = replica("a", report(0)), replica("b", report(5))
    req = SimpleNamespace(prompt_token_ids=[1, 2, 3], avoid=("a",))
    pending = SimpleNamespace(args=[req])
    ranks = asyncio.run(router.choose_replicas([a, b], pending))
    assert ranks[0][0] is b
    req.avoid = (a.actor_id.hex(),)  # known by its actor id (from a Ray actor error)
    assert asyncio.run(router.choose_replicas([a, b], pending))[0][0] is b


def test_a_stop_string_completed_by_the_final_flush_ends_with_stop(model_dir):
    """The last token ends inside a multi-byte character: only the final flush yields its
    text, and with it a stop string; the finish reason must say "stop", and the text must
    end before the stop string."""
    tok = Tokenizer(model_dir)
    ids = tok.encode("ab 🚀", add_special_tokens=False)
    partial = next(i for i in range(1, len(ids)) if tok.decode(ids[:i]).endswith("\ufffd"))
    shown = tok.decode(ids[:partial])
    assert shown.endswith("\ufffd")
    stop = shown[-3:]  # ends with the replacement character only the flush can give
    stream = TextStream(tok, [stop])
    text, reason = stream.push(ids[:partial], "length")
    assert reason == "stop" and text == shown[:-3]
    plain = TextStream(tok, ["never"])
    assert plain.push(ids[:partial], "length") == (shown, "length")


@pytest.mark.parametrize("drop", ["model.layers.0.self_attn.k_proj.weight",
                                  "model.layers.1.mlp.up_proj.weight",
                                  "model.norm.weight"])
def test_a_checkpoint_missing_a_tensor_fails_naming_it(model_dir, drop):
    from cluster.config import EngineConfig
    from cluster.engine.engine import build_runner
    from cluster.engine.loader import iter_checkpoint

    weights = [(n, t) for n, t in iter_checkpoint(model_dir) if n != drop]
    with pytest.raises(ValueError, match=drop.replace(".", r"\.")):
        build_runner(str(model_dir), EngineConfig(device="cpu", dtype="float32"), weights)
