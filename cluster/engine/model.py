"""Llama-family decoder (Llama 2/3, Qwen2, Qwen3) over a flattened batch of tokens.

Tokens of all sequences in a step are concatenated ([num_tokens, hidden]); attention reads
and writes the paged KV cache through AttentionMetadata. Projections are fused (qkv, gate_up)
so each layer runs two large matmuls instead of five; the loader splits checkpoint tensors
into them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cluster.arch import SUPPORTED_ARCHITECTURES, ModelArch  # noqa: F401 - re-exported
from cluster.engine import cpu_linear
from cluster.engine.attention import AttentionMetadata, paged_attention_cpu, store_kv
from cluster.engine.parallel import TP, Layout


# The small elementwise ops below are many kernels each when eager; on the GPU they are
# replaced by one Triton kernel each (`triton_ops.py`), which matters because a small
# model's decode step is bound by kernel count even inside a CUDA graph. (RoPE is fused with
# the KV-cache write on the GPU: `triton_attention.rope_store_kv`.)
def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype == torch.float32:  # one fused op (five eager ones below), the same math
        return torch.rms_norm(x, weight.shape, weight, eps)
    dtype = x.dtype
    x = x.float()
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def _add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float):
    residual = x + residual
    return _rms_norm(residual, weight, eps), residual


def _silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _rope(q: torch.Tensor, k: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
          positions: torch.Tensor):
    cos = cos_table[positions].unsqueeze(1)
    sin = sin_table[positions].unsqueeze(1)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


class Ops:
    """The fused-op implementations a model instance uses (plain PyTorch on the CPU, Triton
    kernels on the GPU)."""

    rms_norm = staticmethod(_rms_norm)
    add_rms_norm = staticmethod(_add_rms_norm)
    silu_and_mul = staticmethod(_silu_and_mul)
    rope = staticmethod(_rope)

    @classmethod
    def use_triton(cls) -> None:
        from cluster.engine import triton_ops

        for name in ("rms_norm", "add_rms_norm", "silu_and_mul"):
            setattr(cls, name, staticmethod(getattr(triton_ops, name)))


class Linear(nn.Linear):
    """nn.Linear that, once `pack`ed (the CPU engine in fp32), multiplies by its weight in
    one of two layouts (cpu_linear.py: sgemm on the transposed weight, or oneDNN's blocked
    layout; the model runner times its model both ways at load). The plain weight is
    dropped then (one copy in memory, not two); `dense_weight` gives it back."""

    layout: str | None = None
    packed: torch.Tensor | None = None

    def pack(self, layout: str) -> None:
        """Into `layout`, from the plain weight or the other layout."""
        if layout == self.layout:
            return
        self.packed, self.layout = cpu_linear.to_layout(self.dense_weight().detach(),
                                                        layout), layout
        # a tied lm_head's weight stays with the embedding, which holds it too
        self.weight = nn.Parameter(torch.empty(0), requires_grad=False)

    def dense_weight(self) -> torch.Tensor:
        return self.weight if self.packed is None else cpu_linear.dense(self.packed,
                                                                        self.layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return super().forward(x)
        return cpu_linear.matmul(x, self.packed, self.layout, self.bias)


def can_pack_linears(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.float32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return Ops.rms_norm(x, self.weight, self.eps)
        return Ops.add_rms_norm(x, residual, self.weight, self.eps)


def rope_inv_freq(arch: ModelArch) -> torch.Tensor:
    dim = arch.head_dim
    inv = 1.0 / (arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    sc = arch.rope_scaling or {}
    kind = sc.get("rope_type", sc.get("type"))
    if kind == "llama3":
        factor, low, high = sc["factor"], sc["low_freq_factor"], sc["high_freq_factor"]
        old = sc["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv
        smooth = ((old / wavelen) - low) / (high - low)
        scaled = torch.where(wavelen > old / low, inv / factor, inv)
        mid = (wavelen <= old / low) & (wavelen >= old / high)
        inv = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    elif kind == "linear":
        inv = inv / sc["factor"]
    elif kind not in (None, "default"):
        raise ValueError(f"rope_scaling type {kind!r} is not supported")
    return inv.float()


class Rotary(nn.Module):
    """Rotate-half RoPE with a cos/sin table over all positions (indexed, never recomputed)."""

    def __init__(self, arch: ModelArch, max_positions: int):
        super().__init__()
        t = torch.arange(max_positions, dtype=torch.float32)
        freqs = torch.outer(t, rope_inv_freq(arch))
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        return Ops.rope(q, k, self.cos, self.sin, positions)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


AttentionFn = Callable[..., torch.Tensor]


class Attention(nn.Module):
    """Column-parallel qkv (this rank's heads), row-parallel o_proj + one all-reduce."""

    def __init__(self, arch: ModelArch, rotary: Rotary, tp: TP, layout: Layout):
        super().__init__()
        self.tp = tp
        self.num_heads, self.num_kv_heads, self.head_dim = (
            layout.heads, layout.kv_heads, arch.head_dim)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim ** -0.5
        self.qkv_proj = Linear(arch.hidden_size, self.q_size + 2 * self.kv_size,
                               bias=arch.attention_bias)
        self.o_proj = Linear(self.q_size, arch.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.rotary = rotary
        self.k_cache = self.v_cache = torch.empty(0)  # bound by the model runner
        # an fp8 cache's [K, V] scales per KV head, powers of two in the model's dtype
        # (kv_scales.py); None: the cache holds K and V as they are
        self.kv_scale: torch.Tensor | None = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata,
                backend: AttentionBackend) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.kv_scale is None:
            o = backend.forward(q, k, v, positions, self.rotary, self.k_cache, self.v_cache,
                                meta, self.scale)
            return self.tp.all_reduce(self.o_proj(o.reshape(-1, self.q_size)))
        # the cache holds k / k_scale and v / v_scale; the scales come out of the attention
        # as q * k_scale before it and out * v_scale after it (exact: powers of two)
        ks, vs = self.kv_scale
        group = (-1, self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim)
        q = (q.view(group) * ks[:, None, None]).view(q.shape)
        o = backend.forward(q, k / ks[:, None], v / vs[:, None], positions, self.rotary,
                            self.k_cache, self.v_cache, meta, self.scale)
        o = o.reshape(group) * vs[:, None, None]
        return self.tp.all_reduce(self.o_proj(o.reshape(-1, self.q_size)))


class AttentionBackend:
    """CPU/reference backend; the GPU runner swaps in Triton kernels with the same contract:
    rotate q and k, write k and v to the cache, attend. decode_kernel: the C++ decode
    attention (cpu_kernels.paged_decode), or None for batched SDPA."""

    def __init__(self, decode_kernel=None):
        self.decode_kernel = decode_kernel

    def forward(self, q, k, v, positions, rotary: Rotary, k_cache, v_cache,
                meta: AttentionMetadata, scale: float):
        q, k = rotary(positions, q, k)
        store_kv(k, v, k_cache, v_cache, meta.slot_mapping)
        return paged_attention_cpu(q, k_cache, v_cache, meta.block_tables, meta, scale,
                                   self.decode_kernel)


class MLP(nn.Module):
    def __init__(self, arch: ModelArch, tp: TP, layout: Layout):
        super().__init__()
        self.tp = tp
        self.gate_up_proj = Linear(arch.hidden_size, 2 * layout.intermediate, bias=False)
        self.down_proj = Linear(layout.intermediate, arch.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(self.down_proj(Ops.silu_and_mul(self.gate_up_proj(x))))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, rotary: Rotary, tp: TP, layout: Layout):
        super().__init__()
        self.self_attn = Attention(arch, rotary, tp, layout)
        self.mlp = MLP(arch, tp, layout)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, positions, x, residual, meta, backend):
        """Pre-norm block; the residual add is fused into the next norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, meta, backend)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class CausalLM(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int, tp: TP | None = None):
        super().__init__()
        self.arch = arch
        self.tp = tp or TP()
        self.layout = Layout.of(arch, self.tp)
        rotary = Rotary(arch, max_positions)
        # vocab-parallel: this rank's rows of the embedding and LM head (zero-padded)
        self.embed_tokens = nn.Embedding(self.layout.vocab, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, rotary, self.tp, self.layout)
                                    for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = Linear(arch.hidden_size, self.layout.vocab, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.backend = AttentionBackend()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.embed_tokens(input_ids)
        local = input_ids - self.tp.rank * self.layout.vocab
        outside = (local < 0) | (local >= self.layout.vocab)
        x = self.embed_tokens(local.clamp(0, self.layout.vocab - 1))
        return self.tp.all_reduce(x.masked_fill(outside[:, None], 0.0))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta, self.backend)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.tp.gather_last_dim(self.lm_head(hidden))
        return logits[:, : self.arch.vocab_size].float()
