"""The engine core: one LLMEngine's step loop behind a ZMQ socket, in a process of its own.

Frontends send requests and aborts; after every step the core sends each frontend ONE
message with the new tokens of all its requests (vLLM v1's EngineCoreOutputs shape), so
the cost of moving tokens grows with steps, not with tokens x streams. The loop owns its
interpreter: no event loop, Serve machinery or GIL neighbour between steps. The model
replica (a Serve actor) is its control plane: it starts the process, reads the stats the
core sends it twice a second, answers health checks and reports load to the routers.

Messages are msgpack; frontend -> core (a DEALER per frontend, the core's ROUTER):
  ["add", request_id, prompt_ids, params, queued_s, movable, cache_salt, after]
  ["abort", request_id]     ["watch"] (send me stats)     ["fault"] (tests only)
core -> peer:
  ["out", [[request_id, token_ids, finish_reason, error, prompt_tokens, cached_tokens,
            logprobs, prompt_logprobs]...]]   (the last two: None unless asked for)
  ["hb"] (a heartbeat while a peer has requests here and no output went out for a while)
  ["stats", {...}]

A failure the core cannot contain (an exception outside a step; a tensor-parallel step:
its ranks are out of step) ends every request with finish_reason "dead" and refuses new
ones the same way: frontends move those streams to another replica.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections import deque
from dataclasses import asdict

import msgpack
import zmq

from cluster import stack_sampler
from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine, RequestOutput
from cluster.engine.sequence import SamplingParams
from cluster.load import ReplicaLoad

log = logging.getLogger(__name__)

STATS_EVERY_S = 0.5
HEARTBEAT_S = 0.5


def pack(obj) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes):
    return msgpack.unpackb(data, raw=False)


class RequestClock:
    """Per-request timings inside the core, for the replica's latency histograms."""

    __slots__ = ("start", "last", "n_out", "n_prompt", "ttft")

    def __init__(self, n_prompt: int):
        self.start = self.last = time.monotonic()
        self.n_out, self.n_prompt, self.ttft = 0, n_prompt, None


class EngineCore:
    def __init__(self, engine: LLMEngine, host: str = "127.0.0.1",
                 move_after_s: float | None = None, kv_hot: float = 0.95,
                 score_hot: float = 4.0):
        self.engine = engine
        self.move_after_s, self.kv_hot, self.score_hot = move_after_s, kv_hot, score_hot
        self.ctx = zmq.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 0)  # a peer that left: drop, not raise
        self.sock.setsockopt(zmq.LINGER, 0)
        port = self.sock.bind_to_random_port(f"tcp://{host}")
        self.addr = f"tcp://{host}:{port}"
        self.owner: dict[str, bytes] = {}  # request id -> the frontend that sent it
        self.clocks: dict[str, RequestClock] = {}
        self.watchers: set[bytes] = set()
        self.last_sent: dict[bytes, float] = {}
        self.failure: str | None = None
        self.stopping = False
        self.requests = self.moved = self.messages = self.aborted = 0
        self.arrivals = 0  # requests offered, refused ones too (fault_error_share)
        self.obs: dict = self._new_obs()
        self.ttfts: deque[tuple[float, float]] = deque(maxlen=1024)
        self.tok_samples: deque[tuple[float, int]] = deque(maxlen=20)
        self._next_tick = 0.0
        self._next_move_check = 0.0

    @staticmethod
    def _new_obs() -> dict:
        # itl: gap -> rows that saw it. The rows of a step that emitted in the step before
        # share one gap (the same two clocks), so 1,000 streams add a few keys a step, not
        # 1,000 entries that the replica then observed one by one (~10 us each: 0.65 of a
        # core at 64k tok/s on an H100 host)
        return {"ttft": [], "queue": [], "prefill": [], "itl": {}, "done": []}

    # ---- the loop

    def run(self) -> None:
        try:
            while not self.stopping:
                busy = self.engine.has_work() and self.failure is None
                # two lines, not one computed timeout: a profile tells a busy loop's look
                # for messages from an idle core's wait for them
                if busy:
                    ready = self.sock.poll(0)
                else:
                    ready = self.sock.poll(50)
                if ready:
                    self._drain()
                if self.engine.has_work() and self.failure is None:
                    self._send(self._step())
                    self._maybe_move()
                self._tick()
        except BaseException as err:  # the loop itself broke: say so to everyone
            log.exception("engine core loop failed")
            self._die(f"engine loop failed: {type(err).__name__}: {err}")
            self._serve_dead()

    def _drain(self) -> None:
        changed = False
        while True:
            try:
                peer, data = self.sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            changed = True
            msg = unpack(data)
            kind = msg[0]
            if kind == "add":
                self._add(peer, *msg[1:])
            elif kind == "abort":
                self._abort(msg[1])
            elif kind == "watch":
                self.watchers.add(peer)
            elif kind == "stop":
                self.stopping = True
            elif kind == "fault":
                raise RuntimeError("fault injected into the engine loop")
        if changed:
            self.engine.publish()

    def _add(self, peer: bytes, rid: str, ids: list[int], params: dict, queued_s: float,
             movable: bool, cache_salt: str, after: str | None = None) -> None:
        if self.failure is not None:
            self._send_to(peer, [[rid, [], "dead", self.failure, 0, 0]])
            return
        if self._injected_error():
            self._send_to(peer, [[rid, [], "error", "fault injected", len(ids), 0]])
            return
        try:
            params["logit_bias"] = [tuple(b) for b in params.get("logit_bias", ())]
            self.engine.add_request(rid, ids, SamplingParams(**params), queued_s, movable,
                                    cache_salt, after)
        except Exception as err:  # a bad request must never stop the loop
            self._send_to(peer, [[rid, [], "error", str(err), len(ids), 0]])
            return
        self.requests += 1
        self.owner[rid] = peer
        self.clocks[rid] = RequestClock(len(ids))

    def _injected_error(self) -> bool:
        """engine.fault_error_share (tests): every request whose count crosses the next
        multiple of 1/share fails, so the failed share is exact at any count."""
        share = self.engine.cfg.fault_error_share
        self.arrivals += 1
        return int(self.arrivals * share) > int((self.arrivals - 1) * share)

    def _abort(self, rid: str) -> None:
        if self.engine.abort(rid):
            self.aborted += 1
            self._finished(rid, "abort")

    def _step(self) -> list[RequestOutput]:
        try:
            return self.engine.step()
        except Exception as err:
            if self.engine.runner.peers is not None:
                raise  # tensor-parallel ranks are out of step: the replica must restart
            log.exception("engine step failed")
            out = []
            for rid in list(self.engine.seqs):
                self.engine.abort(rid)
                out.append(RequestOutput(rid, [], "error", error=f"engine error: {err}"))
            return out

    def _send(self, outputs: list[RequestOutput]) -> None:
        """One message per frontend for this step's outputs."""
        now = time.monotonic()
        by_peer: dict[bytes, list] = {}
        for o in outputs:
            peer = self.owner.get(o.request_id)
            if peer is None:
                continue
            by_peer.setdefault(peer, []).append(
                [o.request_id, o.new_token_ids, o.finish_reason, o.error,
                 o.num_prompt_tokens, o.num_cached_tokens, o.logprobs, o.prompt_logprobs])
            self._observe(o, now)
        for peer, rows in by_peer.items():
            self._send_to(peer, rows, now)

    def _send_to(self, peer: bytes, rows: list, now: float | None = None) -> None:
        # two sends, not send_multipart: its Python side cost 7.8 against 4.4 us a message
        # (12 frontends: once per frontend per step)
        self.sock.send(peer, zmq.SNDMORE)
        self.sock.send(pack(["out", rows]))
        self.messages += 1
        self.last_sent[peer] = now or time.monotonic()

    def _observe(self, o: RequestOutput, now: float) -> None:
        c = self.clocks.get(o.request_id)
        if c is None:
            return
        if o.finish_reason == "moved":
            self.moved += 1
            self.clocks.pop(o.request_id)
            self.owner.pop(o.request_id, None)
            return
        if o.new_token_ids:
            if c.n_out == 0:
                c.ttft = now - c.start
                self.obs["ttft"].append(c.ttft)
                self.ttfts.append((now, c.ttft))
                if o.queue_s is not None:
                    self.obs["queue"].append(o.queue_s)
                    self.obs["prefill"].append(o.prefill_s)
            else:
                itl = self.obs["itl"]
                gap = (now - c.last) / len(o.new_token_ids)
                itl[gap] = itl.get(gap, 0) + 1
            c.n_out += len(o.new_token_ids)
            c.last = now
        if o.finish_reason:
            self._finished(o.request_id, o.finish_reason)

    def _finished(self, rid: str, reason: str) -> None:
        c = self.clocks.pop(rid, None)
        self.owner.pop(rid, None)
        if c is not None:
            self.obs["done"].append((c.n_prompt, c.n_out, reason, c.ttft,
                                     time.monotonic() - c.start))

    def _maybe_move(self) -> None:
        """While this replica is hot, queued requests that waited move_after_s without
        starting go back to their frontends ("moved") to be routed elsewhere."""
        now = time.monotonic()
        if self.move_after_s is None or now < self._next_move_check:
            return
        self._next_move_check = now + 0.1
        if ReplicaLoad.of(self.load_report()).is_hot(self.kv_hot, self.score_hot):
            moved = self.engine.release_waiting(self.move_after_s)
            if moved:
                self.engine.publish()
                self._send(moved)

    # ---- control: heartbeats and stats

    def _tick(self) -> None:
        now = time.monotonic()
        if now < self._next_tick:
            return
        self._next_tick = now + min(STATS_EVERY_S, HEARTBEAT_S)
        for peer in set(self.owner.values()):  # a peer with live requests hears from us
            if now - self.last_sent.get(peer, 0.0) >= HEARTBEAT_S:
                self.sock.send_multipart([peer, pack(["hb"])])
                self.last_sent[peer] = now
        if self.watchers:
            stats = pack(["stats", self.stats_report(now)])
            for peer in self.watchers:
                self.sock.send_multipart([peer, stats])

    def load_report(self) -> dict:
        s = self.engine.snapshot
        return {"running": s.running, "waiting": s.waiting, "waiting_tokens": s.waiting_tokens,
                "kv_used": s.kv_blocks_used, "kv_total": s.kv_blocks_total,
                "max_num_seqs": self.engine.cfg.max_num_seqs, "step_s": s.step_s,
                "step_a_s": s.step_a_s, "step_b_s": s.step_b_s, "pace_age_s": s.pace_age_s}

    def stats_report(self, now: float) -> dict:
        eng = self.engine
        eng.publish()  # an idle core runs no steps: its newest cached blocks must show too
        self.tok_samples.append((now, eng.generated_tokens))
        t0, g0 = self.tok_samples[0]
        recent = sorted(t for when, t in self.ttfts if now - when < 30.0)
        gaps = []
        while eng.idle_gaps:
            gaps.append(eng.idle_gaps.popleft())
        obs, self.obs = self.obs, self._new_obs()
        obs["itl"] = list(obs["itl"].items())  # [gap, rows] pairs (msgpack maps: str keys)
        return {**self.load_report(), "snapshot": asdict(eng.snapshot),
                "prefix": list(eng.prefix_digests), "requests": self.requests,
                "moved": self.moved, "messages": self.messages, "aborted": self.aborted,
                "tok_s": (eng.generated_tokens - g0) / max(1e-3, now - t0),
                "ttft_p95_ms": recent[int(0.95 * (len(recent) - 1))] * 1000 if recent else 0.0,
                "idle_gaps": gaps, "obs": obs, "failure": self.failure, "pid": os.getpid(),
                "device": str(eng.device),
                "kv_tier": eng.blocks.tier.stats() if eng.blocks.tier is not None else None,
                # which of the pool's blocks this engine can fetch: the routers' index is by
                # model key (cluster/kv_index.py)
                "kv_key": eng.blocks.tier.key.hex() if eng.blocks.tier is not None
                and eng.blocks.tier.pool is not None else ""}

    def _die(self, why: str) -> None:
        self.failure = why
        rows: dict[bytes, list] = {}
        for rid, peer in self.owner.items():
            rows.setdefault(peer, []).append([rid, [], "dead", why, 0, 0])
        for peer, r in rows.items():
            self._send_to(peer, r)
        self.owner.clear()

    def _serve_dead(self) -> None:
        """After a fatal failure: refuse every new request (so frontends go elsewhere) and
        keep reporting the failure to the control plane until the replica is replaced."""
        while not self.stopping:
            try:
                if self.sock.poll(100):
                    peer, data = self.sock.recv_multipart(zmq.NOBLOCK)
                    msg = unpack(data)
                    if msg[0] == "add":
                        self._send_to(peer, [[msg[1], [], "dead", self.failure, 0, 0]])
                    elif msg[0] == "watch":
                        self.watchers.add(peer)
                    elif msg[0] == "stop":
                        return
                now = time.monotonic()
                if now >= self._next_tick:
                    self._next_tick = now + STATS_EVERY_S
                    report = pack(["stats", {"failure": self.failure, "pid": os.getpid()}])
                    for peer in self.watchers:
                        self.sock.send_multipart([peer, report])
            except zmq.ZMQError:
                return


def _watch_parent(parent: int) -> None:
    """Ends this process when the replica that started it is gone (a killed actor runs no
    cleanup; an orphaned core would hold its GPU memory)."""
    while True:
        if os.getppid() != parent:
            os._exit(0)
        time.sleep(1.0)


def main() -> None:
    """`python -m cluster.engine.core` with a JSON spec on stdin; prints `READY <addr>`."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s engine-core %(levelname)s %(message)s")
    spec = json.loads(sys.stdin.readline())
    threading.Thread(target=_watch_parent, args=(spec["parent_pid"],), daemon=True).start()
    pool, pool_cfg = None, spec.get("kv_pool")
    if pool_cfg:  # tier 2 of the KV cache: this process joins the Ray cluster for it
        from cluster.kv_pool import connect

        ready = os.dup(1)  # Ray's start-up output must not come before READY on the pipe
        os.dup2(2, 1)
        pool = connect(spec.get("ray_address"), pool_cfg["capacity_bytes"],
                       pool_cfg["label_selector"], pool_cfg["max_fetch_wait_s"],
                       pool_cfg.get("write_through_hits"), pool_cfg.get("transport", "auto"))
        os.dup2(ready, 1)
        os.close(ready)
    engine = LLMEngine(spec["model_dir"], EngineConfig.model_validate(spec["engine"]),
                       kv_pool=pool,
                       max_fetch_wait_s=pool_cfg["max_fetch_wait_s"] if pool_cfg else 1.0)
    engine.step_delay_s = spec.get("step_delay_s", 0.0)
    core = EngineCore(engine, spec["host"], spec.get("move_after_s"),
                      spec.get("kv_hot", 0.95), spec.get("score_hot", 4.0))
    print(f"READY {core.addr}", flush=True)
    os.dup2(2, 1)  # nobody reads the pipe after READY: a stray print must not fill it and block
    stack_sampler.start_from_env("engine-core")  # where the loop's time goes, when asked
    core.run()


if __name__ == "__main__":
    main()
