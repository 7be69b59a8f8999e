"""An fp8 KV cache's per-layer, per-KV-head scales (cluster/engine/kv_scales.py): calibrated
at load or read from the checkpoint, powers of two, and what they fix: keys past e4m3's
+-448 and values below its normal range."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from cluster.bench.engine import teacher_forced_logits
from cluster.config import EngineConfig
from cluster.engine import kv_scales, kv_tier
from cluster.engine.engine import LLMEngine

FP8_KV = dict(kv_cache_dtype="fp8")


def _engine(model_dir, weights: dict | None = None, **kw) -> LLMEngine:
    cfg = EngineConfig(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64,
                       enable_prefix_caching=False, max_num_seqs=8, torch_threads=1)
    return LLMEngine(str(model_dir), cfg.model_copy(update=kw),
                     weights=None if weights is None else list(weights.items()))


def test_pow2_scale_leaves_headroom_and_is_a_power_of_two():
    amax = torch.tensor([1e-4, 0.3, 1.0, 112.0, 3000.0])
    s = kv_scales.pow2_scale(amax)
    assert torch.equal(s, torch.exp2(torch.log2(s).round()))  # powers of two
    top = kv_scales.FP8_MAX * s  # the largest |x| stored unsaturated
    assert (top >= kv_scales.HEADROOM * amax).all()
    assert (top < 2 * kv_scales.HEADROOM * amax).all()  # the smallest such power


def _reparametrized(weights: dict, k_mul: float, v_mul: float) -> dict:
    """The same function with KV head 0's keys k_mul times larger (its query heads'
    q_proj rows divided by it: scores unchanged, rotary being linear) and KV head 1's
    values v_mul times (o_proj's columns of its query heads divided by it). Powers of two,
    so exact in fp32."""
    w = dict(weights)
    dim, group = 32, 2  # the built-in model: 8 heads, 4 KV heads, head_dim 32
    for layer in range(4):
        p = f"model.layers.{layer}.self_attn."
        q, k = w[p + "q_proj.weight"].clone(), w[p + "k_proj.weight"].clone()
        v, o = w[p + "v_proj.weight"].clone(), w[p + "o_proj.weight"].clone()
        q[: group * dim] /= k_mul
        k[:dim] *= k_mul
        v[dim : 2 * dim] *= v_mul
        o[:, group * dim : 2 * group * dim] /= v_mul
        w |= {p + "q_proj.weight": q, p + "k_proj.weight": k, p + "v_proj.weight": v,
              p + "o_proj.weight": o}
    return w


def _logits(eng, texts):
    return torch.cat([teacher_forced_logits(eng, t) for t in texts])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_scales_keep_keys_past_448_and_tiny_values(model_dir):
    """Keys 256x larger (amax in the hundreds to thousands: e4m3 saturates at 448) and
    values 4096x smaller (amax ~1e-3: below e4m3's smallest normal, 2^-6) in one KV head
    each, the model's function unchanged. Unscaled, the fp8 cache breaks it; calibrated,
    its scales move by exactly those powers of two, so the cache holds the same bytes as
    for the original model and the logits are the original fp8 cache's."""
    base = load_file(str(model_dir / "model.safetensors"))
    odd = _reparametrized(base, k_mul=256.0, v_mul=1 / 4096)
    g = torch.Generator().manual_seed(5)
    texts = [torch.randint(2, 4096, (48,), generator=g).tolist() for _ in range(4)]
    ref = _logits(_engine(model_dir, base), texts)
    assert _rel(_logits(_engine(model_dir, odd), texts), ref) < 1e-5  # same function

    scaled_base = _engine(model_dir, base, **FP8_KV)
    scaled_odd = _engine(model_dir, odd, **FP8_KV)
    s0, s1 = scaled_base.runner.kv_scales, scaled_odd.runner.kv_scales
    for a, b in zip(s0, s1, strict=True):
        assert torch.equal(b[0, 0], a[0, 0] * 256) and torch.equal(b[1, 1], a[1, 1] / 4096)
        assert torch.equal(b[:, 2:], a[:, 2:])
    fp8 = _logits(scaled_base, texts)
    # measured 0.014 (the fp8 rounding of K and V, ~2.5% RMS per value, averaged by
    # attention); the fp8_kv bound of tests/test_quant.py
    assert _rel(fp8, ref) < 0.03
    torch.testing.assert_close(_logits(scaled_odd, texts), fp8, rtol=1e-5, atol=1e-5)

    unscaled = _rel(_logits(_engine(model_dir, odd, **FP8_KV, kv_cache_scales="none"),
                            texts), ref)
    # measured 0.25, 18x the scaled cache's error: saturated keys, values flushed to zero
    assert unscaled > 0.15


def _with_scales(model_dir, folder, scales: dict) -> None:
    shutil.copytree(model_dir, folder)
    w = load_file(str(folder / "model.safetensors"))
    save_file(w | scales, str(folder / "model.safetensors"))


def test_checkpoint_scales_are_used_rounded_up_to_powers_of_two(model_dir, tmp_path):
    """llm-compressor's names: a scalar per layer (broadcast over KV heads) or one per head;
    rounded up (what fit stays unsaturated). `calibrate` ignores them; scales for some
    layers only are refused."""
    scalar = {f"model.layers.{i}.self_attn.{w}_scale": torch.tensor(0.05 * (i + 1))
              for i in range(4) for w in "kv"}
    _with_scales(model_dir, tmp_path / "scalar", scalar)
    eng = _engine(tmp_path / "scalar", **FP8_KV)
    for i, layer in enumerate(eng.runner.model.layers):
        want = kv_scales.pow2_scale(torch.tensor(0.05 * (i + 1)) * kv_scales.FP8_MAX
                                    / kv_scales.HEADROOM)
        assert torch.equal(layer.self_attn.kv_scale, torch.full((2, 4), float(want)))
    assert eng.generate([[5, 6, 7]], _greedy(4))[0]

    per_head = {f"model.layers.{i}.self_attn.{w}_proj.output_scale":
                torch.tensor([0.01, 0.02, 0.03, 0.3]) for i in range(4) for w in "kv"}
    _with_scales(model_dir, tmp_path / "per_head", per_head)
    eng = _engine(tmp_path / "per_head", **FP8_KV)
    assert torch.equal(eng.runner.model.layers[2].self_attn.kv_scale[1],
                       torch.tensor([2**-6, 2**-5, 2**-5, 2**-1]))

    calibrated = _engine(model_dir, **FP8_KV).runner.kv_scales
    forced = _engine(tmp_path / "scalar", **FP8_KV, kv_cache_scales="calibrate")
    assert all(torch.equal(a, b) for a, b in zip(forced.runner.kv_scales, calibrated,
                                                 strict=True))

    partial = {k: v for k, v in scalar.items() if "layers.3." not in k}
    _with_scales(model_dir, tmp_path / "partial", partial)
    with pytest.raises(ValueError, match="some layers only"):
        _engine(tmp_path / "partial", **FP8_KV)


def test_no_scales_without_an_fp8_cache_or_with_none(model_dir):
    assert _engine(model_dir).runner.kv_scales is None
    eng = _engine(model_dir, **FP8_KV, kv_cache_scales="none")
    assert eng.runner.kv_scales is None
    assert all(layer.self_attn.kv_scale is None for layer in eng.runner.model.layers)


def test_pool_key_includes_the_scales(model_dir):
    """Blocks of caches with different scales are different bytes for the same tokens: the
    cluster KV pool must not hand one engine's blocks to the other."""
    a = [torch.full((2, 4), 2.0**-5)]
    b = [torch.full((2, 4), 2.0**-4)]
    key = lambda s: kv_tier.model_key(str(model_dir), None, torch.float8_e4m3fn, 16,  # noqa: E731
                                      kv_scales.digest(s))
    assert key(a) != key(b) and key(a) == key([t.clone() for t in a])
    assert key(None) == kv_tier.model_key(str(model_dir), None, torch.float8_e4m3fn, 16)


def _greedy(n: int):
    from cluster.engine.sequence import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
