"""A checkpoint's architecture as its Hugging Face config.json states it.

No torch here: the CPU-node frontends read the vocabulary size, context length and EOS ids
of the model they serve from this too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from cluster.deepseek_arch import DEEPSEEK_ARCHITECTURES, DeepseekDims

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
                           "MistralForCausalLM") + DEEPSEEK_ARCHITECTURES


@dataclass
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool
    eos_token_ids: list[int]
    torch_dtype: str
    # DeepSeek-V2/V3 (MLA + MoE; cluster/engine/deepseek.py); None for the Llama family.
    # For those, head_dim is the q/k head dim (nope + rope) and num_kv_heads = num_heads.
    deepseek: DeepseekDims | None = None

    @classmethod
    def from_hf(cls, model_dir: str | Path) -> ModelArch:
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"{model_dir}: architecture {arch!r} is not supported; "
                             f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
        heads = cfg["num_attention_heads"]
        ds = DeepseekDims.from_hf(cfg, arch) if arch in DEEPSEEK_ARCHITECTURES else None
        eos = cfg.get("eos_token_id")
        gen = Path(model_dir) / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        return cls(
            architecture=arch,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=heads if ds else cfg.get("num_key_value_heads", heads),
            head_dim=ds.qk_head_dim if ds else cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=cfg.get("rope_theta", 10000.0),
            rope_scaling=cfg.get("rope_scaling"),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "Qwen2ForCausalLM"),
            qk_norm=arch == "Qwen3ForCausalLM",
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype") or "float32",
            deepseek=ds,
        )

    def num_parameters(self) -> int:
        """Weights of the checkpoint: embeddings, LM head (unless tied), per layer the
        attention and MLP projections and norms, the final norm."""
        if self.deepseek is not None:
            return self.deepseek.num_parameters(self)
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, \
            self.num_kv_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h + ((q + 2 * kv) if self.attention_bias else 0)
        layer = attn + 3 * h * self.intermediate_size + 2 * h + \
            (2 * self.head_dim if self.qk_norm else 0)
        vocab = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return vocab + self.num_layers * layer + h

    def flops_per_token(self) -> float:
        """A forward pass per token, roughly: a multiply and an add per weight."""
        if self.deepseek is not None:  # a MoE token runs only its top-k routed experts
            return 2.0 * self.deepseek.num_parameters(self, active=True)
        return 2.0 * self.num_parameters()


def context_length(arch: ModelArch, max_model_len: int | None) -> int:
    """The longest sequence served: the configured limit, never past the model's own."""
    return min(max_model_len or arch.max_position_embeddings, arch.max_position_embeddings)
