"""The engine core behind its socket (CPU): one message per step per frontend, aborts,
hot replicas handing queued requests back, a loop that breaks, and stats read from the
published snapshot while the loop runs."""

from __future__ import annotations

import threading
import time

import msgpack
import pytest
import zmq

from cluster.engine.core import EngineCore
from cluster.engine.sequence import SamplingParams
from tests.test_engine import make_engine


class Frontend:
    """A synchronous stand-in for a frontend: a DEALER on the core's socket."""

    def __init__(self, addr: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(addr)
        self.messages = 0

    def send(self, *msg) -> None:
        self.sock.send(msgpack.packb(list(msg), use_bin_type=True))

    def add(self, rid, ids, max_tokens=8, movable=False, salt=""):
        params = {"temperature": 0.0, "max_tokens": max_tokens, "ignore_eos": True}
        self.send("add", rid, ids, params, 0.0, movable, salt)

    def collect(self, rids, timeout_s=60) -> dict[str, tuple[list[int], str]]:
        out = {r: ([], None) for r in rids}
        deadline = time.monotonic() + timeout_s
        while any(out[r][1] is None for r in rids):
            assert self.sock.poll(int(1000 * (deadline - time.monotonic()))), out
            msg = msgpack.unpackb(self.sock.recv(), raw=False)
            if msg[0] != "out":
                continue
            self.messages += 1
            for rid, ids, reason, *_ in msg[1]:
                toks, _ = out[rid]
                out[rid] = (toks + ids, reason)
        return out

    def close(self):
        self.sock.close(0)


@pytest.fixture
def core(model_dir):
    made = []

    def start(**kw) -> EngineCore:
        c = EngineCore(make_engine(model_dir, **kw.pop("engine", {})), **kw)
        t = threading.Thread(target=c.run, daemon=True)
        t.start()
        made.append((c, t))
        return c

    yield start
    for c, t in made:
        c.stopping = True
        t.join(10)


def test_one_message_per_step_for_all_of_a_frontends_streams(core, model_dir):
    c = core()
    fe = Frontend(c.addr)
    rids = [f"r{i}" for i in range(8)]
    for i, rid in enumerate(rids):
        fe.add(rid, [1 + i, 2, 3], max_tokens=16)
    out = fe.collect(rids)
    expected = make_engine(model_dir).generate(
        [[1 + i, 2, 3] for i in range(8)],
        SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True))
    assert [out[r][0] for r in rids] == expected
    assert all(out[r][1] == "length" for r in rids)
    # 128 tokens of 8 streams in about one message per step, not one per token
    assert fe.messages <= 16 + 4, fe.messages
    fe.close()


def test_abort_frees_kv_within_a_step_and_frontends_stay_apart(core):
    c = core()
    a, b = Frontend(c.addr), Frontend(c.addr)
    a.add("long", [5, 6, 7] * 10, max_tokens=400)
    b.add("mine", [9, 9, 9], max_tokens=12)
    out = b.collect(["mine"])  # b never sees a's stream
    assert set(out) == {"mine"} and len(out["mine"][0]) == 12
    assert c.engine.snapshot.running == 1
    a.send("abort", "long")
    deadline = time.monotonic() + 2
    while c.engine.snapshot.kv_blocks_used and time.monotonic() < deadline:
        time.sleep(0.01)
    assert c.engine.snapshot.kv_blocks_used == 0 and c.engine.snapshot.running == 0
    a.close()
    b.close()


def test_hot_core_hands_back_queued_requests(core):
    """While hot, requests queued longer than move_after_s go back unstarted ("moved");
    a request that is not movable stays. A cool core moves nothing."""
    c = core(engine={"max_num_seqs": 1}, move_after_s=0.0, score_hot=0.5)
    fe = Frontend(c.addr)
    fe.add("first", [1, 2, 3], max_tokens=200)
    time.sleep(0.3)
    fe.add("movable", [4, 5, 6], max_tokens=4, movable=True)
    fe.add("stays", [7, 8, 9], max_tokens=4, movable=False)
    out = fe.collect(["first", "movable", "stays"])
    assert out["movable"] == ([], "moved")
    assert out["first"][1] == out["stays"][1] == "length" and len(out["stays"][0]) == 4
    fe.close()


def test_a_broken_loop_ends_every_stream_as_dead_and_refuses_new_ones(core):
    c = core()
    fe = Frontend(c.addr)
    fe.add("victim", [1, 2, 3], max_tokens=400)
    time.sleep(0.2)
    fe.send("fault")
    out = fe.collect(["victim"])
    assert out["victim"][1] == "dead"
    fe.add("later", [1, 2, 3])
    assert fe.collect(["later"])["later"] == ([], "dead")
    assert c.failure and "fault injected" in c.failure
    fe.close()


def test_stats_are_read_from_a_snapshot_while_the_core_runs(core):
    """Other threads (the replica's stats, the routers' reports) read the engine's
    published snapshot while the core's thread changes its queues every step."""
    c = core(engine={"max_num_seqs": 2})
    stop, seen, errors = threading.Event(), [], []

    def reader():
        while not stop.is_set():
            try:
                seen.append(c.engine.snapshot.waiting)
                c.load_report()
                assert isinstance(c.engine.prefix_digests, tuple)
            except Exception as err:  # noqa: BLE001 - any error is the failure
                errors.append(err)
            time.sleep(0.0005)  # a busy reader would only starve the core's thread of the GIL

    t = threading.Thread(target=reader)
    t.start()
    fe = Frontend(c.addr)
    rids = [f"r{i}" for i in range(40)]
    for i, rid in enumerate(rids):
        fe.add(rid, [1 + i, 2, 3], max_tokens=4)
    out = fe.collect(rids, timeout_s=180)
    stop.set()
    t.join()
    assert not errors and all(len(out[r][0]) == 4 for r in rids)
    assert max(seen) > 10  # the reader saw the queue while it was long
    time.sleep(0.1)
    assert c.engine.snapshot.waiting == 0 and c.engine.snapshot.running == 0
    fe.close()


def test_inter_token_gaps_travel_grouped_and_are_sampled_in_proportion(core):
    """A core report carries [gap, rows] pairs: rows of a step share a gap, so 8 streams of
    10 tokens give 72 rows under a few keys. The replica observes every row up to its cap,
    and above it a sample in proportion (the histogram keeps its shape)."""
    from collections import Counter

    from cluster.stage_metrics import EngineMetrics

    c = core()
    fe = Frontend(c.addr)
    rids = [f"g{i}" for i in range(8)]
    for i, rid in enumerate(rids):
        fe.add(rid, [5 + i, 6, 7], max_tokens=10)
    out = fe.collect(rids)
    assert all(len(out[r][0]) == 10 for r in rids)
    time.sleep(0.1)
    gaps = c.stats_report(time.monotonic())["obs"]["itl"]
    assert sum(n for _, n in gaps) == 8 * 9 and len(gaps) < 8 * 9 / 2
    assert all(g > 0 for g, _ in gaps)

    class Seen:  # the replica's histogram: what it was asked to observe
        def __init__(self):
            self.values = Counter()

        def observe(self, value, tags):
            self.values[value] += 1

    m = EngineMetrics.__new__(EngineMetrics)
    m.tags, m.itl = {}, Seen()
    m.token_gaps(gaps)
    assert m.itl.values == Counter(dict(gaps))  # under the cap: every row
    m.itl = Seen()
    m.token_gaps([[0.01, 30_000], [0.02, 10_000]], cap=2_000)
    fast, slow = m.itl.values[0.01], m.itl.values[0.02]
    assert fast + slow == 2_000 and 1_400 <= fast <= 1_600  # 3:1, as the rows were
    fe.close()
