"""Canary rollouts, the pure parts: the plan file, the traffic split and its stickiness, the
judge over two metric snapshots, and the rollout's steps, rollback, pause and abort."""

from __future__ import annotations

import math
import random

import pytest

from cluster.config import ConfigError
from cluster.metrics import IngressMetrics
from cluster.rollout import (
    CANARY,
    SESSION_HEADER,
    STABLE,
    Judgement,
    Rollout,
    RolloutPlan,
    bucket,
    load_plan,
    session_key,
    to_canary,
)
from cluster.rollout_judge import Histogram, Snapshot, judge, snapshot_from_text, total

PLAN = """
steps:
  - {share: 0.05, hold_s: 2}
  - {share: 0.25, hold_s: 2}
  - {share: 0.5, hold_s: 2}
  - {share: 1.0, hold_s: 2}
judge: {min_requests: 10, min_latency_samples: 5}
"""


def test_a_plan_file_loads(tmp_path):
    path = tmp_path / "plan.yaml"
    path.write_text(PLAN)
    plan = load_plan(path)
    assert [s.share for s in plan.steps] == [0.05, 0.25, 0.5, 1.0]
    assert plan.judge.min_requests == 10 and plan.judge.max_latency_ratio == 1.5


def test_the_default_plan_is_5_25_50_100():
    assert [s.share for s in RolloutPlan().steps] == [0.05, 0.25, 0.5, 1.0]


@pytest.mark.parametrize("body, field", [
    ("steps: [{share: 1.5, hold_s: 2}]", "steps.0.share"),
    ("steps: [{share: 1.0}]", "steps.0.hold_s"),
    ("steps: [{share: 1.0, hold_s: 1}]\njudge: {min_requets: 3}", "judge.min_requets"),
    ("steps: [{share: 0.5, hold_s: 1}, {share: 0.25, hold_s: 1}]", "must increase"),
    ("steps: [{share: 0.5, hold_s: 1}]", "share 1.0"),
])
def test_plan_errors_name_the_file_and_the_field(tmp_path, body, field):
    path = tmp_path / "bad.yaml"
    path.write_text(body)
    with pytest.raises(ConfigError) as err:
        load_plan(path)
    assert str(path) in str(err.value) and field in str(err.value)


# ---- the split


def test_a_key_is_sticky_and_stays_on_the_canary_as_the_share_grows():
    keys = [f"conversation-{i}" for i in range(2000)]
    for k in keys[:50]:
        assert len({to_canary(k, 0.25) for _ in range(5)}) == 1
    on = {k for k in keys if to_canary(k, 0.05)}
    for share in (0.25, 0.5, 1.0):
        now = {k for k in keys if to_canary(k, share)}
        assert on <= now
        on = now
    assert on == set(keys)
    assert not any(to_canary(k, 0.0) for k in keys)


@pytest.mark.parametrize("share", [0.05, 0.25, 0.5])
def test_the_canary_gets_its_share_within_statistical_bounds(share):
    n = 20000
    rng = random.Random(7).random
    keyed = sum(to_canary(f"user-{i}", share) for i in range(n))
    unkeyed = sum(to_canary(None, share, rng) for _ in range(n))
    bound = 4 * math.sqrt(n * share * (1 - share))  # 4 standard deviations
    assert abs(keyed - n * share) < bound and abs(unkeyed - n * share) < bound


def test_buckets_lie_in_the_unit_interval():
    assert all(0 <= bucket(str(i)) < 1 for i in range(1000))


def test_the_header_wins_over_the_user_field():
    h = SESSION_HEADER
    assert session_key({h: "s1"}, "u1") == "s1"
    assert session_key({}, "u1") == "u1"
    assert session_key({}, None) is None and session_key({h: ""}, "") is None


# ---- the judge

J = Judgement(min_requests=20, min_latency_samples=10)
BOUNDS = (0.1, 0.25, 0.5, 1.0, float("inf"))


def hist(*counts: float) -> Histogram:
    cum, out = 0.0, []
    for c in counts:
        cum += c
        out.append(cum)
    return Histogram(BOUNDS, tuple(out))


FAST = hist(100, 0, 0, 0, 0)  # every observation under 0.1 s


def snap(requests=100, errors=0, ttft=FAST, itl=FAST) -> Snapshot:
    return Snapshot(requests, errors, ttft, itl)


def test_the_quantile_interpolates_as_promql_does():
    h = hist(50, 50, 0, 0, 0)
    assert h.quantile(0.5) == pytest.approx(0.1)
    assert h.quantile(0.75) == pytest.approx(0.175)
    assert hist(0, 0, 0, 0, 10).quantile(0.99) == 1.0  # +Inf: the highest finite bound
    assert Histogram().quantile(0.99) == 0.0


def test_a_healthy_canary_passes():
    assert judge(snap(), snap(requests=30), J).kind == "pass"


def test_too_few_samples_wait():
    assert judge(snap(), snap(requests=5, errors=5), J).kind == "wait"
    v = judge(snap(), snap(requests=30, ttft=hist(5, 0, 0, 0, 0)), J)
    assert v.kind == "wait" and "TTFT" in v.reason


def test_errors_fail_before_latency_has_its_samples():
    v = judge(snap(errors=1), snap(requests=20, errors=3, ttft=Histogram(), itl=Histogram()), J)
    assert v.kind == "fail" and "error rate 0.150" in v.reason
    assert judge(snap(errors=1), snap(requests=100, errors=2), J).kind == "pass"  # +0.01


def test_slow_ttft_or_itl_fails():
    slow = hist(0, 0, 0, 100, 0)  # all in (0.5, 1]
    v = judge(snap(), snap(ttft=slow), J)
    assert v.kind == "fail" and "TTFT p99" in v.reason
    v = judge(snap(), snap(itl=slow), J)
    assert v.kind == "fail" and "ITL p99" in v.reason
    # both slow: the canary is no worse
    assert judge(snap(ttft=slow), snap(ttft=slow), J).kind == "pass"


def test_snapshots_from_frontend_metrics_by_version_and_windowed():
    m = IngressMetrics("m")
    for _ in range(3):
        m.request("chat", 200, "m")
        m.finished("m", 5, 11, 0.05, 0.55)  # ITL (0.55 - 0.05) / 10
    m.request("chat", 503, "m", CANARY)
    m.request("chat", 400, "m", CANARY)
    m.finished("m", 5, 2, 0.7, 0.8, CANARY)
    before = snapshot_from_text(m.render().decode(), STABLE)
    m.request("chat", 200, "m")
    text = m.render().decode()
    stable, canary = (snapshot_from_text(text, v) for v in (STABLE, CANARY))
    assert (stable.requests, stable.errors, stable.ttft.count) == (4, 0, 3)
    assert stable.itl.quantile(0.5) <= 0.06
    assert (canary.requests, canary.errors, canary.ttft.count) == (2, 1, 1)
    assert (stable - before).requests == 1 and (stable - before).ttft.count == 0
    assert total([stable, stable]).requests == 8
    assert snapshot_from_text(text, STABLE, model="other").requests == 0


# ---- the rollout's steps


def plan(**judge) -> RolloutPlan:
    return RolloutPlan.model_validate({"steps": [{"share": s, "hold_s": 10} for s in
                                                 (0.05, 0.5, 1.0)], "judge": judge})


def test_a_good_canary_is_promoted_through_every_step():
    r = Rollout(plan(), started=0.0)
    shares = []
    for t in range(0, 100):
        shares.append(r.share)
        r.tick(float(t), "pass")
    assert r.state == "promoted" and r.share == 1.0
    assert sorted(set(shares)) == [0.05, 0.5, 1.0]
    assert r.history[:3] == [f"step {i} (share {s}) passed" for i, s in
                             enumerate((0.05, 0.5, 1.0))]


def test_a_step_holds_until_judged_and_its_hold_is_over():
    r = Rollout(plan(), started=0.0)
    r.tick(5.0, "pass")
    r.tick(20.0, "wait")
    assert r.step == 0
    r.tick(21.0, "pass")
    assert r.step == 1 and r.started == 21.0


def test_a_failing_verdict_rolls_back_at_once_with_its_reason():
    r = Rollout(plan(), started=0.0)
    r.tick(11.0, "pass")
    r.tick(12.0, "fail", "error rate 0.5")
    assert (r.state, r.share) == ("rolled_back", 0.0)
    assert r.reason == "step 1 (share 0.5): error rate 0.5"
    r.tick(30.0, "pass")  # over: nothing moves it again
    assert r.state == "rolled_back"


def test_pause_keeps_the_share_and_stops_the_clock_abort_sends_all_to_stable():
    r = Rollout(plan(), started=0.0)
    r.tick(4.0, "pass")
    r.pause(4.0)
    r.tick(50.0, "fail", "ignored while paused")
    assert (r.state, r.share) == ("paused", 0.05)
    r.resume(100.0)  # 4 s of the 10 s hold were served
    r.tick(105.0, "pass")
    assert r.step == 0
    r.tick(106.0, "pass")
    assert r.step == 1
    r.abort()
    assert (r.state, r.share, r.reason) == ("aborted", 0.0, "aborted by the operator")


# ---- the canary's deployments


def canary_args(name: str = "tandem-tiny") -> dict:
    return {"canary": {"model": {"name": name}, "engine": {"max_num_seqs": 16},
                       "share": 0.05}}


def test_the_canary_has_its_own_deployments_and_leaves_the_stable_ones_alone():
    from cluster.config import GPU, parse_app_config
    from deployments.app import build

    before = build(parse_app_config({}))._bound_deployment
    after = build(parse_app_config(canary_args()))._bound_deployment
    stable = [a.init_args[1]["tandem-tiny"][GPU]._bound_deployment for a in (before, after)]
    assert stable[0].name == stable[1].name == "ModelReplica"
    assert stable[0].init_args == stable[1].init_args
    canary = after.init_args[2][GPU]._bound_deployment
    assert canary.name == "ModelReplica-canary" and before.init_args[2] is None
    assert canary.init_args[0]["engine"]["max_num_seqs"] == 16


def test_a_canary_of_a_model_not_served_is_refused():
    from cluster.config import parse_app_config
    from deployments.app import build

    with pytest.raises(ConfigError, match="canary.model.name: 'other'"):
        build(parse_app_config(canary_args("other")))
