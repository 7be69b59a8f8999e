"""DeepSeek-V2/V3 decoder over a flattened batch: multi-head latent attention (MLA) with a
compressed paged cache (mla_attention.py) and mixture-of-experts layers (moe.py).

The same interface as CausalLM (model.py): forward(input_ids, positions, meta) and
compute_logits, layers[i].self_attn.kv_cache bound by the model runner.

Tensor parallelism splits the attention heads (q_proj / q_b_proj and kv_b_proj by output rows,
o_proj by input columns) and every MLP's intermediate width (dense, shared and each routed
expert: gate/up by rows, down by columns), with one all-reduce after attention and one after
the MLP or MoE block. The low-rank q_a / kv_a projections and the router are replicated, and so
is the latent cache: each rank stores every token's [latent, k_pe] (it is one vector per token,
not per head; vLLM's MLA keeps it whole on each rank too). Plain PyTorch on the CPU; on a
GPU the runner gives the routed experts and MLA decode their Triton kernels (moe.Experts.fused,
MLAttention.kernel), and decode steps then replay CUDA graphs.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cluster.arch import ModelArch
from cluster.deepseek_arch import DeepseekDims, Rope
from cluster.engine.attention import AttentionMetadata
from cluster.engine.mla_attention import mla_attention, store_latents
from cluster.engine.model import CausalLM, RMSNorm
from cluster.engine.moe import GatedMLP, MoE
from cluster.engine.parallel import TP, Layout

# the q_a / kv_a layernorms use RMSNorm's default eps in DeepSeek's code, not rms_norm_eps
LATENT_NORM_EPS = 1e-6
DEEPSEEK_TP_REFUSED = ("DeepSeek models with attention biases run with tensor_parallel_size=1: "
                       "a row-parallel o_proj would add its bias once per rank")


def rope_inv_freq(rope: Rope, dim: int) -> torch.Tensor:
    """Per rotary pair its frequency; under YaRN the low frequencies (wavelengths past the
    original context) are interpolated by `factor`, the high ones kept, a linear ramp between.
    float32 throughout, as transformers computes it."""
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    kept = 1.0 / pos_freqs
    if rope.kind != "yarn":
        return kept

    def dim_of(rotations: float) -> float:  # the pair that turns `rotations` times
        return dim * math.log(rope.original_max_positions / (rotations * 2 * math.pi)) / \
            (2 * math.log(rope.theta))

    low = max(math.floor(dim_of(rope.beta_fast)), 0)
    high = min(math.ceil(dim_of(rope.beta_slow)), dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) /
            ((high - low) or 0.001)).clamp(0, 1)
    return 1.0 / (rope.factor * pos_freqs) * ramp + kept * (1 - ramp)


class Rotary(nn.Module):
    """RoPE on the rope part of q and k, cos/sin tables over all positions (YaRN's attention
    factor folded in). DeepSeek's pairs are interleaved, (x0, x1), (x2, x3), ...; rotated
    outputs come out de-interleaved (evens then odds), as in transformers' V3: q and k get the
    same permutation, so their dot products are those of the interleaved rotation."""

    def __init__(self, dims: DeepseekDims, max_positions: int):
        super().__init__()
        self.interleave = dims.rope_interleave
        inv = rope_inv_freq(dims.rope, dims.qk_rope_head_dim)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv)
        factor = dims.rope.attention_factor()
        self.register_buffer("cos", freqs.cos() * factor, persistent=False)
        self.register_buffer("sin", freqs.sin() * factor, persistent=False)

    def forward(self, positions: torch.Tensor, q_pe: torch.Tensor, k_pe: torch.Tensor):
        cos, sin = self.cos[positions], self.sin[positions]
        return self._rotate(q_pe, cos[:, None], sin[:, None]), self._rotate(k_pe, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        x1, x2 = (xf[..., 0::2], xf[..., 1::2]) if self.interleave else xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class MLAttention(nn.Module):
    """Queries through q_proj (or the q_a/q_b low-rank pair), keys and values through the
    kv_a latent; the cache holds [latent, k_pe] per token (mla_attention.py)."""

    def __init__(self, arch: ModelArch, dims: DeepseekDims, rotary: Rotary, tp: TP,
                 layout: Layout):
        super().__init__()
        self.tp, self.rotary = tp, rotary
        self.heads, h = layout.heads, arch.hidden_size
        self.nope, self.rope, self.v_dim = (dims.qk_nope_head_dim, dims.qk_rope_head_dim,
                                            dims.v_head_dim)
        self.rank = dims.kv_lora_rank
        q_out = self.heads * dims.qk_head_dim
        self.q_lora = bool(dims.q_lora_rank)
        if self.q_lora:
            self.q_a_proj = nn.Linear(h, dims.q_lora_rank, bias=arch.attention_bias)
            self.q_a_layernorm = RMSNorm(dims.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(dims.q_lora_rank, q_out, bias=False)
        else:
            self.q_proj = nn.Linear(h, q_out, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, dims.cache_dim, bias=arch.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, self.heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.heads * self.v_dim, h, bias=arch.attention_bias)
        self.scale = dims.rope.softmax_scale(dims.qk_head_dim)
        self.kv_cache = torch.empty(0)  # bound by the model runner
        self.kernel = None  # triton_mla for decode rows on a GPU, set by the model runner

    def forward(self, positions: torch.Tensor, x: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        if self.q_lora:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        else:
            q = self.q_proj(x)
        q_nope, q_pe = q.view(len(x), self.heads, -1).split([self.nope, self.rope], dim=-1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe)
        store_latents(torch.cat([self.kv_a_layernorm(latent), k_pe], dim=-1), self.kv_cache,
                      meta.slot_mapping)
        o = mla_attention(q_nope, q_pe, self.kv_cache, self.kv_b_proj.weight, meta, self.scale,
                          self.kernel)
        return self.tp.all_reduce(self.o_proj(o.reshape(len(x), -1)))


class DenseMLP(GatedMLP):
    """The MLP of the layers before first_k_dense_replace (and off moe_layer_freq)."""

    def __init__(self, hidden: int, intermediate: int, tp: TP):
        super().__init__(hidden, intermediate)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tp.all_reduce(super().forward(x))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ModelArch, i: int, rotary: Rotary, tp: TP, layout: Layout):
        super().__init__()
        dims = arch.deepseek
        self.self_attn = MLAttention(arch, dims, rotary, tp, layout)
        self.mlp = MoE(arch.hidden_size, dims, tp) if dims.is_moe_layer(i) else \
            DenseMLP(arch.hidden_size, layout.intermediate, tp)
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)

    def forward(self, positions, x, residual, meta):
        """Pre-norm block; the residual add is fused into the next norm."""
        if residual is None:
            h, residual = self.input_layernorm(x), x
        else:
            h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(positions, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DeepseekForCausalLM(nn.Module):
    def __init__(self, arch: ModelArch, max_positions: int, tp: TP | None = None):
        super().__init__()
        self.arch = arch
        self.tp = tp or TP()
        if self.tp.size > 1 and arch.attention_bias:  # no released DeepSeek checkpoint has them
            raise ValueError(DEEPSEEK_TP_REFUSED)
        self.layout = Layout.of(arch, self.tp)
        rotary = Rotary(arch.deepseek, max_positions)
        self.embed_tokens = nn.Embedding(self.layout.vocab, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch, i, rotary, self.tp, self.layout)
                                    for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = nn.Linear(arch.hidden_size, self.layout.vocab, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # the embedding and the LM head are the Llama family's
    embed = CausalLM.embed
    compute_logits = CausalLM.compute_logits

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        x, residual = self.embed(input_ids), None
        for layer in self.layers:
            x, residual = layer(positions, x, residual, meta)
        return self.norm(x, residual)[0]

