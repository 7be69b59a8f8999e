"""A frontend's connection to an engine core: silence means lost only while requests wait.

A stand-in core (a ROUTER socket) answers when the test says, so that the timing is exact."""

from __future__ import annotations

import asyncio

import msgpack
import zmq
import zmq.asyncio

from cluster import engine_client
from cluster.engine.sequence import SamplingParams
from cluster.protocol import EngineRequest


def request(rid: str) -> EngineRequest:
    return EngineRequest(request_id=rid, prompt_token_ids=[1, 2, 3],
                         params=SamplingParams(max_tokens=1))


async def scenario(idle_s: float, answer_after_s: float, lost_after_s: float):
    engine_client.LOST_AFTER_S = lost_after_s
    core = zmq.asyncio.Context.instance().socket(zmq.ROUTER)
    core.setsockopt(zmq.LINGER, 0)
    port = core.bind_to_random_port("tcp://127.0.0.1")
    client = engine_client.EngineClient()
    got: list = []
    addr = f"tcp://127.0.0.1:{port}"
    try:
        # a first request, answered at once; then the connection idles (no heartbeats)
        first = engine_client.Stream("first", got.extend)
        client.submit(addr, request("first"), first)
        peer, data = await core.recv_multipart()
        assert msgpack.unpackb(data)[0] == "add"
        await core.send_multipart([peer, msgpack.packb(["out", [["first", [7], "length",
                                                                 None, 1, 1]]])])
        await asyncio.sleep(idle_s)
        second = engine_client.Stream("second", got.extend)
        client.submit(addr, request("second"), second)
        await core.recv_multipart()
        await asyncio.sleep(answer_after_s)
        await core.send_multipart([peer, msgpack.packb(["out", [["second", [8], "length",
                                                                  None, 1, 1]]])])
        await asyncio.sleep(0.3)
        return {st.request_id: row[2] for st, row in got}
    finally:
        for conn in client.conns.values():
            client._close(conn)
        core.close(0)


def test_an_idle_connection_is_not_lost_when_its_next_request_is_slow(monkeypatch):
    """Idle for longer than the loss bound, then a request whose first answer takes a second:
    the core is alive (silence counts from the request, not from the last message)."""
    monkeypatch.setattr(engine_client, "LOST_AFTER_S", engine_client.LOST_AFTER_S)
    out = asyncio.run(scenario(idle_s=2.0, answer_after_s=1.0, lost_after_s=1.5))
    assert out == {"first": "length", "second": "length"}


def test_a_core_silent_past_the_bound_with_requests_waiting_is_lost(monkeypatch):
    monkeypatch.setattr(engine_client, "LOST_AFTER_S", engine_client.LOST_AFTER_S)
    out = asyncio.run(scenario(idle_s=0.1, answer_after_s=2.5, lost_after_s=1.0))
    assert out["first"] == "length" and out["second"] == "dead"
