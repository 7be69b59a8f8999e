"""The engine's prefix cache under failure and across tenants, its idle-gap clock, and the
stats other threads read (CPU, fp32)."""

from __future__ import annotations

import hashlib
import itertools
import time
from array import array

import torch

from cluster.engine.model_runner import Launched
from cluster.engine.sequence import SamplingParams
from cluster.prefix_hash import prompt_digests
from tests.test_engine import make_engine

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


class DeviceFault(Launched):
    """A step that was queued but failed on the device: its KV was never written."""

    def result(self) -> list[int]:
        raise RuntimeError("CUDA error: an illegal memory access was encountered (injected)")


def test_a_block_joins_the_prefix_cache_only_once_its_kv_is_written(model_dir):
    """Steps run one ahead: when step N's tokens are read, step N+1 (which writes the last
    slot of the sequence's second block) is already launched. If N+1 then fails, that block
    was never written; a later request with the same prefix must get exactly what a fresh
    engine gives, and must not be served the unwritten block from the cache."""
    eng = make_engine(model_dir, block_size=16)
    prompt = list(range(100, 120))  # 20 tokens; launch k (k >= 2) writes position 18 + k
    real, calls = eng.runner.launch, itertools.count(1)

    def launch(batch, prev=None):
        if next(calls) == 13:  # writes position 31, the second block's last slot
            inp = eng.runner.make_inputs(batch)
            return DeviceFault(inp, batch.seqs, torch.zeros(len(inp.rows), dtype=torch.int64))
        return real(batch, prev)

    eng.runner.launch = launch
    eng.add_request("victim", prompt, SamplingParams(temperature=0.0, max_tokens=40,
                                                      ignore_eos=True))
    emitted, reason = [], None
    while eng.has_work():
        for o in eng.step():
            emitted += o.new_token_ids
            reason = o.finish_reason or reason
    assert reason == "error" and len(emitted) == 12, (reason, emitted)
    eng.runner.launch = real
    again = prompt + emitted + [5, 6, 7, 8]  # the 32 tokens of blocks 0-1, then more
    eng.add_request("later", again, GREEDY)
    outs = []
    while eng.has_work():
        outs += eng.step()
    assert outs[0].num_cached_tokens == 16  # block 0 only: block 1's KV never existed
    fresh = make_engine(model_dir, block_size=16, enable_prefix_caching=False)
    assert sum((o.new_token_ids for o in outs), []) == fresh.generate([again], GREEDY)[0]


def test_cache_salt_separates_tenants_and_routers_see_the_same_digests(model_dir):
    eng = make_engine(model_dir, block_size=16)
    prompt = list(range(200, 264))  # 4 full blocks

    def cached(salt: str) -> int:
        eng.add_request(f"r-{salt}-{eng.steps}", prompt, GREEDY, cache_salt=salt)
        first = None
        while eng.has_work():
            for o in eng.step():
                first = first or o
        return first.num_cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-b") == 0  # same tokens, another tenant: nothing shared
    assert cached("tenant-a") == 48  # its own prefix (one prompt token is always computed)
    assert cached("") == 0
    eng.publish()
    eng._digests_at = -1.0  # refresh the routers' summary now rather than in 0.5 s
    eng.publish()
    for salt in ("tenant-a", "tenant-b", ""):
        assert set(prompt_digests(prompt, 16, salt)[:3]) <= set(eng.prefix_digests)
    # the key is SHA-256 chained over the token bytes (what the routers compute too)
    blocks = eng.blocks
    h = hashlib.sha256(b"" + array("q", prompt[:16]).tobytes()).digest()
    assert h in blocks.hash_to_block
    assert prompt_digests(prompt, 16, "x") != prompt_digests(prompt, 16, "y")


def test_idle_gaps_are_measured_for_steps_launched_ahead(model_dir):
    """The host's work between steps shows as the gap the device idles through: a slow
    host (here: 30 ms of extra host time per step) must show ~30 ms gaps, a fast one small
    gaps, also when every step is launched one ahead."""
    def gaps(delay: float) -> list[float]:
        eng = make_engine(model_dir)
        assert eng.cfg.overlap_steps
        eng.step_delay_s = delay
        eng.generate([list(range(1, 9))], SamplingParams(temperature=0.0, max_tokens=12,
                                                         ignore_eos=True))
        return sorted(eng.idle_gaps)

    slow, fast = gaps(0.03), gaps(0.0)
    assert len(slow) >= 10 and len(fast) >= 10
    assert slow[len(slow) // 2] >= 0.025, slow
    assert fast[len(fast) // 2] < 0.02, fast



def test_the_step_clock_measures_one_gap_in_every():
    """Measuring one gap in `every` (a GPU's default: two timing events per step cost host
    time) keeps that share of the gaps, each the time from a step's end to the next one's
    begin; reset (no work waiting) drops a pending one."""
    from cluster.engine.step_clock import StepClock

    clock = StepClock(cuda=False, every=4)
    for step in range(20):
        clock.begin()
        clock.end()
        if step == 11:
            clock.reset()
        clock.collect()
        time.sleep(0.003 if step % 4 == 3 else 0.0)  # the gaps after steps 3, 7, 11, ...
    # after steps 3, 7 and 15 (11's was reset; 19's has no next step)
    assert len(clock.gaps) == 3
    assert all(0.003 <= g < 0.5 for g in clock.gaps), list(clock.gaps)
