"""Quantized weights, applied to a loaded Llama-family model (`engine.quantization`).

int8: weight-only, symmetric per output channel (the CPU engine). A layer's weight W [N, K]
is stored as int8 q with W ~ q * scale[:, None]; the matmul runs with bf16 activations (the
layer casts in and out), since the CPU has an int8-weight kernel for bf16 inputs only.

fp8: e4m3 weights, symmetric per output channel, and e4m3 activations with a scale per
token computed on the fly; the matmul is `torch._scaled_mm` on FP8 tensor cores (Hopper).
Where there are none (the CPU), it can be emulated (quantize, dequantize, fp32 matmul) for
tests only: it is slower than not quantizing at all.

Both replace the decoder layers' nn.Linear projections (qkv_proj, o_proj, gate_up_proj,
down_proj) with the modules below after the checkpoint is loaded, each rank its own shard,
and the LM head as `quantize_lm_head` says (by default for int8, not for fp8; a tied head
keeps a quantized copy beside the embedding). Embeddings and norms stay as loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from cluster.config import EngineConfig
from cluster.engine.loader import iter_checkpoint
from cluster.engine.model import ModelArch

log = logging.getLogger(__name__)

PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
INT8_MAX = 127
FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448

# Which int8 matmul, by rows M in the step (ms, 1 thread of this 2-core AMD EPYC (AVX-512
# BF16/VNNI), torch 2.13; Qwen2.5-0.5B's gate_up 896 -> 9728 / down 4864 -> 896, best of 7):
#
#   M     fp32 linear   bf16 linear   int8pack_mm   int8->bf16 + bf16 linear, * scale
#   1     2.10 / 0.45   1.06 / 0.29   0.24 / 0.15   2.54 / 0.88
#   16    5.96 / 2.51   1.89 / 0.58   2.10 / 0.99   2.78 / 1.17
#   32    8.75 / 4.26   2.36 / 1.04   4.26 / 1.96   3.75 / 1.70
#   256   69.0 / 26.1   13.8 / 6.01   31.7 / 16.6   12.6 / 6.72
#   1024  223 / 99.7    44.4 / 24.2   155 / 63.9    80.3 / 25.0
#
# torch._weight_int8pack_mm is the fastest at decode sizes (M=1: 3-9x fp32, 2-4x bf16; M=16:
# about bf16), but its cost grows about linearly with M, while a bf16 GEMM on weights
# converted per call amortizes the conversion over M. Into int8pack_mm, fp32 activations
# take a path ~70x slower than bf16 ones (896 -> 4864, M=16: 104 ms vs 1.5), hence the
# casts. Dequantizing into a scaled bf16 weight (q * scale, then linear) was slower than
# scaling the output (896 -> 9728, M=16: 22.0 ms). torch.compile of convert-and-matmul took
# 19 s to compile, then was no faster (M=1/16/256: 4.6/5.1/15.2 ms). int8 activations as
# well (per-token scales, torch._int_mm on VNNI) were faster still (M=16: 1.1 ms, M=256:
# 8.7), but that is not weight-only: in a real checkpoint an outlier channel sets its token's
# scale and flattens the other channels. (One thread: the two cores were shared while
# measuring, and two-thread timings were noise.)
INT8PACK_MAX_ROWS = 16


def _symmetric(w: torch.Tensor, qmax: float) -> torch.Tensor:
    """Per-row scale (fp32 [rows, 1]) mapping each row's largest magnitude to qmax; rows of
    zeros (padding of a vocabulary shard) get a tiny one rather than 0."""
    return (w.abs().amax(dim=-1, keepdim=True).float() / qmax).clamp(min=1e-12)


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [N, K], scale bf16 [N]) with w ~ q * scale[:, None]. The kernel applies the
    scale in bf16, so q is rounded against the bf16 scale itself: no gain error per channel."""
    scale = _symmetric(w, INT8_MAX).to(torch.bfloat16)
    q = torch.round(w.float() / scale.float()).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale.squeeze(1)


def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q e4m3, scale fp32 [rows, 1]) with x ~ q * scale, one scale per row: per output
    channel for a weight, per token for activations."""
    scale = _symmetric(x, FP8_MAX)
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


class Int8Linear(nn.Module):
    """y = x W^T + b, W int8 per output channel; computes in bf16, returns x's dtype."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_int8(linear.weight.detach())
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if x.shape[0] <= INT8PACK_MAX_ROWS:
            y = torch._weight_int8pack_mm(xb, self.qweight, self.scale)
        else:
            y = F.linear(xb, self.qweight.to(torch.bfloat16)) * self.scale
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


class Fp8Linear(nn.Module):
    """y = x W^T + b, W and x e4m3 (per output channel, per token); returns x's dtype.
    native: torch._scaled_mm; else emulated in fp32 with the same quantized operands."""

    def __init__(self, linear: nn.Linear, native: bool):
        super().__init__()
        q, scale = quantize_fp8(linear.weight.detach())
        self.native = native
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale.t().contiguous())  # [1, N]: _scaled_mm's scale_b
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq, xscale = _per_token_fp8(x) if self.native else quantize_fp8(x)
        if self.native:  # qweight.t(): the column-major [K, N] operand _scaled_mm wants
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xscale, scale_b=self.scale,
                                 out_dtype=torch.bfloat16)
        else:
            y = (xq.float() @ self.qweight.float().t()) * xscale * self.scale
        y = y.to(x.dtype)
        return y if self.bias is None else y + self.bias


def _per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """quantize_fp8 of activations, in one Triton kernel where Triton runs (native fp8 is
    a GPU, so it does but for a build without it)."""
    try:
        from cluster.engine.triton_ops import per_token_fp8
    except ImportError:
        return quantize_fp8(x)
    return per_token_fp8(x.reshape(-1, x.shape[-1]))


def fp8_native(device: torch.device) -> bool:
    """Whether this device runs _scaled_mm with per-row scales: probed, since support
    depends on the GPU (Hopper and newer), the CUDA build and the torch version."""
    if device.type != "cuda":  # torch's CPU _scaled_mm runs, but converts: 896 -> 9728 at
        return False  # M=1 took 84 ms here, a bf16 linear 1.3 (the emulation: 59)
    a = torch.ones(16, 16, device=device).to(FP8)
    s = torch.ones(16, 1, device=device)
    try:
        torch._scaled_mm(a, a.t(), scale_a=s, scale_b=s.t(), out_dtype=torch.bfloat16)
    except RuntimeError as err:
        log.info("no native fp8 matmul on %s: %s", torch.cuda.get_device_name(device), err)
        return False
    return True


def check_supported(cfg: EngineConfig, device: torch.device, arch: ModelArch) -> bool | None:
    """Fails before any weight is loaded where the asked quantization cannot run; for fp8,
    whether it runs natively."""
    method = cfg.quantization
    if method is None:
        return None
    if arch.deepseek is not None:
        raise ValueError(f"engine.quantization: {method} is not supported for "
                         f"{arch.architecture} (MLA/MoE layers) yet")
    if method == "int8":
        if device.type != "cpu":
            raise ValueError("engine.quantization: int8 is the CPU engine's; on a GPU use fp8")
        return None
    native = fp8_native(device)
    if not native and not cfg.fp8_emulation:
        raise ValueError(f"engine.quantization: fp8 needs FP8 matmuls (a Hopper GPU); "
                         f"{device.type} has none. Set engine.fp8_emulation: true to emulate "
                         "it (tests: slower than no quantization), or use int8 on a CPU")
    if not native:
        log.warning("fp8 emulated on %s: quantized numerics, unquantized speed or worse",
                    device.type)
    return native


def _quantized(linear: nn.Linear, method: str, native: bool | None) -> nn.Module:
    if method == "int8":
        return Int8Linear(linear)
    n, k = linear.weight.shape
    if native and (n % 16 or k % 16):  # _scaled_mm's operand shapes; rare in real models
        log.warning("fp8: a [%d, %d] weight stays unquantized (dims must be multiples of 16)",
                    n, k)
        return linear
    return Fp8Linear(linear, bool(native))


def quantize_lm_head(cfg: EngineConfig) -> bool:
    if cfg.quantize_lm_head is not None:
        return cfg.quantize_lm_head
    return cfg.quantization == "int8"


@torch.no_grad()
def quantize_model(model: nn.Module, cfg: EngineConfig, native: bool | None) -> None:
    """Replaces the model's projections in place (each one's full-precision weight is freed
    as soon as it is replaced, unless it is tied to another module)."""
    method = cfg.quantization
    head = quantize_lm_head(cfg)
    before = _weight_bytes(model)
    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                linear = getattr(parent, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(parent, name, _quantized(linear, method, native))
    if head:
        model.lm_head = _quantized(model.lm_head, method, native)
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.empty_cache()  # the KV cache is sized from the memory freed here
    kind = ("native" if native else "emulated") if method == "fp8" else "weight-only"
    log.info("quantized to %s (%s, lm_head %s): weights %.1f -> %.1f MiB", method, kind,
             method if head else "unquantized", before / 2**20,
             _weight_bytes(model) / 2**20)


def _weight_bytes(model: nn.Module) -> int:
    """Parameters (a tied one once) and the quantized modules' buffers."""
    quantized = (m for m in model.modules() if isinstance(m, Int8Linear | Fp8Linear))
    tensors = {id(t): t for t in [*model.parameters(),
                                  *(b for m in quantized for b in m.buffers())]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


# Pre-quantized FP8 checkpoints (config.json's `quantization_config`): compressed-tensors
# ("float-quantized") and fbgemm_fp8, e4m3 weights with a `weight_scale` per tensor or per
# output channel; `fp8` (DeepSeek-V3's format), one `weight_scale_inv` per 128x128 block.
# Either scale multiplies: w = q * scale. Their weights are dequantized as they are read, so
# such a checkpoint loads as its original did (less the rounding); `quantization: fp8` then
# quantizes them again per channel. The checkpoint's static `input_scale`s are not used (ours
# are per token). Running the checkpoint's own fp8 values and block scales is not done yet.
FP8_CHECKPOINTS = ("compressed-tensors", "fbgemm_fp8", "fp8")


def fp8_checkpoint(model_dir: str | Path) -> dict | None:
    """The quantization_config of an FP8 checkpoint, None for an unquantized one; raises for
    other quantized formats, which the plain loader would read as unscaled numbers."""
    path = Path(model_dir) / "config.json"
    qc = (json.loads(path.read_text()).get("quantization_config") or {}) if path.exists() else {}
    method = qc.get("quant_method")
    if method is None:
        return None
    if method not in FP8_CHECKPOINTS or (method == "compressed-tensors" and
                                         qc.get("format") != "float-quantized"):
        raise ValueError(f"{model_dir}: quantized checkpoint ({method}, "
                         f"{qc.get('format', qc.get('fmt'))}) not supported: FP8 ones are")
    return qc


def dequantized_checkpoint(model_dir: str | Path, qc: dict
                           ) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors with FP8 weights dequantized (fp32); the scales first read
    whole (they are small), since a weight may come before its scale."""
    rows, cols = qc.get("weight_block_size") or (128, 128)
    scales = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            scales |= {n: st.get_tensor(n) for n in st.keys()
                       if n.endswith(("weight_scale", "weight_scale_inv"))}
    for name, tensor in iter_checkpoint(model_dir):
        if name.endswith(("_scale", "_scale_inv")):
            continue
        scale = scales.get(f"{name}_scale", scales.get(f"{name}_scale_inv"))
        if scale is None:
            yield name, tensor
            continue
        w = tensor[:].float()
        scale = scale.float()
        if scale.dim() == 2 and scale.shape[1] > 1:  # per block: each entry covers a tile
            scale = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
            scale = scale[: w.shape[0], : w.shape[1]]
        elif scale.numel() > 1:  # per output channel, [N] or [N, 1]
            scale = scale.reshape(-1, 1)
        yield name, w * scale
