"""The host KV tier on a GPU: copies out on a side stream into pinned memory while steps run
one ahead (CUDA graphs on), back on the compute stream. Run on the device:
    python -m pytest -m gpu tests/gpu/test_kv_tier_gpu.py
"""

from __future__ import annotations

import random

import pytest
import torch

from cluster.bench.kv_tier import model_folder
from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.sequence import SamplingParams
from cluster.prefix_hash import block_hash

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BS = 16
G = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


def tokens(seed: int, n: int = 150) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 4000) for _ in range(n)]


def chain(prompt: list[int]) -> list[bytes]:
    h, out = b"", []
    for i in range((len(prompt) - 1) // BS):
        h = block_hash(h, prompt[i * BS : (i + 1) * BS])
        out.append(h)
    return out


def contents(engine: LLMEngine, blocks: list[int]) -> torch.Tensor:
    return torch.stack([torch.stack([t[:, b] for t in engine.runner.kv_tensors])
                        for b in blocks]).clone()


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_blocks_come_back_bit_exact_with_the_same_tokens(dtype):
    folder = model_folder("tiny", 512)
    cfg = EngineConfig(device="cuda", dtype=dtype, max_model_len=256, num_kv_blocks=24,
                       block_size=BS, max_num_batched_tokens=64, max_num_seqs=8,
                       kv_host_tier_bytes=64 << 20)
    engine = LLMEngine(folder, cfg, weights="synthetic:0")
    tier = engine.blocks.tier
    assert tier.cuda and tier.host.slab.is_pinned()
    a, fillers = tokens(1), [tokens(10 + i) for i in range(4)]
    hashes = chain(a)
    engine.generate([a], G)
    saved = contents(engine, [engine.blocks.hash_to_block[h] for h in hashes])
    hit = engine.generate([a], G)  # from the device cache: the same chunks as a restore
    for f in fillers:
        engine.generate([f], G)
    assert not set(hashes) & engine.blocks.hash_to_block.keys()
    restored = engine.generate([a], G)
    assert tier.hits["host"] == len(hashes)
    torch.cuda.synchronize()
    back = contents(engine, [engine.blocks.hash_to_block[h] for h in hashes])
    assert torch.equal(back, saved)
    assert restored == hit


@pytest.fixture(scope="module")
def pool_actors():
    """A store actor of the KV pool on this host (a Ray of the test's own)."""
    import ray

    from cluster.kv_store import start_pool

    ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    actors = start_pool(256 << 20, {}, prefix="gpu-test-kv-", detached=False)
    ray.get([a.stats.remote() for a in actors])
    yield actors
    for a in actors:
        ray.kill(a)
    ray.shutdown()


def test_pool_blocks_reach_another_gpu_engine_bit_exact(pool_actors):
    """Blocks one GPU engine spilled (device -> pinned host -> the pool's store) come back
    into another GPU engine's device cache (store -> pinned host -> device) bit for bit,
    and its greedy tokens equal the writer's from its own cache (the same chunks computed)."""
    from cluster.kv_pool import PoolClient

    folder = model_folder("tiny", 512)
    cfg = EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256, num_kv_blocks=24,
                       block_size=BS, max_num_batched_tokens=64, max_num_seqs=8,
                       kv_host_tier_bytes=2 << 20)  # a few blocks: spills reach the pool
    writer_pool = PoolClient(pool_actors)
    writer = LLMEngine(folder, cfg, weights="synthetic:0", kv_pool=writer_pool)
    a = tokens(2)
    hashes = chain(a)
    writer.generate([a], G)
    saved = contents(writer, [writer.blocks.hash_to_block[h] for h in hashes])
    hit = writer.generate([a], G)
    for i in range(6):  # pushes a's blocks out of the device cache and the small host tier
        writer.generate([tokens(20 + i)], G)
    writer.blocks.tier.flush()
    assert writer_pool.sent() and writer_pool.dropped == 0
    reader = LLMEngine(folder, cfg, weights="synthetic:0", kv_pool=PoolClient(pool_actors))
    assert reader.generate([a], G) == hit
    assert reader.blocks.tier.hits["pool"] == len(hashes)
    torch.cuda.synchronize()
    back = contents(reader, [reader.blocks.hash_to_block[h] for h in hashes])
    assert torch.equal(back, saved)


def test_the_prefill_speed_credits_each_step_with_its_own_device_time():
    """Steps launched ahead: the tier's prefill speed divides each step's tokens by that
    step's time on the device (a spin queued before each step's kernels, 2 ms a token,
    stands in for a slow device), not by the time between two schedule calls, which is the
    step before's (once 800 k tokens/s on an H100: the rule then only recomputed)."""
    folder = model_folder("tiny", 512)
    cfg = EngineConfig(device="cuda", dtype="bfloat16", max_model_len=256, num_kv_blocks=64,
                       block_size=BS, max_num_batched_tokens=64, max_num_seqs=8,
                       kv_host_tier_bytes=2 << 20)
    engine = LLMEngine(folder, cfg, weights="synthetic:0")
    assert engine.overlap
    torch.cuda._sleep(1000)  # its module loaded before the clock runs
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10_000_000)
    end.record()
    end.synchronize()
    cycles_per_s = 10_000_000 / (start.elapsed_time(end) / 1000)
    runner, tier = engine.runner, engine.blocks.tier
    launch, observe, seen = runner.launch, tier.observe_step, []

    def slow_launch(batch, prev=None):
        torch.cuda._sleep(int(batch.num_tokens * 2e-3 * cycles_per_s))
        return launch(batch, prev)

    def record(n, seconds):
        seen.append((n, seconds))
        observe(n, seconds)

    runner.launch, tier.observe_step = slow_launch, record
    engine.add_request("long", tokens(60, 20), SamplingParams(temperature=0.0, max_tokens=40,
                                                              ignore_eos=True))
    engine.step()
    engine.step()
    engine.add_request("a", tokens(1), G)  # its prefill chunks between the other's decodes
    while engine.has_work():
        engine.step()
    chunks = [(n, t) for n, t in seen if n >= 2 * BS]
    assert len(chunks) >= 2 and min(n for n, _ in seen) > 2  # no pure decode step counted
    for n, t in chunks:
        assert 0.9 * n * 2e-3 <= t < n * 2e-3 + 0.05, (n, t)
    assert 0.3 / 2e-3 < tier.prefill_tok_s <= 1.1 / 2e-3, tier.prefill_tok_s
