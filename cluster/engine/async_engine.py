"""Runs LLMEngine on a background thread and streams its outputs to asyncio callers.

The step loop never waits on the event loop: requests and aborts arrive through a queue,
outputs leave through call_soon_threadsafe. A caller that stops listening aborts its request,
which frees its KV blocks on the next loop turn. While `is_hot()` says this replica is
overloaded, requests that queued longer than `move_after_s` without starting are handed back
(finish_reason "moved") for the caller to send elsewhere; that happens on this thread,
between steps, so a request is either moved or scheduled, never both.

Failures that the engine cannot contain (an exception outside a step, a tensor-parallel step
that failed: its ranks are out of step) stop the loop for good: every stream gets EngineDead,
new requests are refused at once, and `health()` says why, so the replica's health check
has Serve replace it. A loop that stops making progress while work waits says so too.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable

from cluster.engine.engine import LLMEngine, RequestOutput
from cluster.engine.sequence import SamplingParams

log = logging.getLogger(__name__)


class EngineError(RuntimeError):
    pass


class EngineDead(EngineError):
    """The engine loop stopped: this replica cannot serve anything until it is replaced."""


class InjectedFault(RuntimeError):
    """Raised inside the engine loop on request (fault-injection tests only)."""


class AsyncEngine:
    MOVE_CHECK_S = 0.1

    def __init__(self, engine: LLMEngine, move_after_s: float | None = None,
                 is_hot: Callable[[], bool] = lambda: False, stall_after_s: float = 120.0):
        self.engine = engine
        self.stall_after_s = stall_after_s
        self.failure: str | None = None  # why the loop stopped for good
        self.last_progress = time.monotonic()  # the last step's end, or the last idle wait
        self.stream_interval_s = engine.cfg.stream_interval_s
        self.move_after_s, self.is_hot = move_after_s, is_hot
        self._next_move_check = 0.0
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    async def generate(self, request_id: str, prompt_token_ids: list[int],
                       params: SamplingParams, queued_s: float = 0.0,
                       movable: bool = False, cache_salt: str = ""
                       ) -> AsyncIterator[RequestOutput]:
        """Yields outputs as steps produce them, merging whatever piled up since the last."""
        if self.failure:
            raise EngineDead(self.failure)
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._post(("add", request_id, prompt_token_ids, params, queued_s, movable,
                    cache_salt))
        if self.failure:  # the loop died around our post: nobody will read it
            self._streams.pop(request_id, None)
            raise EngineDead(self.failure)
        done, last = False, None
        try:
            while not done:
                out = await q.get()
                if last is not None and self.stream_interval_s and not out.finish_reason:
                    # every message costs a hop through Serve per stage: with many streams,
                    # fewer, fuller messages keep the stages from becoming the bottleneck
                    await asyncio.sleep(max(0.0, last + self.stream_interval_s -
                                            time.monotonic()))
                last = time.monotonic()
                while not q.empty() and not out.finish_reason:
                    nxt = q.get_nowait()
                    out.new_token_ids += nxt.new_token_ids
                    out.finish_reason, out.error = nxt.finish_reason, nxt.error
                done = out.finish_reason is not None
                if out.error:
                    raise (EngineDead if out.finish_reason == "dead" else EngineError)(out.error)
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not done:
                self._post(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def inject_fault(self) -> None:
        """Makes the engine loop raise outside any step (fault-injection tests)."""
        self._post(("fault",))

    def health(self) -> str | None:
        """None while the engine serves; else what is wrong (the replica's health check)."""
        if self.failure:
            return self.failure
        if not self._thread.is_alive():
            return "the engine thread is not running"
        snap = self.engine.snapshot
        stalled = time.monotonic() - self.last_progress
        if snap.running + snap.waiting and stalled > self.stall_after_s:
            return (f"no engine step finished for {stalled:.0f} s with {snap.running} "
                    f"running and {snap.waiting} waiting")
        peers = self.engine.runner.peers
        if peers is not None and not peers.alive():
            return "a tensor-parallel peer of this replica died"
        return None

    def _post(self, msg: tuple) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def _emit(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _drain_inbox(self) -> None:
        changed = False
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                if changed:  # readers see added and aborted requests now, not next step
                    self.engine.publish()
                return
            changed = True
            if msg[0] == "add":
                _, rid, *args = msg
                try:
                    self.engine.add_request(rid, *args)
                except Exception as err:  # a bad request must never stop the step loop
                    self._emit(RequestOutput(rid, [], "error", error=str(err)))
            elif msg[0] == "abort":
                self.engine.abort(msg[1])
            else:
                raise InjectedFault("fault injected into the engine loop")

    def _loop(self) -> None:
        try:
            while True:
                self._drain_inbox()
                if not self.engine.has_work():
                    self.last_progress = time.monotonic()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                outputs = self._step()
                self.last_progress = time.monotonic()
                for out in outputs:
                    self._emit(out)
                self._maybe_move()
        except BaseException as err:  # the loop is gone: say so to everyone, for good
            log.exception("the engine loop stopped")
            self._die(f"engine loop failed: {type(err).__name__}: {err}")

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as err:
            if self.engine.runner.peers is not None:
                raise  # tensor-parallel ranks are out of step: the replica must restart
            # a failed step fails its requests, not the replica
            log.exception("engine step failed")
            out = []
            for rid in list(self.engine.seqs):
                self.engine.abort(rid)
                out.append(RequestOutput(rid, [], "error", error=f"engine error: {err}"))
            return out

    def _die(self, why: str) -> None:
        self.failure = why
        for rid in list(self._streams):
            self._emit(RequestOutput(rid, [], "dead", error=why))

    def _maybe_move(self) -> None:
        now = time.monotonic()
        if self.move_after_s is None or now < self._next_move_check:
            return
        self._next_move_check = now + self.MOVE_CHECK_S
        if self.is_hot():
            for out in self.engine.release_waiting(self.move_after_s):
                self._emit(out)
