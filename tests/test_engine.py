"""The engine against Hugging Face transformers, and its scheduler/KV bookkeeping (CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine.block_manager import BlockManager
from cluster.engine.engine import LLMEngine
from cluster.engine.scheduler import Scheduler
from cluster.engine.sequence import SamplingParams, SeqStatus, Sequence
from cluster.tokenizer import Tokenizer

PROMPTS = ["hello world", "The quick brown fox jumps over the lazy dog. " * 6, "a",
           "import json\n" * 25, "héllo 你好 🚀"]


def make_engine(model_dir, **kw) -> LLMEngine:
    """overlap_steps on unless a test says: the GPU's path (steps launched one ahead) runs
    on the CPU too, where CI can check it (a CPU engine's default is off)."""
    cfg = dict(max_model_len=512, num_kv_blocks=128, block_size=16, max_num_batched_tokens=64,
               torch_threads=1, dtype="float32", device="cpu", overlap_steps=True)
    return LLMEngine(str(model_dir), EngineConfig(**(cfg | kw)))


@pytest.fixture(scope="module")
def prompts(model_dir):
    tok = Tokenizer(model_dir)
    return [tok.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_greedy(model_dir, prompts):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out = []
    for p in prompts:
        ids = hf.generate(torch.tensor([p]), do_sample=False, max_new_tokens=24,
                          min_new_tokens=24, attention_mask=torch.ones(1, len(p)))
        out.append(ids[0, len(p):].tolist())
    return out


GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)


def test_batched_greedy_equals_hf(model_dir, prompts, hf_greedy):
    # a 64-token budget forces chunked prefill mixed with decodes of the other requests
    engine = make_engine(model_dir)
    assert engine.generate(prompts, GREEDY) == hf_greedy
    assert engine.stats().kv_blocks_used == 0


def test_prefix_cache_hit_gives_same_tokens(model_dir, prompts, hf_greedy):
    engine = make_engine(model_dir)
    long = prompts[1]
    first = engine.generate([long], GREEDY)
    hits = engine.stats().prefix_hits
    second = engine.generate([long], GREEDY)
    assert engine.stats().prefix_hits > hits  # the second run reused cached blocks
    assert first == second == [hf_greedy[1]]


def test_preemption_under_tiny_kv_budget(model_dir, prompts, hf_greedy):
    # 40 blocks of 16 tokens cannot hold all five sequences at once: some get preempted
    engine = make_engine(model_dir, num_kv_blocks=40, max_model_len=256,
                         enable_prefix_caching=False)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    many = prompts * 3
    out = engine.generate(many, params)
    assert engine.scheduler.num_preemptions > 0
    assert out == hf_greedy * 3
    assert engine.stats().kv_blocks_used == 0


def test_seeded_sampling_is_reproducible(model_dir, prompts):
    engine = make_engine(model_dir)
    p = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, max_tokens=16, seed=7,
                       ignore_eos=True)
    a = engine.generate(prompts[:2], p)
    b = engine.generate(prompts[:2], p)
    assert a == b
    greedy = engine.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=16,
                                                        ignore_eos=True))
    assert a != greedy


def test_top_k_one_is_greedy(model_dir, prompts, hf_greedy):
    engine = make_engine(model_dir)
    p = SamplingParams(temperature=1.0, top_k=1, max_tokens=24, ignore_eos=True)
    assert engine.generate(prompts[:2], p) == hf_greedy[:2]


def test_stop_token_ids_and_max_tokens(model_dir, prompts, hf_greedy):
    engine = make_engine(model_dir)
    stop_at = hf_greedy[0][5]
    first = hf_greedy[0].index(stop_at)
    out = engine.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=24,
                                                        stop_token_ids=[stop_at]))
    assert out == [hf_greedy[0][: first + 1]]
    assert engine.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=3,
                                                         ignore_eos=True)) == [hf_greedy[0][:3]]


def test_decode_pace_counts_decode_steps_only(model_dir, prompts):
    """Requests of one token run prefill steps alone: the all-step time moves, the decode
    pace (what routers compare) stays unknown; decode steps then set it, below the time of a
    step that prefilled a long prompt."""
    engine = make_engine(model_dir, max_num_batched_tokens=512)  # the prompt in one step
    long = prompts[1] + prompts[3] + prompts[1]
    engine.generate([long], SamplingParams(temperature=0.0, max_tokens=1))
    s = engine.stats()
    assert s.step_s > 0 and (s.step_a_s, s.step_b_s) == (0, 0)
    prefill_s = s.step_s
    engine.generate([prompts[0]], SamplingParams(temperature=0.0, max_tokens=16,
                                                  ignore_eos=True))
    s = engine.stats()
    assert 0 < s.step_a_s + s.step_b_s < prefill_s


def test_abort_frees_blocks(model_dir, prompts):
    engine = make_engine(model_dir)
    engine.add_request("r1", prompts[1], GREEDY)
    engine.add_request("r2", prompts[3], GREEDY)
    engine.step()
    assert engine.stats().kv_blocks_used > 0
    assert engine.abort("r1") and engine.abort("r2")
    assert engine.stats().kv_blocks_used == 0 and not engine.has_work()


def test_add_request_rejects_bad_input(model_dir):
    engine = make_engine(model_dir)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request("x", [1] * 500, SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="vocabulary"):
        engine.add_request("y", [10**9], SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("z", [], SamplingParams())


def _seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, list(range(n)), SamplingParams(max_tokens=4))


def test_block_manager_prefix_sharing_and_lru_eviction():
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _seq("a", 9)  # 2 full blocks + 1 token
    bm.allocate(a, 9)
    a.num_computed_tokens = 9
    bm.register_full_blocks(a, 9)
    b = _seq("b", 9)
    bm.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8
    assert bm.ref_count[a.block_table[0]] == 2
    bm.free(a)
    bm.free(b)
    assert bm.num_used == 0 and len(bm.evictable) == 2
    c = _seq("c", 16)
    c.token_ids = [99] * 16  # different tokens: needs 4 fresh blocks, evicting the cached two
    assert bm.allocate(c, 16)
    assert not bm.hash_to_block and bm.num_free == 0
    assert not bm.allocate(_seq("d", 4), 4)


def test_table_rows_mirror_every_block_table_through_sharing_growth_and_frees():
    """The block manager's array (one row per live sequence, gathered per step) holds each
    sequence's table exactly, padded with 0, while rows are reused and the array grows in
    both directions (past its 64 rows and 16 columns)."""
    import random

    from cluster.engine.block_tables import TableRows

    rng = random.Random(3)
    bm = BlockManager(num_blocks=4096, block_size=4)
    live: list[Sequence] = []
    for step in range(600):
        if live and rng.random() < 0.15:
            bm.free(live.pop(rng.randrange(len(live))))
        elif rng.random() < 0.5 or not live:
            s = _seq(f"s{step}", rng.randrange(1, 40))
            s.token_ids = [rng.randrange(3) for _ in s.token_ids]  # shared prefixes happen
            bm.match_prefix(s)
            assert bm.allocate(s, s.num_tokens)
            s.num_computed_tokens = s.num_tokens
            bm.register_full_blocks(s, s.num_tokens)
            live.append(s)
        else:  # a sequence grows past its blocks, far past the array's first width
            s = rng.choice(live)
            s.token_ids += [7] * rng.randrange(1, 30)
            assert bm.allocate(s, s.num_tokens)
        if live:
            width = max(len(s.block_table) for s in live)
            got = bm.rows.gather([s.table_row for s in live], width)
            want = [s.block_table + [0] * (width - len(s.block_table)) for s in live]
            assert got.tolist() == want
    assert bm.rows.array.shape[0] > 64 and bm.rows.array.shape[1] > 16
    rows = TableRows(rows=1, width=1)
    a = rows.take()
    rows.put(a, 0, 5)
    rows.release(a, 1)
    assert rows.take() == a and rows.gather([a], 1).tolist() == [[0]]  # reused zeroed


def test_step_inputs_carry_the_gathered_tables(model_dir, prompts):
    """Every step's inputs carry its tables gathered from the rows, equal to the array
    built from the sequences' lists at that moment (chunked prefills, decodes, frees)."""
    from cluster.engine.cuda_graphs import padded_tables

    eng = make_engine(model_dir, max_num_batched_tokens=16)
    make_inputs, checked = eng.runner.make_inputs, []

    def spy(batch):
        inp = make_inputs(batch)
        checked.append(inp.table_array is not None and
                       inp.table_array.tolist() == padded_tables(inp.tables).tolist())
        return inp

    eng.runner.make_inputs = spy
    eng.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0))
    assert len(checked) > 40 and all(checked)


def test_table_rows_stay_exact_through_preemption_aborts_and_siblings(model_dir):
    """A small KV cache (preemptions), steps launched one ahead, aborts, sibling requests
    that share a prompt's blocks, logprob rows: at every step each live sequence's row
    mirrors its list, no two share a row, and at the end every row is free and zeroed."""
    import random

    from cluster.engine.cuda_graphs import padded_tables

    eng = make_engine(model_dir, max_model_len=160, num_kv_blocks=14,
                      max_num_batched_tokens=64)
    make_inputs, bad = eng.runner.make_inputs, []

    def spy(batch):
        inp = make_inputs(batch)
        rows = [s.table_row for s in eng.seqs.values() if s.table_row >= 0]
        if len(set(rows)) != len(rows):
            bad.append(("shared row", rows))
        if any(s.block_table and s.table_row < 0 for s in eng.seqs.values()):
            bad.append("a table without a row")
        if inp.table_array is None or \
                inp.table_array.tolist() != padded_tables(inp.tables).tolist():
            bad.append("tables differ")
        return inp

    eng.runner.make_inputs = spy
    rng = random.Random(1)
    for i in range(150):
        if rng.random() < 0.3:
            prompt = [rng.randrange(3, 50) for _ in range(rng.randrange(5, 60))]
            p = SamplingParams(max_tokens=rng.randrange(5, 60), temperature=rng.choice([0, 1]),
                               ignore_eos=True, logprobs=rng.choice([None, None, 2]))
            eng.add_request(f"r{i}", prompt, p)
            if rng.random() < 0.3:
                eng.add_request(f"r{i}b", prompt, p, after=f"r{i}")
        if eng.seqs and rng.random() < 0.05:
            eng.abort(rng.choice(list(eng.seqs)))
        if eng.has_work():
            eng.step()
    while eng.has_work():
        eng.step()
    assert not bad, bad[:5]
    assert eng.scheduler.num_preemptions > 0
    rows = eng.blocks.rows
    assert len(rows.free_rows) == rows.array.shape[0] and not rows.array.any()


def test_scheduler_respects_token_budget_and_seq_limit():
    bm = BlockManager(num_blocks=64, block_size=4, enable_prefix_caching=False)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=10)
    for i in range(3):
        sched.add(_seq(f"s{i}", 8))
    batch = sched.schedule()
    assert batch.num_tokens == 10 and [s.request_id for s in batch.seqs] == ["s0", "s1"]
    assert batch.num_new_tokens == [8, 2]  # s1's prefill is chunked
    assert len(sched.running) == 2 and len(sched.waiting) == 1


def _drain(eng: LLMEngine) -> dict[str, tuple[list[int], str | None, str | None]]:
    out: dict[str, tuple[list[int], str | None, str | None]] = {}
    while eng.has_work():
        for o in eng.step():
            toks, _, _ = out.get(o.request_id, ([], None, None))
            out[o.request_id] = (toks + o.new_token_ids, o.finish_reason, o.error)
    return out


def test_nan_logits_fail_only_that_request(model_dir, prompts, hf_greedy):
    """A request whose logits turn NaN ends with a clear error; its batch mates and later
    requests are served as if nothing happened, and its KV blocks come back."""
    eng = make_engine(model_dir)
    params = SamplingParams(max_tokens=8, temperature=0.0)
    compute = eng.runner.model.compute_logits
    poisoned = {"left": 3}

    def nan_for_row0(hidden):
        logits = compute(hidden)
        if poisoned["left"] and logits.shape[0] == len(prompts):
            poisoned["left"] -= 1
            if poisoned["left"] == 0:  # the third full decode step
                logits[0] = float("nan")
        return logits

    eng.runner.model.compute_logits = nan_for_row0
    for i, p in enumerate(prompts):
        eng.add_request(f"r{i}", p, params)
    out = _drain(eng)
    assert out["r0"][1] == "error" and "NaN" in out["r0"][2]
    for i in range(1, len(prompts)):
        assert out[f"r{i}"][0] == hf_greedy[i][:8] and out[f"r{i}"][2] is None
    assert eng.blocks.num_used == 0
    eng.runner.model.compute_logits = compute
    assert eng.generate([prompts[0]], params) == [hf_greedy[0][:8]]


def test_failed_step_fails_its_requests_and_the_engine_serves_on(model_dir, prompts,
                                                                  hf_greedy):
    """An exception inside a step (CUDA out of memory, say) fails the requests of that step
    with the error's text; the engine frees their blocks and serves the next ones."""
    eng = make_engine(model_dir)
    params = SamplingParams(max_tokens=6, temperature=0.0)
    calls = {"n": 0}

    def oom_on_second_step(step):  # greedy steps are launched, others run
        def wrapped(*args):
            calls["n"] += 1
            if calls["n"] == 2:
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return step(*args)
        return wrapped

    eng.runner.run = oom_on_second_step(eng.runner.run)
    eng.runner.launch = oom_on_second_step(eng.runner.launch)
    for i, p in enumerate(prompts[:2]):
        eng.add_request(f"r{i}", p, params)
    out = _drain(eng)
    assert {o[1] for o in out.values()} == {"error"}
    assert all("OutOfMemoryError" in o[2] for o in out.values())
    assert eng.blocks.num_used == 0 and not eng.seqs
    assert eng.generate(prompts[:2], params) == [h[:6] for h in hf_greedy[:2]]


def test_sampler_marks_non_finite_rows_in_every_path():
    """Greedy, unseeded and seeded rows alike: a NaN or +inf row gets NAN_TOKEN, the others
    a real token."""
    from cluster.engine.sampler import NAN_TOKEN, sample

    seqs = [Sequence(f"r{i}", [1], SamplingParams(temperature=t, seed=seed))
            for i, (t, seed) in enumerate([(0.0, None), (1.0, None), (1.0, 7), (1.0, None),
                                           (1.0, 8)])]
    for s in seqs:
        if s.params.seed is not None:
            s.generator = torch.Generator().manual_seed(s.params.seed)
    logits = torch.randn(5, 50)
    logits[0, 4] = float("nan")
    logits[2, 9] = float("nan")
    logits[3, 1] = float("inf")
    out = sample(logits, seqs).tokens
    assert out[0] == out[2] == out[3] == NAN_TOKEN
    assert 0 <= out[1] < 50 and 0 <= out[4] < 50


def test_release_waiting_hands_back_only_unstarted_movable_requests(model_dir, prompts,
                                                                     hf_greedy):
    engine = make_engine(model_dir, max_num_seqs=2)
    for i, p in enumerate(prompts):
        engine.add_request(f"r{i}", p, GREEDY, movable=i != 4)
    engine.step()  # r0 and r1 start; r2..r4 wait
    used = engine.stats().kv_blocks_used
    moved = engine.release_waiting(0.0)
    assert [o.request_id for o in moved] == ["r2", "r3"]  # r4 may not move
    assert all(o.finish_reason == "moved" and not o.new_token_ids for o in moved)
    assert engine.stats().kv_blocks_used == used and set(engine.seqs) == {"r0", "r1", "r4"}
    # the same requests on another engine: whole answers, nothing lost or repeated
    other = make_engine(model_dir)
    assert other.generate([prompts[2], prompts[3]], GREEDY) == hf_greedy[2:4]
    assert engine.release_waiting(60.0) == []  # none has waited a minute


def test_a_moved_request_keeps_its_place_in_line(model_dir, prompts):
    engine = make_engine(model_dir, max_num_seqs=1)
    for i in range(3):
        engine.add_request(f"local{i}", prompts[0], GREEDY)
    engine.add_request("moved", prompts[0], GREEDY, queued_s=5.0)  # queued elsewhere first
    assert [s.request_id for s in engine.scheduler.waiting][:2] == ["moved", "local0"]


def test_steps_run_one_ahead_with_the_same_tokens(model_dir, prompts, hf_greedy):
    """Greedy decode steps launched before the previous step's tokens are read: the same
    tokens as HF, a request that stops mid-way drops its extra row, no block leaks."""
    eng = make_engine(model_dir)
    launches = {"ahead": 0}
    launch = eng.runner.launch

    def counting(batch, prev=None):
        launches["ahead"] += prev is not None
        return launch(batch, prev)

    eng.runner.launch = counting
    stop = hf_greedy[0][5]  # request 0 ends on its sixth token, its batch mates go on
    first = hf_greedy[0].index(stop) + 1
    for i, p in enumerate(prompts):
        stops = [stop] if i == 0 else []
        eng.add_request(f"r{i}", p, SamplingParams(temperature=0.0, max_tokens=24,
                                                  ignore_eos=True, stop_token_ids=stops))
    out = _drain(eng)
    assert out["r0"][0] == hf_greedy[0][:first] and out["r0"][1] == "stop"
    for i in range(1, len(prompts)):
        assert out[f"r{i}"][0] == hf_greedy[i]
    assert launches["ahead"] > 10 and eng.blocks.num_used == 0
    off = make_engine(model_dir, overlap_steps=False)
    assert off.generate(prompts, GREEDY) == hf_greedy


def test_a_cpu_engine_by_default_returns_each_steps_tokens_from_that_step(model_dir, prompts):
    """On the CPU a step computes while it is launched: launching the next one before the
    tokens are returned would hold every token back a step (a prefill's first token waits
    for the next step's compute too). By default a CPU engine does not; a forced one
    does, and both give the same tokens."""
    def first_call(overlap):
        eng = make_engine(model_dir, overlap_steps=overlap, max_num_batched_tokens=512)
        eng.add_request("a", prompts[1], GREEDY)  # one prefill step
        outs = eng.step()
        seq = eng.seqs["a"]
        # KV the steps computed so far: the prompt, plus the first token's if the next
        # (decode) step ran in this call too
        return eng, outs[0].new_token_ids, seq.num_computed_tokens - len(prompts[1])

    eng, toks, ahead = first_call(None)
    assert eng.overlap is False and eng._flight is None and ahead == 0
    forced, forced_toks, forced_ahead = first_call(True)
    assert forced._flight is not None and forced_ahead == 1 and forced_toks == toks


def test_mixed_steps_launched_ahead_match_step_by_step(model_dir, prompts):
    """Every greedy step is launched before the previous one's tokens are read, mixed ones
    too: prefill chunks beside decodes, admissions from the queue, preemption under a tiny
    KV cache, a stop token and a length end while the next step is in flight. The tokens and
    finish reasons must equal step-by-step execution exactly (fp32), with no block leak."""
    many = [p * (1 + i % 3) for i, p in enumerate(prompts * 3)]  # 1-3x long: chunked

    def serve(overlap: bool):
        eng = make_engine(model_dir, overlap_steps=overlap, max_num_seqs=4, num_kv_blocks=36)
        kinds = {"mixed_ahead": 0}
        launch = eng.runner.launch

        def counting(batch, prev=None):
            kinds["mixed_ahead"] += prev is not None and not batch.is_decode
            return launch(batch, prev)

        eng.runner.launch = counting
        stop = eng.generate([many[0]], GREEDY)[0][3]
        for i, p in enumerate(many):
            eng.add_request(f"r{i}", p, SamplingParams(
                temperature=0.0, max_tokens=20 if i == 0 else 3 + 5 * (i % 4), ignore_eos=True,
                stop_token_ids=[stop] if i == 0 else []))
        out = _drain(eng)
        assert eng.blocks.num_used == 0 and not eng.seqs
        return out, kinds["mixed_ahead"], eng.scheduler.num_preemptions

    ahead, mixed, preempted = serve(True)
    plain, _, _ = serve(False)
    assert ahead == plain
    assert mixed > 5 and preempted > 0, (mixed, preempted)
    assert ahead["r0"][1] == "stop" and len(ahead["r0"][0]) <= 4
    assert all(ahead[f"r{i}"][1] == "length" for i in range(1, len(many)))


def test_queue_never_stalls_on_prefixes_held_by_waiting_requests():
    """A queued request that matched cached blocks but could not start keeps them; when a
    request overtakes it in line (a move keeps its earlier arrival) and nothing runs, those
    blocks must not starve the new head forever: the scheduler drops the queue's held
    prefixes, and both requests start."""
    from cluster.engine.block_manager import BlockManager
    from cluster.engine.scheduler import Scheduler
    from cluster.engine.sequence import Sequence

    blocks = BlockManager(8, 4, True)
    sched = Scheduler(blocks, 4, 64)
    once = SamplingParams(max_tokens=1)
    cached = Sequence("cached", list(range(21)), once)  # leaves a 5-block prefix cached
    sched.add(cached)
    sched.schedule()
    cached.num_computed_tokens = 21
    blocks.register_full_blocks(cached, 21)
    sched.finish(cached, "stop")
    runner = Sequence("running", [100 + i for i in range(16)], once)
    sched.add(runner)
    sched.schedule()
    runner.num_computed_tokens = 16
    holder = Sequence("holder", list(range(21)) + [7] * 8, once)  # matches the prefix, waits
    sched.add(holder)
    assert holder not in sched.schedule().seqs and holder.block_table
    ahead = Sequence("ahead", [200 + i for i in range(28)], once)
    ahead.arrival = 0.0  # moved here from another replica: first in line
    sched.add(ahead)
    sched.finish(runner, "stop")
    started = []
    for _ in range(4):
        batch = sched.schedule()
        started += [s.request_id for s in batch.seqs]
        for s, n in zip(batch.seqs, batch.num_new_tokens, strict=True):
            s.num_computed_tokens += n
            if s.num_computed_tokens == s.num_tokens:
                sched.finish(s, "length")
    assert started[0] == "ahead" and "holder" in started, started


def test_sequences_are_equal_only_to_themselves():
    """Finishing one of two running sequences with equal fields removes that one: a
    sequence is itself only (field-by-field equality removed the first one that matched,
    and walked every field of every sequence ahead of it)."""
    a, b = _seq("same", 4), _seq("same", 4)
    s = Scheduler(BlockManager(num_blocks=16, block_size=4), max_num_seqs=4,
                  max_num_batched_tokens=16)
    s.running += [a, b]
    a.status = b.status = SeqStatus.RUNNING
    b.arrival = a.arrival  # every field equal
    s.finish(b, "stop")
    assert s.running == [a] and s.running[0] is a and b.status is SeqStatus.FINISHED


def test_engine_benchmark_speed_run_checks_nothing(model_dir, capsys):
    """`bench.engine --check-prompts 0`: a speed run reports its figures and no verdict."""
    import json

    from cluster.bench.engine import main

    assert main(["--device", "cpu", "--preset", str(model_dir), "--num-prompts", "3",
                 "--check-prompts", "0", "--baseline-prompts", "0", "--input-len", "8", "12",
                 "--output-len", "3", "5", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["check"] is None and res["correct"] is None
    assert res["engine"]["output_tokens"] > 0 and res["engine"]["output_tok_s"] > 0


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float32, torch.bool])
def test_step_lists_become_the_tensors_torch_would_make(dtype):
    """A step's lists go to tensors through numpy (host_tensor.from_list), with the values,
    dtype and shape torch.tensor gives, 2-D and empty lists too."""
    from cluster.engine.host_tensor import from_list

    for xs in ([3, -2, 0, 7], [[1, 2, 0], [4, 0, 0]], [], [0.5, 1.0] if dtype.is_floating_point
               else [1, 0]):
        want = torch.tensor(xs, dtype=dtype)
        got = from_list(xs, dtype)
        assert got.dtype == want.dtype and got.shape == want.shape and torch.equal(got, want)


def test_a_staging_buffer_sends_every_field_in_one_copy_of_its_prefix():
    """Fields of several dtypes in one buffer: numpy writes on the host twin show on the
    device views after one send; a send up to a row of the last field leaves the rows past
    it as they were; the two host twins are independent."""
    from cluster.engine.staging import StagingBuffer

    buf = StagingBuffer({"ids": ((5,), torch.int64, 0), "temps": ((5,), torch.float32, 1.0),
                         "flag": ((5,), torch.bool, False),
                         "tables": ((4, 3), torch.int32, 7)}, "cpu")
    assert buf.dev["temps"].tolist() == [1.0] * 5 and (buf.dev["tables"] == 7).all()
    h = buf.host[1]
    h["ids"][:] = [1, 2, 3, 4, 5]
    h["temps"][:2] = [0.5, 2.0]
    h["flag"][1] = True
    h["tables"][...] = np.arange(12, dtype=np.int32).reshape(4, 3)
    buf.send(1, buf.end("tables", 2))
    assert buf.dev["ids"].tolist() == [1, 2, 3, 4, 5]
    assert buf.dev["temps"].tolist() == [0.5, 2.0, 1.0, 1.0, 1.0]
    assert buf.dev["flag"].tolist() == [False, True, False, False, False]
    assert buf.dev["tables"].tolist() == [[0, 1, 2], [3, 4, 5], [7, 7, 7], [7, 7, 7]]
    assert buf.host[0]["ids"].tolist() == [0] * 5
    buf.send(0, buf.nbytes)
    assert buf.dev["ids"].tolist() == [0] * 5 and (buf.dev["tables"] == 7).all()
