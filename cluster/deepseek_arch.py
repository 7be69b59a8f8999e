"""What a DeepSeek-V2/V3 config.json says beyond the Llama-family facts in ModelArch:
multi-head latent attention (MLA) dims, YaRN RoPE, and the mixture-of-experts layout.

No torch here (ModelArch is read by the CPU-node frontends too).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DEEPSEEK_ARCHITECTURES = ("DeepseekV2ForCausalLM", "DeepseekV3ForCausalLM")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class Rope:
    """RoPE over the qk_rope_head_dim part of q and k: "default" or "yarn"."""

    kind: str
    theta: float
    factor: float = 1.0
    original_max_positions: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0

    @classmethod
    def from_hf(cls, cfg: dict) -> Rope:
        # checkpoints say rope_scaling + rope_theta; transformers 5 saves rope_parameters
        sc = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
        theta = cfg.get("rope_theta") or sc.get("rope_theta") or 10000.0
        kind = sc.get("rope_type", sc.get("type", "default"))
        if kind == "default":
            return cls("default", theta)
        if kind != "yarn":
            raise ValueError(f"DeepSeek rope_scaling type {kind!r} is not supported")
        orig = sc.get("original_max_position_embeddings", cfg["max_position_embeddings"])
        return cls("yarn", theta, sc.get("factor") or cfg["max_position_embeddings"] / orig, orig,
                   sc.get("beta_fast") or 32.0, sc.get("beta_slow") or 1.0,
                   sc.get("mscale") or 0.0, sc.get("mscale_all_dim") or 0.0)

    def attention_factor(self) -> float:
        """YaRN's scale of cos/sin (so of q_pe and k_pe each)."""
        if self.kind != "yarn":
            return 1.0
        if self.mscale and self.mscale_all_dim:
            return yarn_mscale(self.factor, self.mscale) / \
                yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    def softmax_scale(self, qk_head_dim: int) -> float:
        """1/sqrt(d), times mscale_all_dim's factor squared under YaRN (DeepSeek's long-context
        attention temperature)."""
        scale = qk_head_dim ** -0.5
        if self.kind == "yarn" and self.mscale_all_dim:
            scale *= yarn_mscale(self.factor, self.mscale_all_dim) ** 2
        return scale


@dataclass(frozen=True)
class DeepseekDims:
    version: int  # 2 or 3
    q_lora_rank: int | None  # None: a full q_proj (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: Rope
    rope_interleave: bool  # rotary pairs are (x0, x1), (x2, x3), ... (DeepSeek's layout)
    n_routed_experts: int  # 0: every layer dense
    n_shared_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    first_k_dense_replace: int
    moe_layer_freq: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    # V2: softmax scores, "greedy" or "group_limited_greedy" (best expert per group picks the
    # groups); V3: sigmoid scores plus a correction bias for the choice, "noaux_tc" (the sum
    # of each group's two best picks the groups)
    topk_method: str
    n_group: int
    topk_group: int
    num_mtp_layers: int  # multi-token-prediction layers after the decoder: not loaded

    @classmethod
    def from_hf(cls, cfg: dict, architecture: str) -> DeepseekDims:
        version = 3 if architecture == "DeepseekV3ForCausalLM" else 2
        method = "noaux_tc" if version == 3 else (cfg.get("topk_method") or "greedy")
        if method not in ("greedy", "group_limited_greedy", "noaux_tc"):
            raise ValueError(f"DeepSeek topk_method {method!r} is not supported")
        experts = cfg.get("n_routed_experts") or 0
        return cls(
            version=version, q_lora_rank=cfg.get("q_lora_rank"),
            kv_lora_rank=cfg["kv_lora_rank"], qk_nope_head_dim=cfg["qk_nope_head_dim"],
            qk_rope_head_dim=cfg["qk_rope_head_dim"], v_head_dim=cfg["v_head_dim"],
            rope=Rope.from_hf(cfg),
            rope_interleave=True if version == 2 else cfg.get("rope_interleave", True),
            n_routed_experts=experts, n_shared_experts=cfg.get("n_shared_experts") or 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok") or 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size") or 0,
            first_k_dense_replace=cfg.get("first_k_dense_replace") or 0,
            moe_layer_freq=cfg.get("moe_layer_freq") or 1,
            routed_scaling_factor=cfg.get("routed_scaling_factor") or 1.0,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", version == 3)),
            topk_method=method, n_group=cfg.get("n_group") or 1,
            topk_group=cfg.get("topk_group") or 1,
            num_mtp_layers=cfg.get("num_nextn_predict_layers") or 0)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def cache_dim(self) -> int:
        """Per token and layer the cache holds the latent and the rotated key part, once for
        all heads: (kv_lora_rank + qk_rope_head_dim) values."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    def is_moe_layer(self, i: int) -> bool:
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and \
            i % self.moe_layer_freq == 0

    def layer_parameters(self, arch, i: int, active: bool = False) -> int:
        """Weights of decoder layer i; active: only those one token uses (its top-k routed
        experts rather than all of them)."""
        h, heads = arch.hidden_size, arch.num_heads
        if self.q_lora_rank:
            q = h * self.q_lora_rank + self.q_lora_rank + \
                self.q_lora_rank * heads * self.qk_head_dim
        else:
            q = h * heads * self.qk_head_dim
        kv = h * self.cache_dim + self.kv_lora_rank + \
            self.kv_lora_rank * heads * (self.qk_nope_head_dim + self.v_head_dim)
        attn = q + kv + heads * self.v_head_dim * h
        if not self.is_moe_layer(i):
            return attn + 3 * h * arch.intermediate_size + 2 * h
        routed = self.num_experts_per_tok if active else self.n_routed_experts
        experts = (routed + self.n_shared_experts) * 3 * h * self.moe_intermediate_size
        return attn + experts + self.n_routed_experts * h + 2 * h

    def num_parameters(self, arch, active: bool = False) -> int:
        vocab = arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
        return vocab + arch.hidden_size + sum(
            self.layer_parameters(arch, i, active) for i in range(arch.num_layers))
