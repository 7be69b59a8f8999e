"""DeepSeek model shapes for benchmarks (`cluster.bench.engine --preset`) and random
checkpoints (`tandem model init --shape`): config.json contents, weights random either way.

deepseek-v2-lite is DeepSeek-V2-Lite's real architecture (15.7B parameters, 2.4B active;
about 31 GB in bf16). deepseek-v3-tiny is a small V3-style shape that runs anywhere: q_lora,
sigmoid routing with grouped top-k, a shared expert, a dense first layer, YaRN RoPE.
"""

from __future__ import annotations

from pathlib import Path

DEEPSEEK_SHAPES = {
    "deepseek-v2-lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
        "vocab_size": 102400, "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "q_lora_rank": None, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "n_routed_experts": 64, "n_shared_experts": 2, "num_experts_per_tok": 6,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "topk_method": "greedy",
        "n_group": 1, "topk_group": 1, "norm_topk_prob": False, "routed_scaling_factor": 1.0,
        "scoring_func": "softmax", "max_position_embeddings": 163840, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 0.707, "mscale_all_dim": 0.707,
                         "original_max_position_embeddings": 4096},
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "torch_dtype": "bfloat16"},
    "deepseek-v3-tiny": {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 768,
        "moe_intermediate_size": 128, "num_hidden_layers": 4, "num_attention_heads": 8,
        "num_key_value_heads": 8, "q_lora_rank": 192, "kv_lora_rank": 128,
        "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "n_routed_experts": 16, "n_shared_experts": 1, "num_experts_per_tok": 4,
        "first_k_dense_replace": 1, "n_group": 4, "topk_group": 2, "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "num_nextn_predict_layers": 0, "max_position_embeddings": 2048, "rope_theta": 10000,
        "rope_scaling": {"type": "yarn", "factor": 4, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0,
                         "original_max_position_embeddings": 512},
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "attention_bias": False,
        "hidden_act": "silu", "torch_dtype": "float32"},
}


def write_checkpoint(out: Path, shape: str, bos: int, eos: list[int], seed: int) -> None:
    """The shape's weights as transformers initializes them (seeded), saved by transformers
    itself, so the checkpoint is laid out as released ones are (one tensor per expert)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(DEEPSEEK_SHAPES[shape], bos_token_id=bos, eos_token_id=eos)
    dtype = getattr(torch, cfg.pop("torch_dtype"))
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.bos_token_id, model.generation_config.eos_token_id = bos, eos
    partial = out / ".partial"
    model.save_pretrained(partial)
    # the weights last, each whole: model.safetensors present marks a complete checkpoint
    for f in sorted(partial.iterdir(), key=lambda f: f.suffix == ".safetensors"):
        f.replace(out / f.name)
    partial.rmdir()
