"""How long the device idles between engine steps while work waits.

On a GPU the gaps come from CUDA events recorded just before a step's first kernel and
after its last: with steps launched ahead a step is queued before the previous one ends, and
its gap is then ~0 for real; when the host falls behind, the events show by how much. Host
timestamps would count a queued step's launch as the device's start. On the CPU a step runs
while it is launched, so host timestamps are the truth there.
"""

from __future__ import annotations

import time
from collections import deque

# On a GPU one gap in this many is measured: two timing events per step were a visible
# share of a small model's host loop (batch 64, 0.5B shape on an H100), and the gaps feed
# a histogram, which a regular sample describes as well.
CUDA_EVERY = 8


class StepClock:
    def __init__(self, cuda: bool, keep: int = 4096, every: int | None = None):
        self.cuda = cuda
        self.every = every or (CUDA_EVERY if cuda else 1)
        self.gaps: deque[float] = deque(maxlen=keep)  # seconds; drained by the metrics
        self._prev_end = None  # the last step's end mark, when the next gap is measured
        self._open: deque = deque()  # (previous end, begin) pairs not yet measured
        self._steps = 0

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        import torch  # here: the metrics of torch-free processes import CUDA_EVERY

        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def begin(self) -> None:
        """Right before a step's first kernel is issued (its inputs are built)."""
        if self._prev_end is not None:
            self._open.append((self._prev_end, self._mark()))
            self._prev_end = None

    def end(self) -> None:
        """Right after a step's last kernel (or host read) is issued."""
        self._steps += 1
        if self._steps % self.every == 0:  # the gap before the next step is measured
            self._prev_end = self._mark()

    def reset(self) -> None:
        """No work is waiting (or a step failed): the time until the next step is no gap."""
        self._prev_end = None
        self._open.clear()

    def collect(self) -> None:
        """Measures every gap whose second mark the device has passed."""
        while self._open:
            a, b = self._open[0]
            if self.cuda:
                if not b.query():
                    return
                gap = a.elapsed_time(b) / 1000.0
            else:
                gap = b - a
            self._open.popleft()
            self.gaps.append(max(0.0, gap))
