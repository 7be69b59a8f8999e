"""How long an engine's decode step takes at a given batch size: a line, step = a + b x batch,
fitted to its recent decode steps.

Routers compare replicas by the wait a new request would see, in steps of the replica's own
pace. One recent average step time would mislead them twice over: a step that prefills takes
many times a decode step (a replica whose last steps prefilled long prompts looks slow), and
a decode step grows with the batch (an idle replica still reports the step time of the batch
it last ran, and loses new work to a busy one that runs a smaller batch). The line answers
for the batch the new request would join. Decode steps only; weights fall by DECAY per step,
so the fit follows a replica whose speed changes (a neighbour's load on its host) within a
few dozen steps.
"""

from __future__ import annotations

import time

DECAY = 0.97  # ~33 steps of memory


class StepPace:
    def __init__(self):
        self.w = self.n = self.t = self.nn = self.nt = 0.0  # weighted sums
        self.at = 0.0  # time.monotonic() of the last decode step seen

    def observe(self, batch: int, dt: float) -> None:
        d, self.at = DECAY, time.monotonic()
        self.w, self.n, self.t = d * self.w + 1, d * self.n + batch, d * self.t + dt
        self.nn, self.nt = d * self.nn + batch * batch, d * self.nt + batch * dt

    def age_s(self, now: float) -> float:
        """Seconds since the last decode step (0 before any)."""
        return now - self.at if self.at else 0.0

    def line(self) -> tuple[float, float]:
        """(a, b): seconds per step at batch n ~ a + b n; (0, 0) before any decode step.
        Batches of one size give no slope: the mean step time at b = 0."""
        if not self.w:
            return 0.0, 0.0
        mean_n, mean_t = self.n / self.w, self.t / self.w
        var = self.nn / self.w - mean_n * mean_n
        if var < 0.25:  # (nearly) one batch size: no slope to read
            return mean_t, 0.0
        b = max(0.0, (self.nt / self.w - mean_n * mean_t) / var)
        a = max(0.1 * mean_t, mean_t - b * mean_n)  # a step costs something at any batch
        return a, b
