"""fp8 through torch._scaled_mm (Hopper) against the bf16 engine. Run on the device:
    python -m pytest -m gpu tests/gpu/test_quant_gpu.py
The checkpoints and bounds are those of tests/test_quant.py (fp8 emulated on the CPU there,
against fp32); here the reference is the bf16 engine, whose own error is ~1/7 of fp8's.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cluster.bench.engine import teacher_forced_logits
from cluster.config import EngineConfig
from cluster.engine import quant
from cluster.engine.engine import LLMEngine
from tests.test_quant import GREEDY, _peaked

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_fp8 = pytest.mark.skipif(not torch.cuda.is_available() or
                               not quant.fp8_native(torch.device("cuda")),
                               reason="no native fp8 _scaled_mm on this GPU")


def _engine(folder, weights, **kw) -> LLMEngine:
    cfg = EngineConfig(device="cuda", dtype="bfloat16", max_model_len=512, num_kv_blocks=256,
                       max_num_seqs=16, enable_prefix_caching=False)
    return LLMEngine(str(folder), cfg.model_copy(update=kw), weights=list(weights.items()))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@needs_fp8
def test_scaled_mm_matches_the_emulation():
    torch.manual_seed(0)
    lin = nn.Linear(896, 4864, bias=True, device="cuda", dtype=torch.bfloat16)
    lin.requires_grad_(False)
    native, emulated = quant.Fp8Linear(lin, native=True), quant.Fp8Linear(lin, native=False)
    for rows in (1, 7, 256):  # decode, an odd count, a prefill chunk
        x = torch.randn(rows, 896, device="cuda", dtype=torch.bfloat16)
        y = native(x)
        assert y.dtype == torch.bfloat16 and y.shape == (rows, 4864)
        # the same e4m3 operands: only fp32 accumulation order and bf16 output rounding differ
        assert _rel(y.float(), emulated(x).float()) < 1e-2
        assert _rel(y.float(), lin(x).float()) < 0.08  # e4m3 rounding of both operands


@needs_fp8
@pytest.mark.parametrize("k", [896, 4864, 14336])  # 0.5B projections' inputs, 8B's down_proj
def test_per_token_fp8_kernel_equals_the_torch_quantization(k):
    from cluster.engine.triton_ops import per_token_fp8

    torch.manual_seed(0)
    x = torch.randn(300, k, device="cuda", dtype=torch.bfloat16) * 3
    x[7] = 0  # a row of zeros: the tiny scale, not a division by zero
    x[11, 5] = 1e4  # an outlier sets its row's scale
    q, scale = per_token_fp8(x)
    want_q, want_scale = quant.quantize_fp8(x)
    assert q.dtype == quant.FP8 and scale.shape == (300, 1)
    torch.testing.assert_close(scale, want_scale, rtol=1e-6, atol=0)
    # the same scaled values round to the same e4m3 numbers (ties may go either way)
    assert float((q.float() != want_q.float()).float().mean()) < 1e-4
    # and where not, by one e4m3 step (1/8 relative; 2^-9 among the subnormals)
    torch.testing.assert_close(q.float(), want_q.float(), rtol=0.125, atol=2**-9)


@pytest.fixture(scope="module")
def tiny_runs(model_dir):
    """Per checkpoint (tests/test_quant.py's two): bf16 and fp8 greedy continuations and
    teacher-forced logits over prompt + the bf16 continuation."""
    base = load_file(str(model_dir / "model.safetensors"))
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(2, 4096, (16,), generator=g).tolist() for _ in range(16)]
    out = {}
    for name, weights in (("builtin", base), ("peaked", _peaked(base))):
        ref = _engine(model_dir, weights)
        greedy = ref.generate(prompts, GREEDY)
        texts = [p + c for p, c in zip(prompts, greedy, strict=True)]
        res = {"bf16": (greedy, [teacher_forced_logits(ref, t) for t in texts])}
        for cfg, kw in {"fp8": dict(quantization="fp8"),
                        "fp8_head": dict(quantization="fp8", quantize_lm_head=True)}.items():
            eng = _engine(model_dir, weights, **kw)
            assert isinstance(eng.runner.model.layers[0].mlp.down_proj, quant.Fp8Linear)
            assert eng.runner.model.layers[0].mlp.down_proj.native
            res[cfg] = (eng.generate(prompts, GREEDY),
                        [teacher_forced_logits(eng, t) for t in texts])
        out[name] = (len(prompts[0]), res)
    return out


@needs_fp8
@pytest.mark.parametrize("cfg", ["fp8", "fp8_head"])
def test_fp8_logits_and_picks_against_bf16(tiny_runs, cfg):
    n, res = tiny_runs["builtin"]
    errs = [_rel(q, r) for q, r in zip(res[cfg][1], res["bf16"][1], strict=True)]
    assert max(errs) < 0.10  # CPU emulation vs fp32: 0.066, 0.076 with the head
    same = torch.cat([(q[n - 1 : -1].argmax(-1) == r[n - 1 : -1].argmax(-1)).float()
                      for q, r in zip(res[cfg][1], res["bf16"][1], strict=True)])
    assert float(same.mean()) >= 0.80  # teacher-forced top-1; CPU emulation: 0.873, 0.865


@needs_fp8
def test_fp8_greedy_on_a_confident_model(tiny_runs):
    _, res = tiny_runs["peaked"]
    same = sum(a == b for a, b in zip(res["fp8"][0], res["bf16"][0], strict=True))
    # of 16 32-token continuations; CPU emulation vs fp32: 9 (with the LM head in fp8: 2)
    assert same >= 6


def _qwen_shape_refs(seed: int):
    """Qwen2.5-0.5B's layers (transformers' random init): bf16 weights, prompts, texts
    (prompt + the bf16 engine's greedy continuation), and the bf16 and fp32 engines'
    teacher-forced logits over them."""
    from tests.gpu.test_engine_gpu import seeded_hf

    folder, hf = seeded_hf(torch.bfloat16)
    weights = dict(hf.state_dict())
    del hf
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 150000, (n,), generator=g).tolist() for n in (5, 77, 300)]
    ref = _engine(folder, weights, **QWEN_KW)
    texts = [p + c for p, c in zip(prompts, ref.generate(prompts, GREEDY), strict=True)]
    bf16 = [teacher_forced_logits(ref, t) for t in texts]
    del ref
    f32 = _engine(folder, {k: v.float() for k, v in weights.items()}, dtype="float32",
                  **QWEN_KW)
    want = [teacher_forced_logits(f32, t) for t in texts]
    return folder, weights, prompts, texts, bf16, want


QWEN_KW = dict(max_model_len=1024, num_kv_blocks=512)


@needs_fp8
def test_fp8_on_a_qwen_shape_with_cuda_graphs():
    """Qwen2.5-0.5B's layers (transformers' random init) through the decode CUDA graphs:
    logits against fp32, relative to bf16's own error, and the weights' memory."""
    folder, weights, prompts, texts, bf16, want = _qwen_shape_refs(1)
    kw = QWEN_KW
    fp8 = _engine(folder, weights, quantization="fp8", **kw)
    assert fp8.runner.graphs  # the quantize-and-matmul ops were captured
    got = fp8.generate(prompts, GREEDY)
    assert all(len(c) == 32 for c in got)
    # A random-init model amplifies rounding: bf16 alone is 1.7% off fp32 here (0.4% per
    # weight). e4m3's unit roundoff (2^-4) is 16x bf16's (2^-8), so fp8 may be up to 16x as
    # far off; measured on an H200: 0.20-0.21 against bf16's 0.017 (12x). A wrong scale or
    # operand layout gives errors of order 1.
    for t, b, w in zip(texts, bf16, want, strict=True):
        assert _rel(teacher_forced_logits(fp8, t), w) < 16 * _rel(b, w)
    layer = fp8.runner.model.layers[0]
    assert layer.mlp.gate_up_proj.qweight.dtype == quant.FP8


def test_fp8_kv_cache_through_the_triton_kernels_and_graphs():
    """kv_cache_dtype fp8 on the Qwen2.5-0.5B shape: the Triton kernels write e4m3 K/V and
    read them back in registers, decode through the CUDA graphs; logits against fp32 within
    16x bf16's own error (e4m3's unit roundoff against bf16's, as for fp8 weights; only K and
    V are rounded here), and a prefix-cache hit on fp8 blocks gives the same greedy text."""
    folder, weights, prompts, texts, bf16, want = _qwen_shape_refs(2)
    kw = QWEN_KW
    eng = _engine(folder, weights, kv_cache_dtype="fp8", **kw)
    assert eng.runner.k_caches[0].dtype == torch.float8_e4m3fn and eng.runner.graphs
    assert eng.runner.kv_scales is not None  # calibrated at load (random weights)
    got = eng.generate(prompts, GREEDY)
    assert all(len(c) == 32 for c in got)
    for t, b, w in zip(texts, bf16, want, strict=True):
        assert _rel(teacher_forced_logits(eng, t), w) < 16 * _rel(b, w)
    # in fp32: a hit recomputes only the last partial block, and bf16's rounding of that
    # shorter prefill alone flips picks of this flat-logit model
    cached = _engine(folder, {k: v.float() for k, v in weights.items()}, dtype="float32",
                     kv_cache_dtype="fp8", enable_prefix_caching=True, **kw)
    first = cached.generate(prompts[2:], GREEDY)
    assert cached.generate(prompts[2:], GREEDY) == first and cached.blocks.prefix_hits > 0
