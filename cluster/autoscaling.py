"""Autoscaling policies for both pools, written as data in the Serve config YAML.

Serve calls `policy(ctx, **policy_kwargs)` on its controller (the custom autoscaling policy
API). Replicas report their signals through `record_autoscaling_stats`; the policy turns them
into one pressure figure (the most pressing signal relative to its target), scales up when the
pressure stays above 1 for `upscale_delay_s`, down when it stays below `downscale_below` for
`downscale_delay_s`, moves at most `max_step` replicas at a time, and after a scale-up waits
`startup_s` (model load time) before judging again, so that it does not flap.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, model_validator

log = logging.getLogger("ray.serve")

# signal name in replica stats -> how the pool's values are combined
SIGNALS = {"kv_usage": "mean", "waiting": "mean", "ttft_p95_ms": "max", "cpu": "mean",
           "queued": "mean"}


class ScalingPolicy(BaseModel):
    """Per pool, under `autoscaling:`. Targets left out are signals the pool ignores."""

    model_config = ConfigDict(extra="forbid")
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(4, ge=1)
    kv_usage: float | None = Field(None, gt=0, le=1, description="target KV cache use")
    waiting: float | None = Field(None, gt=0, description="target waiting requests/replica")
    ttft_p95_ms: float | None = Field(None, gt=0, description="TTFT p95 target (look-back)")
    cpu: float | None = Field(None, gt=0, le=1, description="target CPU use of a replica")
    queued: float | None = Field(None, gt=0, description="target queued requests/replica")
    upscale_delay_s: float = Field(3.0, ge=0)
    downscale_delay_s: float = Field(30.0, ge=0)
    downscale_below: float = Field(0.5, gt=0, lt=1, description="pressure under which to "
                                   "shrink")
    max_step: int = Field(2, ge=1)
    startup_s: float = Field(20.0, ge=0, description="replica start time (model load)")

    @model_validator(mode="after")
    def _check(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must not exceed max_replicas")
        if not any(getattr(self, s) for s in SIGNALS):
            raise ValueError(f"name at least one signal target: {', '.join(SIGNALS)}")
        return self


@dataclass
class Decision:
    replicas: int
    reason: str


def pressure(p: ScalingPolicy, signals: dict[str, float]) -> tuple[float, str]:
    """The most pressing signal relative to its target, and its name."""
    best, why = 0.0, "no signal"
    for name in SIGNALS:
        target = getattr(p, name)
        if target and name in signals:
            ratio = signals[name] / target
            if ratio > best:
                best, why = ratio, f"{name}={signals[name]:.3g} vs target {target:g}"
    return best, why


def decide(p: ScalingPolicy, current: int, signals: dict[str, float], state: dict,
           now: float) -> Decision:
    """The whole policy, pure: replica count to ask for; `state` persists between calls."""
    lo, hi = p.min_replicas, p.max_replicas
    if current < lo or current > hi:
        return Decision(min(max(current, lo), hi), "outside min/max")
    if current == 0:  # no replica reports anything: wake on requests queued at the handles
        if signals.get("requests", 0) > 0:
            return Decision(1, "scale up from zero: requests waiting")
        return Decision(0, "idle at zero")
    if now - state.get("last_up", -math.inf) < p.startup_s:
        return Decision(current, "waiting for new replicas to start")
    load, why = pressure(p, signals)
    if load > 1.0:
        state.pop("below_since", None)
        since = state.setdefault("above_since", now)
        if now - since >= p.upscale_delay_s and current < hi:
            want = min(hi, current + p.max_step, max(current + 1, math.ceil(current * load)))
            state["last_up"] = now
            state.pop("above_since", None)
            return Decision(want, f"scale up: {why}")
        return Decision(current, f"above target ({why}), waiting {p.upscale_delay_s:g} s")
    state.pop("above_since", None)
    if load < p.downscale_below and current > lo:
        since = state.setdefault("below_since", now)
        if now - since >= p.downscale_delay_s:
            state.pop("below_since", None)
            return Decision(current - 1, f"scale down: pressure {load:.2f}")
        return Decision(current, "below target, waiting")
    state.pop("below_since", None)
    return Decision(current, "within target")


def pool_signals(aggregated: dict | None) -> dict[str, float]:
    """Combines per-replica values ({signal: {replica: value}}) into one value a signal."""
    out: dict[str, float] = {}
    for name, how in SIGNALS.items():
        values = list((aggregated or {}).get(name, {}).values())
        if values:
            out[name] = max(values) if how == "max" else sum(values) / len(values)
    return out


class Policy:
    """Serve's entry point (`autoscaling_config.policy.policy_function`). A class, because
    Serve hands `policy_kwargs` only to a class (once, at construction) and calls a plain
    function with the context alone."""

    def __init__(self, **kwargs):
        self.spec = ScalingPolicy.model_validate(kwargs)
        self._decisions = None

    def __call__(self, ctx) -> tuple[int, dict]:
        state = dict(ctx.policy_state or {})
        # the count last asked for, not the running one: replicas still starting count, or
        # holding steady would cancel them
        current = ctx.target_num_replicas
        signals = pool_signals(ctx.aggregated_metrics)
        signals["requests"] = float(ctx.total_num_requests or 0)
        d = decide(self.spec, current, signals, state, ctx.current_time)
        if d.replicas != current:
            direction = "up" if d.replicas > current else "down"
            log.info("autoscaling %s: %d -> %d replicas (%s)", ctx.deployment_name, current,
                     d.replicas, d.reason)
            self._count(ctx.deployment_name, direction)
        return d.replicas, state

    def _count(self, deployment: str, direction: str) -> None:
        from ray.util import metrics

        if self._decisions is None:
            self._decisions = metrics.Counter(
                "tandem_autoscaling_decisions", "Scaling decisions by deployment and direction",
                tag_keys=("deployment", "direction"))
        self._decisions.inc(tags={"deployment": deployment, "direction": direction})
