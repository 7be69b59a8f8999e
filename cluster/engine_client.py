"""A frontend's connections to engine cores: requests out, one message per step back.

One ZMQ DEALER socket per engine core (cluster/engine/core.py) and one receive task on it,
which hands each step's tokens to the streams they belong to: one wake-up per stream per
step, no task or cross-thread hop per token. A core that goes silent (no output and no
heartbeat) or whose connection drops is declared lost: its streams end with
finish_reason "dead", which the frontend answers by moving them to another replica.

Runs on the CPU (Kunpeng) nodes: no torch here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import asdict

import msgpack
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from cluster.protocol import EngineRequest

log = logging.getLogger("ray.serve")

# A core sends a heartbeat every 0.5 s while we have requests there, but only between
# steps: one long prefill on a CPU may take seconds. A core that died drops its connection
# (or refuses one), which is noticed at once; silence this long means a hung core.
LOST_AFTER_S = 30.0


class Stream:
    """One request on a core. Its rows (the layout of core.py) go to `on_rows`, called in the
    receive task once per step with all of that step's (stream, row) pairs for the handler,
    so that their text is decoded in one batch; the handler wakes the stream's reader."""

    def __init__(self, request_id: str, on_rows: Callable[[list], None]):
        self.request_id = request_id
        self.event = asyncio.Event()
        self.conn: Connection | None = None
        self.on_rows = on_rows


class Connection:
    def __init__(self, client: EngineClient, addr: str):
        self.addr = addr
        self.sock = client.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
        self.connected = False
        self.sock.connect(addr)
        self.streams: dict[str, Stream] = {}
        self.heard = time.monotonic()
        self.lost = False
        self.messages = 0
        self.tasks = [asyncio.create_task(self._receive()), asyncio.create_task(self._watch())]

    def send(self, msg) -> None:
        self.sock.send(msgpack.packb(msg, use_bin_type=True), zmq.NOBLOCK)

    async def _receive(self) -> None:
        while not self.lost:
            try:
                data = await self.sock.recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            self.heard = time.monotonic()
            self.messages += 1
            msg = msgpack.unpackb(data, raw=False)
            if msg[0] != "out":
                continue
            batch: dict[Callable, list] = {}
            for row in msg[1]:
                st = self.streams.get(row[0])
                if st is None:
                    continue  # aborted here already
                if row[2] is not None:  # finished: no more rows for it
                    self.streams.pop(row[0], None)
                batch.setdefault(st.on_rows, []).append((st, row))
            for handler, items in batch.items():  # one call per handler per step
                handler(items)

    async def _watch(self) -> None:
        """Declares the core lost when its connection drops or it falls silent."""
        while not self.lost:
            try:
                event = parse_monitor_message(
                    await asyncio.wait_for(self.monitor.recv_multipart(), 0.5))["event"]
                if event == zmq.EVENT_CONNECTED:
                    self.connected = True
                elif event == zmq.EVENT_DISCONNECTED:
                    self._lose("its connection dropped")
                elif event == zmq.EVENT_CONNECT_RETRIED and not self.connected:
                    self._lose("it refused the connection")
            except asyncio.TimeoutError:
                if self.streams and time.monotonic() - self.heard > LOST_AFTER_S:
                    self._lose(f"silent for {LOST_AFTER_S:.0f} s")
            except (zmq.ZMQError, asyncio.CancelledError):
                return

    def _lose(self, why: str) -> None:
        log.warning("engine core %s lost: %s; %d streams move", self.addr, why,
                    len(self.streams))
        self.lost = True
        streams, self.streams = self.streams, {}
        for rid in streams:  # a hung core that wakes up must not go on with them
            try:
                self.send(["abort", rid])
            except zmq.ZMQError:
                break
        for st in streams.values():
            st.on_rows([(st, [st.request_id, [], "dead", f"engine core lost: {why}", 0, 0])])


class EngineClient:
    def __init__(self):
        self.ctx = zmq.asyncio.Context.instance()
        self.conns: dict[str, Connection] = {}

    def connection(self, addr: str) -> Connection:
        conn = self.conns.get(addr)
        if conn is None or conn.lost:
            if conn is not None:
                self._close(conn)
            conn = self.conns[addr] = Connection(self, addr)
        return conn

    def submit(self, addr: str, req: EngineRequest, stream: Stream) -> None:
        conn = self.connection(addr)
        stream.conn = conn
        if not conn.streams:
            # an idle core sends nothing (heartbeats go only while a peer has requests
            # there): silence counts from now, not from the last request minutes ago
            conn.heard = time.monotonic()
        conn.streams[req.request_id] = stream
        conn.send(["add", req.request_id, req.prompt_token_ids, asdict(req.params),
                   req.queued_s, req.movable, req.cache_salt, req.after])

    def abort(self, stream: Stream) -> None:
        """Ends a stream's generation (its KV blocks are freed on the core's next turn)."""
        conn = stream.conn
        if conn is not None and conn.streams.pop(stream.request_id, None) is not None \
                and not conn.lost:
            conn.send(["abort", stream.request_id])

    def _close(self, conn: Connection) -> None:
        for t in conn.tasks:
            t.cancel()
        conn.monitor.close(0)
        conn.sock.close(0)

    def messages(self) -> int:
        return sum(c.messages for c in self.conns.values())
