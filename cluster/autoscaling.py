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


_decisions = None


def policy(ctx, **kwargs) -> tuple[int, dict]:
    """Serve's entry point (`autoscaling_config.policy.policy_function`)."""
    global _decisions
    p = ScalingPolicy.model_validate(kwargs)
    state = dict(ctx.policy_state or {})
    now = ctx.current_time
    d = decide(p, ctx.current_num_replicas, pool_signals(ctx.aggregated_metrics), state, now)
    if d.replicas != ctx.current_num_replicas:
        log.info("autoscaling %s: %d -> %d replicas (%s)", ctx.deployment_name,
                 ctx.current_num_replicas, d.replicas, d.reason)
        from ray.util import metrics

        if _decisions is None:
            _decisions = metrics.Counter("tandem_autoscaling_decisions",
                                         "Scaling decisions by deployment and direction",
                                         tag_keys=("deployment", "direction"))
        _decisions.inc(tags={"deployment": ctx.deployment_name,
                             "direction": "up" if d.replicas > ctx.current_num_replicas
                             else "down"})
    return d.replicas, state
