"""Routing policies on synthetic replica loads, and prefix affinity on the live cluster."""

from __future__ import annotations

import itertools
import time
from collections import Counter

from cluster.prefix_hash import prompt_digests
from cluster.router import (
    LeastLoad,
    PowerOfTwo,
    PrefixAware,
    ReplicaLoad,
    RoundRobin,
    order_replicas,
)

IDLE = ReplicaLoad(max_num_seqs=32)


def busy(n: float, kv: float = 0.2) -> ReplicaLoad:
    return ReplicaLoad(running=n, kv_usage=kv, max_num_seqs=32)


def test_round_robin_cycles():
    rr = RoundRobin()
    firsts = [rr.rank([IDLE] * 3, [])[0] for _ in range(6)]
    assert firsts == [0, 1, 2, 0, 1, 2]


def test_least_load_prefers_short_queue_and_free_kv():
    loads = [busy(20), busy(2, kv=0.9), busy(4)]
    assert LeastLoad().rank(loads, [])[0] == 2


def test_least_load_weighs_queues_by_replica_speed():
    slow = ReplicaLoad(running=4, max_num_seqs=32, pace_a=0.04)
    fast = ReplicaLoad(running=12, max_num_seqs=32, pace_a=0.02)
    assert LeastLoad().rank([slow, fast], [])[0] == 1  # longer queue, shorter wait
    swamped = ReplicaLoad(running=32, waiting=64, max_num_seqs=32, pace_a=0.02)
    assert LeastLoad().rank([slow, swamped], [])[0] == 0
    unknown = ReplicaLoad(running=12, max_num_seqs=32)  # no step time yet: queues only
    assert LeastLoad().rank([slow, unknown], [])[0] == 0


def test_a_replica_idle_after_long_prefills_is_judged_by_its_decode_pace():
    """Its last steps prefilled long prompts (an all-step average 10x the busy replica's),
    then nothing came: no step of its own corrects the figure, so a router that compared
    all-step times would send it nothing for as long as the other's queue stays short.
    At the same decode pace (the same line: step = a + b x batch) the idle replica takes
    the next request; by one average decode step (its last batch was larger) it would not."""
    line = dict(pace_a=0.002, pace_b=0.0002)
    idle = ReplicaLoad(max_num_seqs=32, step_s=0.030, **line)
    working = ReplicaLoad(running=4, max_num_seqs=32, step_s=0.003, **line)
    assert idle.pace_s < working.pace_s  # a batch of 1 against one of 5
    assert LeastLoad().rank([working, idle], [])[0] == 1
    assert LeastLoad.costs([working, idle])[1] < LeastLoad.costs([working, idle])[0]
    hashes = prompt_digests(list(range(64)), 16)  # a prompt neither holds: least load
    assert PrefixAware(margin=1.0).rank([working, idle], hashes)[0] == 1
    # and the pace still tells a slower replica: a step three times as long, not taken
    slow = ReplicaLoad(max_num_seqs=32, step_s=0.030, pace_a=0.008, pace_b=0.0006)
    assert LeastLoad().rank([working, slow], [])[0] == 0


def test_an_idle_replicas_old_pace_counts_at_the_fleets_best():
    """Its line from a larger batch makes it look 1.5x slower than the busy one: while the
    line is fresh, load and pace decide (the busy one keeps the request); once it is
    PACE_PROBE_AFTER_S old and the replica is still idle, it counts at the best pace and
    takes the request (a guess nobody tests is never corrected). Not while it runs work."""
    from cluster.load import PACE_PROBE_AFTER_S

    busy = ReplicaLoad(running=2, max_num_seqs=32, pace_a=0.002)
    fresh = ReplicaLoad(max_num_seqs=32, pace_a=0.003, pace_age_s=0.5)
    old = ReplicaLoad(max_num_seqs=32, pace_a=0.003, pace_age_s=PACE_PROBE_AFTER_S)
    assert LeastLoad().rank([busy, fresh], [])[0] == 0
    assert LeastLoad().rank([busy, old], [])[0] == 1
    working = ReplicaLoad(running=1, max_num_seqs=32, pace_a=0.003, pace_age_s=9.0)
    assert not working.pace_unproven()
    assert LeastLoad().rank([busy, working], [])[0] == 0
    # the report's age at the router adds to the age its replica reported
    assert ReplicaLoad.of({"step_a_s": 0.003, "pace_age_s": 1.5}, age_s=1.0).pace_unproven()


def test_step_pace_fits_a_line_through_decode_steps():
    from cluster.engine.step_pace import StepPace

    pace = StepPace()
    assert pace.line() == (0.0, 0.0)
    for n in [1, 4, 16, 8, 2, 32] * 10:
        pace.observe(n, 0.002 + 0.0003 * n)
    a, b = pace.line()
    assert abs(a - 0.002) < 1e-9 and abs(b - 0.0003) < 1e-9
    one = StepPace()
    for _ in range(5):
        one.observe(16, 0.006)
    assert one.line()[1] == 0.0 and abs(one.line()[0] - 0.006) < 1e-12  # the mean
    noisy = StepPace()
    for n in (1, 2) * 20:
        noisy.observe(n, 0.005 if n == 1 else 0.001)  # a falling line is noise: no slope
    assert noisy.line()[1] == 0.0 and noisy.line()[0] > 0


def test_power_of_two_ranks_the_shorter_queue_of_a_random_pair_first():
    """Three replicas, 30, 1 and 2 running: each draw compares a uniformly random pair, so the
    busiest never ranks first (it loses both pairs it is in), the idlest does in 2/3 of draws
    (it wins both of its pairs) and the middle one in 1/3 (its pair with the busiest). A policy
    blind to load puts the busiest first a third of the time; one that always compares the
    same pair, or just takes the least loaded, never puts the middle one first. Every
    arrangement of the three, so that a pick biased by position fails as well."""
    draws = 900  # a share's count: +-14 at one standard deviation; the bounds are 5 of those off
    for running in itertools.permutations((30, 1, 2)):
        loads = [busy(n) for n in running]
        firsts = Counter()
        for _ in range(draws):
            order = PowerOfTwo().rank(loads, [])
            assert sorted(order) == [0, 1, 2], order  # everyone ranked, for the fallthrough
            assert running[order[0]] <= running[order[1]], order  # the pair's winner first
            firsts[running[order[0]]] += 1
        share = {n: firsts[n] / draws for n in running}
        assert share[30] == 0 and 0.58 < share[1] < 0.75 and 0.25 < share[2] < 0.42, share


def test_prefix_aware_follows_the_cache_within_margin():
    hashes = prompt_digests(list(range(64)), 16)
    holder = ReplicaLoad(running=4, max_num_seqs=32, prefix=frozenset(hashes[:3]))
    policy = PrefixAware(margin=1.0)
    assert policy.rank([IDLE, holder], hashes)[0] == 1  # cached prefix beats a small lead
    swamped = ReplicaLoad(running=64, max_num_seqs=32, prefix=frozenset(hashes))
    assert policy.rank([IDLE, swamped], hashes)[0] == 0  # too loaded: least load wins
    assert policy.rank([IDLE, busy(1)], hashes)[0] == 0  # no cache anywhere: least load


def test_prefix_match_is_a_prefix_not_any_block():
    hashes = prompt_digests(list(range(64)), 16)
    loose = ReplicaLoad(prefix=frozenset(hashes[1:]))  # everything but the first block
    assert loose.cached_blocks(hashes) == 0
    assert ReplicaLoad(prefix=frozenset(hashes[:2])).cached_blocks(hashes) == 2


HASHES = prompt_digests(list(range(128)), 16)  # an 8-block prompt


def test_a_prefix_in_the_pool_lets_load_decide():
    """The holder of the whole prefix is 0.75 load-score busier than an idle replica: within
    the margin (1.0) it wins on its cache alone; with the prefix in the pool too, the idle
    replica would fetch it, the holder's lead halves (a pool block counts 0.5) and so does
    the margin it may use: the idle replica wins. Without pool info the pick is the holder:
    this test fails if the pool is not counted."""
    holder = ReplicaLoad(running=24, max_num_seqs=32, prefix=frozenset(HASHES))
    policy = PrefixAware(margin=1.0, pool_weight=0.5)
    assert policy.rank([IDLE, holder], HASHES)[0] == 1 and policy.pool_effect == ""
    pool = frozenset(HASHES)
    in_pool = [ReplicaLoad(max_num_seqs=32, pool=pool),
               ReplicaLoad(running=24, max_num_seqs=32, prefix=frozenset(HASHES), pool=pool)]
    assert policy.rank(in_pool, HASHES)[0] == 0 and policy.pool_effect == "changed"
    # a pool block weighed like a local one (1.0): no lead at all, the same pick
    assert PrefixAware(1.0, pool_weight=1.0).rank(in_pool, HASHES)[0] == 0
    # weighed 0: the pool is not counted, the holder keeps the request
    ignore = PrefixAware(1.0, pool_weight=0.0)
    assert ignore.rank(in_pool, HASHES)[0] == 1 and ignore.pool_effect == ""
    # a holder hardly busier (0.25) still wins: its own blocks cost no fetch
    near = [in_pool[0], ReplicaLoad(running=8, max_num_seqs=32, prefix=frozenset(HASHES),
                                    pool=pool)]
    assert policy.rank(near, HASHES)[0] == 1 and policy.pool_effect == "same"


def test_pool_blocks_extend_a_local_prefix():
    """The pool holds blocks 2-7: a replica with blocks 0-1 cached gets the whole prompt
    (2 local + 6 fetched, worth 5 blocks), more than one with 0-2 cached and nothing after
    (3): it wins at equal load, where local caches alone would pick the other."""
    pool = frozenset(HASHES[2:])
    three = ReplicaLoad(max_num_seqs=32, prefix=frozenset(HASHES[:3]), pool=pool)
    two = ReplicaLoad(max_num_seqs=32, prefix=frozenset(HASHES[:2]), pool=pool)
    assert three.prefix_blocks(HASHES) == (3, 5)  # block 2 is local there, 3-7 fetched
    assert two.prefix_blocks(HASHES) == (2, 6)
    assert ReplicaLoad(pool=pool).prefix_blocks(HASHES) == (0, 0)  # block 0 nowhere
    gap = ReplicaLoad(prefix=frozenset(HASHES[:2] + HASHES[4:]), pool=frozenset(HASHES[2:3]))
    assert gap.prefix_blocks(HASHES) == (2, 1)  # block 3 in neither: the chain ends there
    local_only = [ReplicaLoad(max_num_seqs=32, prefix=three.prefix),
                  ReplicaLoad(max_num_seqs=32, prefix=two.prefix)]
    assert PrefixAware(1.0).rank(local_only, HASHES)[0] == 0
    policy = PrefixAware(1.0, pool_weight=0.5)
    assert policy.rank([three, two], HASHES)[0] == 0  # 3 + 0.5 x 5 = 5.5 against 5
    three_short = ReplicaLoad(max_num_seqs=32, prefix=three.prefix)  # its model's pool: none
    assert policy.rank([three_short, two], HASHES)[0] == 1 and policy.pool_effect == "changed"


def test_a_prompt_wholly_in_the_pool_goes_by_load():
    """No replica holds any of it: every one would fetch the same blocks, so load decides
    (as with nothing cached anywhere), and the pool's blocks were there but changed
    nothing."""
    pool = frozenset(HASHES)
    loads = [ReplicaLoad(running=n, max_num_seqs=32, pool=pool) for n in (6, 1, 3)]
    policy = PrefixAware(1.0, pool_weight=0.5)
    assert policy.rank(loads, HASHES)[0] == 1 and policy.pool_effect == "same"


def test_hot_replicas_get_no_new_work_and_stale_rank_last():
    hot = busy(1, kv=0.97)
    stale = ReplicaLoad(max_num_seqs=32, age_s=30)
    order, rebalanced = order_replicas(LeastLoad(), [hot, stale, busy(8)], [], 0.95, 4.0, 5.0)
    assert order == [2, 0, 1] and rebalanced
    order, rebalanced = order_replicas(LeastLoad(), [hot, hot], [], 0.95, 4.0, 5.0)
    assert sorted(order) == [0, 1] and not rebalanced  # all hot: still served


def test_prefix_aware_routes_shared_prefixes_to_the_caching_replica(client):
    system = "You are a careful assistant who answers in one word. " * 12
    first = client.completions.create(model="tandem-tiny", prompt=system + "q0", max_tokens=2)
    assert first.usage.prompt_tokens > 64
    time.sleep(2.0)  # a stats period or more: the holder's report reaches the router
    cached = [client.completions.create(model="tandem-tiny", prompt=system + f"q{i}",
                                        max_tokens=2).usage.prompt_tokens_details.cached_tokens
              for i in range(1, 7)]
    # with two replicas, routing blind to the cache would miss about half of these
    assert all(c >= 64 for c in cached), cached


def test_an_idle_replicas_reports_still_change(app_url):
    """Serve passes a routing report on only when it differs from the replica's last one,
    and a router takes a replica whose report has not changed for router.stale_after_s for
    gone (ranked last: it gets no work and stays idle). So two reports of the same idle
    replica must differ (its count of reports), whatever its figures."""
    from tests.helpers import model_replica_stats

    time.sleep(1.0)  # whatever ran before has ended
    first = {s["rank"]: s for s in model_replica_stats("tandem")}
    second = {s["rank"]: s for s in model_replica_stats("tandem")}
    assert len(first) == 2 and first.keys() == second.keys()
    for rank, report in first.items():
        assert report["running"] == 0 and second[rank]["report"] > report["report"]
        assert report != second[rank]


def test_decisions_spread_without_prefixes():
    picks = Counter(LeastLoad().rank([IDLE] * 4, [])[0] for _ in range(400))
    assert len(picks) == 4 and min(picks.values()) > 50  # ties broken at random


def test_hot_replica_gets_no_new_work_and_hands_its_queue_to_a_cool_one(app_url):
    """Two replicas, one throttled to crawl, a load-blind policy (round robin): once the slow
    one is hot it gets no new requests and its queued ones move; every answer is whole."""
    from concurrent.futures import ThreadPoolExecutor
    from urllib.parse import urlparse

    from openai import OpenAI
    from ray import serve

    from cluster import local_cluster
    from cluster.config import load_serve_config
    from tests.conftest import TEST_CONFIG
    from tests.helpers import model_replica_stats

    doc, _ = load_serve_config(TEST_CONFIG)
    app = doc["applications"][0]
    app.update(name="rebalance", route_prefix="/rebalance")
    app["args"]["engine"].update(max_num_seqs=2, slow_replica_ranks=[0], slow_step_delay_s=0.1)
    app["args"]["model_pool"].update(num_gpus=0)
    app["args"]["frontend_pool"].update(num_replicas=1)
    app["args"]["router"] = {"policy": "round_robin", "stats_period_s": 0.25, "score_hot": 1.5,
                             "move_after_s": 0.3}
    from cluster.config import AppConfig

    cfg = AppConfig.model_validate(app["args"])
    url = local_cluster.deploy(doc, cfg, http_port=urlparse(app_url).port) + "/rebalance"
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)

        def ask(i):
            # ignore_eos: 12 tokens whatever the random model says (it may pick EOS early)
            return client.completions.create(model="tandem-tiny", prompt="Tell me a story",
                                             max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True})

        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(36)))
        time.sleep(1.2)  # engine cores report to their replicas twice a second
        stats = {s["rank"]: s for s in model_replica_stats("rebalance")}
        again = {s["rank"]: s for s in model_replica_stats("rebalance")}
    finally:
        serve.delete("rebalance")
    assert {a.choices[0].text for a in answers} == {answers[0].choices[0].text}
    assert all(a.usage.completion_tokens == 12 for a in answers)  # nothing lost or repeated
    slow, fast = stats[0], stats[1]
    served = {r: s["requests"] - s["moved"] for r, s in stats.items()}
    assert sum(served.values()) == len(answers)  # each served exactly once
    assert slow["moved"] > 0, stats  # queued work left the hot replica
    assert served[0] < 0.35 * len(answers), served  # blind round robin alone would give half
    assert fast["requests"] > slow["requests"]
    # tokens/s comes from the replica's own 1 s samples: a second reader does not zero it
    assert fast["tok_s"] > 0 and again[1]["tok_s"] > 0.5 * fast["tok_s"], (fast, again[1])


def test_routing_benchmark_pairs_each_repeat_with_serves_router():
    """The routing benchmark's summary over repeats: the median and range of each policy's
    TTFT p99, and its ratio to Serve's router taken within each repeat (paired)."""
    from cluster.bench.routing import summarize_repeats

    def run(p99):
        return {"ttft_ms_p99": p99, "e2e_ms_p99": 2 * p99, "output_tok_s": 100.0}

    out = summarize_repeats({"least_load": [run(60), run(100), run(90)],
                             "serve_default": [run(100), run(100), run(300)]})
    assert out["least_load"]["ttft_ms_p99"] == 90 and \
        out["least_load"]["ttft_ms_p99_range"] == [60, 100]
    vs = out["least_load"]["ttft_p99_vs_serve_default"]
    assert vs["range"] == [-0.7, 0.0] and abs(vs["median"] + 0.4) < 1e-9
    assert "ttft_p99_vs_serve_default" not in out["serve_default"]


def test_prefix_aware_weighs_a_slow_holders_queue_by_its_speed():
    """The same queue and cached prefix: a holder at the others' pace keeps the request
    within the margin, one three times slower loses it to the idle replica (its queue takes
    three times as long to clear)."""
    hashes = prompt_digests(list(range(64)), 16)
    idle = ReplicaLoad(max_num_seqs=32, pace_a=0.01)
    holder = dict(running=8, max_num_seqs=32, prefix=frozenset(hashes[:3]))
    policy = PrefixAware(margin=1.0)
    assert policy.rank([idle, ReplicaLoad(**holder, pace_a=0.01)], hashes)[0] == 1
    assert policy.rank([idle, ReplicaLoad(**holder, pace_a=0.03)], hashes)[0] == 0
    # without step times (no reports yet) the queues alone decide: the holder keeps it
    assert policy.rank([IDLE, ReplicaLoad(**holder)], hashes)[0] == 1
