"""Runs LLMEngine on a background thread and streams its outputs to asyncio callers.

The step loop never waits on the event loop: requests and aborts arrive through a queue,
outputs leave through call_soon_threadsafe. A caller that stops listening aborts its request,
which frees its KV blocks on the next loop turn. While `is_hot()` says this replica is
overloaded, requests that queued longer than `move_after_s` without starting are handed back
(finish_reason "moved") for the caller to send elsewhere; that happens on this thread,
between steps, so a request is either moved or scheduled, never both.
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


class AsyncEngine:
    MOVE_CHECK_S = 0.1

    def __init__(self, engine: LLMEngine, move_after_s: float | None = None,
                 is_hot: Callable[[], bool] = lambda: False):
        self.engine = engine
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
                       movable: bool = False) -> AsyncIterator[RequestOutput]:
        """Yields outputs as steps produce them, merging whatever piled up since the last."""
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        self._post(("add", request_id, prompt_token_ids, params, queued_s, movable))
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
                    raise EngineError(out.error)
                yield out
        finally:
            self._streams.pop(request_id, None)
            if not done:
                self._post(("abort", request_id))

    def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def _post(self, msg: tuple) -> None:
        self._inbox.put(msg)
        self._wake.set()

    def _emit(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        if stream is not None:
            loop, q = stream
            loop.call_soon_threadsafe(q.put_nowait, out)

    def _drain_inbox(self) -> None:
        while True:
            try:
                msg = self._inbox.get_nowait()
            except queue.Empty:
                return
            if msg[0] == "add":
                _, rid, *args = msg
                try:
                    self.engine.add_request(rid, *args)
                except Exception as err:  # a bad request must never stop the step loop
                    self._emit(RequestOutput(rid, [], "error", error=str(err)))
            else:
                self.engine.abort(msg[1])

    def _loop(self) -> None:
        while True:
            self._drain_inbox()
            if not self.engine.has_work():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # a failed step fails its requests, not the replica
                log.exception("engine step failed")
                for rid in list(self.engine.seqs):
                    self.engine.abort(rid)
                    self._emit(RequestOutput(rid, [], "error", error=f"engine error: {err}"))
                continue
            for out in outputs:
                self._emit(out)
            self._maybe_move()

    def _maybe_move(self) -> None:
        now = time.monotonic()
        if self.move_after_s is None or now < self._next_move_check:
            return
        self._next_move_check = now + self.MOVE_CHECK_S
        if self.is_hot():
            for out in self.engine.release_waiting(self.move_after_s):
                self._emit(out)
