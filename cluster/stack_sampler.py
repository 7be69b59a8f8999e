"""A wall-clock profile of one thread from inside its process: a daemon thread reads the
thread's Python stack every few milliseconds (sys._current_frames) and keeps counts of the
collapsed stacks, in py-spy's raw format, so `cluster.bench.pyspy.summarize` reads both.

Why beside py-spy: py-spy attaches with ptrace, which some containers forbid (on the lent
GPU machine it gave no profile; its error went unread then). The sampler needs the GIL to
look. A thread running Python gives the GIL up at the interpreter's switch interval (5 ms
by default) or earlier where a call releases it (a socket send, a CUDA event): with 5 ms,
most looks landed on those calls and charged them the Python time before them (a first GPU
profile put 35% of the engine core in ZMQ's send). So the sampler shortens the switch
interval to a tenth of its own: a look waits at most that long, and lands where the thread
is. Each look counts the time since the last one (units of 0.1 ms). It slows the thread it
samples: a pure-Python loop ran 8-14% slower under it on a 2-core machine (noisy); figures
taken while sampling say so.

Set TANDEM_PROFILE_DIR for the processes to profile (the engine core starts one for its
loop when it finds it); the file is rewritten every `flush_s` and when the process exits.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
import time
from collections import Counter
from pathlib import Path

ENV = "TANDEM_PROFILE_DIR"
UNIT_S = 1e-4  # a count in the file is this much of the thread's wall time


def _collapse(frame) -> str:
    names = []
    while frame is not None:
        code = frame.f_code
        names.append(f"{code.co_name} ({code.co_filename}:{frame.f_lineno})")
        frame = frame.f_back
    return ";".join(reversed(names))


class StackSampler:
    def __init__(self, out: Path, thread_id: int, interval_s: float = 0.005,
                 flush_s: float = 0.5):
        self.out, self.thread_id = out, thread_id
        self.interval_s, self.flush_s = interval_s, flush_s
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)

    def start(self) -> StackSampler:
        # a look waits for the GIL at most this long (see the module's note)
        sys.setswitchinterval(min(sys.getswitchinterval(), self.interval_s / 10))
        self.thread.start()
        atexit.register(self.stop)
        return self

    def _run(self) -> None:
        last = time.monotonic()
        next_flush = last + self.flush_s
        while not self.stopped.wait(self.interval_s):
            frame = sys._current_frames().get(self.thread_id)
            now = time.monotonic()
            if frame is not None:
                stack = _collapse(frame)
                with self.lock:
                    self.counts[stack] += max(1, round((now - last) / UNIT_S))
            del frame
            last = now
            if time.monotonic() >= next_flush:
                self.flush()
                next_flush = time.monotonic() + self.flush_s

    def flush(self) -> None:
        with self.lock:
            lines = [f"{stack} {n}" for stack, n in self.counts.items()]
        tmp = self.out.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(self.out)  # readers see the old profile or the new one, never half

    def stop(self) -> None:
        if not self.stopped.is_set():
            self.stopped.set()
            self.flush()


def start_from_env(role: str) -> StackSampler | None:
    """Samples the calling thread into $TANDEM_PROFILE_DIR/<role>-<pid>.raw, if that is set."""
    where = os.environ.get(ENV)
    if not where:
        return None
    d = Path(where)
    d.mkdir(parents=True, exist_ok=True)
    return StackSampler(d / f"{role}-{os.getpid()}.raw", threading.get_ident()).start()
