"""The GPU's fused-op kernels against the plain PyTorch ops they replace."""

from __future__ import annotations

import pytest
import torch

from cluster.engine.model import _add_rms_norm, _rms_norm, _silu_and_mul

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def close(a, b, dtype) -> bool:
    return torch.allclose(a.float(), b.float(), rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,n", [(1, 896), (77, 4096), (3, 128), (0, 64)])
def test_rms_norm_and_residual_add(dtype, rows, n):
    from cluster.engine import triton_ops

    g = torch.Generator(device="cuda").manual_seed(rows * n)
    x = torch.randn(rows, n, device="cuda", generator=g).to(dtype) * 3
    res = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    w = torch.rand(n, device="cuda", generator=g).to(dtype) + 0.5
    assert close(triton_ops.rms_norm(x, w, 1e-6), _rms_norm(x, w, 1e-6), dtype)
    got, got_res = triton_ops.add_rms_norm(x, res, w, 1e-5)
    want, want_res = _add_rms_norm(x, res, w, 1e-5)
    assert close(got, want, dtype) and torch.equal(got_res, want_res)


def test_rms_norm_of_strided_heads():
    """Per-head norms (Qwen3's q/k norm) get a strided view of the fused qkv output."""
    from cluster.engine import triton_ops

    qkv = torch.randn(5, 3 * 4 * 64, device="cuda", dtype=torch.bfloat16)
    q = qkv[:, : 4 * 64].view(5, 4, 64)
    w = torch.rand(64, device="cuda", dtype=torch.bfloat16)
    got = triton_ops.rms_norm(q, w, 1e-6)
    assert got.shape == q.shape and close(got, _rms_norm(q, w, 1e-6), torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,inter", [(1, 4864), (130, 14336), (2, 100), (0, 64)])
def test_silu_and_mul(dtype, rows, inter):
    from cluster.engine import triton_ops

    x = torch.randn(rows, 2 * inter, device="cuda").to(dtype) * 4
    got = triton_ops.silu_and_mul(x)
    assert got.shape == (rows, inter) and close(got, _silu_and_mul(x), dtype)
