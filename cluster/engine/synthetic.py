"""Seeded random weights of a model shape, HF-named: benchmarks need no checkpoint."""

from __future__ import annotations

import torch

from cluster.engine.model import CausalLM


def synthetic_weights(model: CausalLM, seed: int):
    """HF-named random tensors (std 0.02, norms 1), generated on the model's device."""
    arch = model.arch
    dev = next(model.parameters()).device
    h, d = arch.hidden_size, arch.head_dim
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, h), "model.norm.weight": (h,)}
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, h)
    for i in range(arch.num_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (arch.num_heads * d, h),
                   p + "self_attn.k_proj.weight": (arch.num_kv_heads * d, h),
                   p + "self_attn.v_proj.weight": (arch.num_kv_heads * d, h),
                   p + "self_attn.o_proj.weight": (h, arch.num_heads * d),
                   p + "mlp.gate_proj.weight": (arch.intermediate_size, h),
                   p + "mlp.up_proj.weight": (arch.intermediate_size, h),
                   p + "mlp.down_proj.weight": (h, arch.intermediate_size),
                   p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
        if arch.attention_bias:
            shapes |= {p + f"self_attn.{x}_proj.bias": (s[0],) for x, s in (
                ("q", shapes[p + "self_attn.q_proj.weight"]),
                ("k", shapes[p + "self_attn.k_proj.weight"]),
                ("v", shapes[p + "self_attn.v_proj.weight"]))}
        if arch.qk_norm:
            shapes |= {p + "self_attn.q_norm.weight": (d,), p + "self_attn.k_norm.weight": (d,)}
    dtype = next(model.parameters()).dtype
    for i, (name, shape) in enumerate(shapes.items()):
        if len(shape) == 1 and "norm" in name:
            yield name, torch.ones(shape, dtype=dtype, device=dev)
            continue
        g = torch.Generator(device=dev).manual_seed(seed * 100003 + i)
        yield name, (torch.randn(shape, generator=g, device=dev) * 0.02).to(dtype)
