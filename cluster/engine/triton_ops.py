"""The model's small fused ops as Triton kernels (GPU): RMSNorm (with the residual add) and
SiLU-and-mul. One kernel each, like the torch.compile'd versions, but launched for a few
microseconds of host time: an eager step (prefill or mixed) calls them 3 times per layer,
and compiled functions cost enough per call that the GPU waited for the host.

Roundings follow the plain PyTorch ops in `cluster/engine/model.py` (fp32 math, results
rounded to the model's dtype where PyTorch rounds them), the reference they are tested against.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, stride_x, stride_r,
                     stride_o, stride_ro, eps, N: tl.constexpr, BLOCK: tl.constexpr,
                     HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_ro + cols, x, mask=mask)
    xf = x.to(tl.float32)
    norm = xf * tl.rsqrt(tl.sum(xf * xf, 0) / N + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = w * norm.to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float):
    shape, n = x.shape, x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    res_out = r2 = None
    if residual is not None:
        r2 = residual.reshape(-1, n)
        res_out = torch.empty_like(out)
    rows = x2.shape[0]
    if rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(rows,)](
            x2, r2 if r2 is not None else x2, weight, out,
            res_out if res_out is not None else out, x2.stride(0),
            r2.stride(0) if r2 is not None else 0, out.stride(0),
            res_out.stride(0) if res_out is not None else 0, eps, N=n, BLOCK=block,
            HAS_RESIDUAL=residual is not None, num_warps=min(16, max(1, block // 256)))
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return _norm(x, None, weight, eps)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    """(rms_norm(x + residual), x + residual)."""
    return _norm(x, residual, weight, eps)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, half, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < half
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + half + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (act * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :h]) * x[..., h:] for the fused gate/up projection's output."""
    half = x.shape[-1] // 2
    x2 = x.reshape(-1, x.shape[-1])
    out = torch.empty(x2.shape[0], half, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        block = 1024
        _silu_and_mul_kernel[(x2.shape[0], triton.cdiv(half, block))](
            x2, out, x2.stride(0), out.stride(0), half, BLOCK=block, num_warps=4)
    return out.view(*x.shape[:-1], half)


@triton.jit
def _per_token_fp8_kernel(x_ptr, q_ptr, scale_ptr, stride_x, stride_q, fp8_max, min_scale,
                          N: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), 0) / fp8_max, min_scale)
    q = tl.clamp(x / scale, -fp8_max, fp8_max)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(scale_ptr + row, scale)


def per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quant.quantize_fp8 for activations in one kernel (one program per row): (e4m3 [M, K],
    fp32 scale [M, 1]). The torch version is five kernels (abs, amax, divide, clamp, cast)
    per projection, 128 per step of an 8B model: they made fp8 slower than bf16."""
    x2 = x if x.stride(-1) == 1 else x.contiguous()
    rows, n = x2.shape
    q = torch.empty((rows, n), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty((rows, 1), dtype=torch.float32, device=x.device)
    if rows:
        block = triton.next_power_of_2(n)
        _per_token_fp8_kernel[(rows,)](x2, q, scale, x2.stride(0), q.stride(0),
                                       torch.finfo(torch.float8_e4m3fn).max, 1e-12, N=n,
                                       BLOCK=block, num_warps=min(16, max(1, block // 256)))
    return q, scale
