"""The autoscaling policy on synthetic signals: each signal, delays, steps, cool-down."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from pydantic import ValidationError

from cluster.autoscaling import ScalingPolicy, decide, pool_signals
from cluster.config import ConfigError, load_serve_config

SHIPPED = Path(__file__).parent.parent / "deployments" / "autoscaling"


def run(p: ScalingPolicy, current: int, signals: dict, times: list[float]) -> list[int]:
    state: dict = {}
    out = []
    for t in times:
        d = decide(p, current, signals, state, t)
        out.append(d.replicas)
        current = d.replicas
    return out


@pytest.mark.parametrize(("signal", "target", "hot", "after"), [
    ("kv_usage", 0.7, 0.95, 3),  # pressure 1.36: ceil(2 x 1.36) = 3
    ("waiting", 4, 12, 4),  # pressure 3: 6 wanted, at most max_step=2 more
    ("ttft_p95_ms", 500, 1500, 4), ("cpu", 0.6, 0.9, 3), ("queued", 8, 20, 4)])
def test_each_signal_scales_up_after_the_delay(signal, target, hot, after):
    p = ScalingPolicy(**{signal: target}, upscale_delay_s=2, startup_s=0, max_replicas=8)
    assert run(p, 2, {signal: hot}, [0, 1, 2.5]) == [2, 2, after]
    assert run(p, 2, {signal: target * 0.9}, [0, 1, 2.5]) == [2, 2, 2]  # under target


def test_step_limit_and_max_replicas():
    p = ScalingPolicy(waiting=1, upscale_delay_s=0, startup_s=0, max_step=2, max_replicas=5)
    assert run(p, 1, {"waiting": 50}, [0, 1, 2, 3]) == [3, 5, 5, 5]


def test_startup_cool_down_prevents_flapping():
    p = ScalingPolicy(kv_usage=0.5, upscale_delay_s=0, startup_s=20, max_replicas=10)
    assert run(p, 1, {"kv_usage": 1.0}, [0, 5, 10, 19, 21]) == [2, 2, 2, 2, 4]


def test_scale_down_is_slow_and_stops_at_min():
    p = ScalingPolicy(kv_usage=0.8, downscale_delay_s=10, min_replicas=2, startup_s=0)
    assert run(p, 4, {"kv_usage": 0.1}, [0, 5, 10.5, 11, 21, 40, 60]) == [4, 4, 3, 3, 2, 2, 2]


def test_pressure_between_bands_holds():
    p = ScalingPolicy(kv_usage=0.8, downscale_delay_s=0, upscale_delay_s=0, startup_s=0)
    assert run(p, 3, {"kv_usage": 0.6}, [0, 10, 20]) == [3, 3, 3]


def test_pool_signals_mean_and_max():
    agg = {"kv_usage": {"a": 0.2, "b": 0.6}, "ttft_p95_ms": {"a": 100, "b": 900}}
    assert pool_signals(agg) == {"kv_usage": 0.4, "ttft_p95_ms": 900}


def test_bad_policy_is_rejected_with_its_field(tmp_path):
    with pytest.raises(ValidationError):
        ScalingPolicy(min_replicas=5, max_replicas=2, kv_usage=0.5)
    with pytest.raises(ValidationError, match="at least one signal"):
        ScalingPolicy(max_replicas=3)
    doc = yaml.safe_load(open(SHIPPED / "latency.yaml"))
    doc["applications"][0]["args"]["model_pool"]["autoscaling"]["kv_usage"] = 3
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="model_pool.autoscaling.kv_usage"):
        load_serve_config(bad)


@pytest.mark.parametrize("name", ["latency", "throughput", "cost", "ramp"])
def test_shipped_policies_are_valid(name):
    _, cfg = load_serve_config(SHIPPED / f"{name}.yaml")
    assert cfg.model_pool.autoscaling and cfg.frontend_pool.autoscaling


def test_scale_from_zero_on_waiting_requests():
    p = ScalingPolicy(min_replicas=0, waiting=2, downscale_delay_s=0, startup_s=0)
    assert run(p, 0, {}, [0, 1]) == [0, 0]
    assert run(p, 0, {"requests": 3}, [0]) == [1]


class Ctx(SimpleNamespace):
    """The fields of Serve's AutoscalingContext that the policy reads."""


def test_serve_entry_point_takes_kwargs_once_and_keeps_state():
    """Serve builds a class policy with `policy_kwargs` and calls it with the context alone;
    the state it returns comes back on the next call."""
    from ray.serve.config import AutoscalingPolicy

    spec = {"policy_function": "cluster.autoscaling:Policy",
            "policy_kwargs": ScalingPolicy(waiting=2, upscale_delay_s=1, startup_s=0,
                                           max_replicas=5).model_dump()}
    entry = AutoscalingPolicy(**spec).get_policy()(**spec["policy_kwargs"])
    hot = {"waiting": {"r1": 9.0}}
    ctx = Ctx(target_num_replicas=1, aggregated_metrics=hot, policy_state=None,
              current_time=100.0, deployment_name="ModelReplica", total_num_requests=9)
    n, state = entry(ctx)
    assert n == 1 and "above_since" in state  # above target, waiting out the delay
    n, state = entry(Ctx(**{**vars(ctx), "policy_state": state, "current_time": 101.5}))
    assert n == 3
    # the two new replicas are still starting: holding means keeping the target, not the one
    # running replica (which would cancel them)
    n, state = entry(Ctx(**{**vars(ctx), "policy_state": state, "current_time": 103.0,
                            "target_num_replicas": 3, "current_num_replicas": 1}))
    assert n == 3
