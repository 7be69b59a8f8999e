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

import torch


class StepClock:
    def __init__(self, cuda: bool, keep: int = 4096):
        self.cuda = cuda
        self.gaps: deque[float] = deque(maxlen=keep)  # seconds; drained by the metrics
        self._prev_end = None  # the last step's end mark
        self._open: deque = deque()  # (previous end, begin) pairs not yet measured

    def _mark(self):
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def begin(self) -> None:
        """Right before a step's first kernel is issued (its inputs are built)."""
        mark = self._mark()
        if self._prev_end is not None:
            self._open.append((self._prev_end, mark))

    def end(self) -> None:
        """Right after a step's last kernel (or host read) is issued."""
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
