"""A canary rollout's plan and its state: which share of traffic the canary gets, which
requests go to it, and when it moves a step on, is promoted or is rolled back.

Pure (no Ray, no I/O beyond reading the plan file): the controller that runs a rollout feeds
it the time and the judge's verdicts (cluster/rollout_judge.py); the frontends ask it only
for the share and apply `to_canary` per request.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cluster.config import ConfigError, Strict, describe

STABLE, CANARY = "stable", "canary"
# names a conversation, so that all its requests go to one version (else the body's `user`)
SESSION_HEADER = "x-tandem-session"


class Step(Strict):
    share: float = Field(gt=0, le=1, description="the canary's share of new requests")
    hold_s: float = Field(gt=0, description="how long the step must hold (and pass the "
                          "judgement) before the next")


class Judgement(Strict):
    """Canary against stable; a step passes only once every check has its samples."""

    min_requests: int = Field(50, ge=1, description="canary requests in the step before its "
                              "error rate is judged")
    min_latency_samples: int = Field(20, ge=1, description="TTFT/ITL observations of each "
                                     "version before their p99s are compared")
    max_error_rate_increase: float = Field(0.02, ge=0, le=1, description="canary 5xx share "
                                           "minus stable's, above which it is rolled back")
    max_latency_ratio: float = Field(1.5, ge=1, description="canary p99 / stable p99 (TTFT "
                                     "and ITL) above which it is rolled back")
    latency_slack_s: float = Field(0.05, ge=0, description="added to stable's p99 before "
                                   "the ratio: bucketed p99s of fast requests are coarse")


class RolloutPlan(Strict):
    steps: list[Step] = Field(default_factory=lambda: [
        Step(share=s, hold_s=300) for s in (0.05, 0.25, 0.5, 1.0)], min_length=1)
    judge: Judgement = Field(default_factory=Judgement)

    @model_validator(mode="after")
    def _check(self):
        shares = [s.share for s in self.steps]
        if any(b <= a for a, b in zip(shares, shares[1:], strict=False)):
            raise ValueError(f"step shares must increase, got {shares}")
        if shares[-1] != 1.0:
            raise ValueError(f"the last step must send all traffic (share 1.0), got {shares[-1]}")
        return self


def load_plan(path: str | Path) -> RolloutPlan:
    """A plan file; errors name the file and the field."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: {err}") from None
    try:
        return RolloutPlan.model_validate(doc or {})
    except ValidationError as err:
        raise ConfigError(describe(err, str(path))) from None


# ---- which requests go to the canary


def bucket(key: str) -> float:
    """A key's fixed place in [0, 1): uniform over keys, the same in every frontend."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def to_canary(key: str | None, share: float, rng: Callable[[], float] = random.random) -> bool:
    """Whether a new request goes to the canary. With a key, `bucket(key) < share`: sticky
    while the share holds, and a conversation on the canary stays there as the share grows;
    without one, a fresh draw per request."""
    if share <= 0:
        return False
    if share >= 1:
        return True
    return (bucket(key) if key else rng()) < share


def session_key(headers: Mapping[str, str], user: str | None) -> str | None:
    """The conversation key a client sent: the header first, then the body's `user`."""
    return headers.get(SESSION_HEADER) or user or None


# ---- the rollout's progress

State = Literal["running", "paused", "promoted", "rolled_back", "aborted", "finished"]


@dataclass
class Rollout:
    """One rollout's position in its plan. `tick` with the judge's verdict on the current
    step moves it on; a failing verdict rolls it back at once, whatever the hold."""

    plan: RolloutPlan
    started: float  # when the current step began (shifted by pauses)
    step: int = 0
    state: State = "running"
    reason: str | None = None
    paused_at: float | None = None
    history: list[str] = field(default_factory=list)

    @property
    def share(self) -> float:
        if self.state in ("running", "paused"):
            return self.plan.steps[self.step].share
        return 1.0 if self.state == "promoted" else 0.0

    @property
    def done(self) -> bool:
        return self.state in ("promoted", "rolled_back", "aborted", "finished")

    def tick(self, now: float, verdict: str, why: str = "") -> None:
        """`verdict`: "fail" (rolls back), "pass" or "wait" (not enough samples yet)."""
        if self.state != "running":
            return
        if verdict == "fail":
            self._end("rolled_back", f"step {self.step} (share {self.share}): {why}")
            return
        if verdict != "pass" or now - self.started < self.plan.steps[self.step].hold_s:
            return
        self.history.append(f"step {self.step} (share {self.share}) passed")
        if self.step + 1 == len(self.plan.steps):
            self._end("promoted", "every step passed")
        else:
            self.step += 1
            self.started = now

    def pause(self, now: float) -> None:
        if self.state == "running":
            self.state, self.paused_at = "paused", now

    def resume(self, now: float) -> None:
        """The step's hold counts on from where it was paused."""
        if self.state == "paused":
            self.started += now - self.paused_at
            self.state, self.paused_at = "running", None

    def abort(self, why: str = "aborted by the operator") -> None:
        if not self.done:
            self._end("aborted", why)

    def finish(self, why: str) -> None:
        """The rollout is over (after a promotion: the stable version now carries the
        canary's sections): all traffic to stable."""
        if self.state != "finished":
            self._end("finished", why)

    def _end(self, state: State, why: str) -> None:
        self.state, self.reason = state, why
        self.history.append(f"{state}: {why}")
