"""DeepSeek-V2/V3 (MLA + MoE) in the engine against transformers' own modeling, CPU fp32:
small seeded random checkpoints with dense and MoE layers, grouped routing, shared experts,
q_lora off (V2) and on (V3), YaRN RoPE."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from cluster.arch import ModelArch
from cluster.config import EngineConfig
from cluster.deepseek_shapes import DEEPSEEK_SHAPES
from cluster.engine.engine import LLMEngine
from cluster.engine.sequence import SamplingParams

VOCAB, MAX_POS = 512, 256
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
        "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1}
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
              num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
              kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24,
              first_k_dense_replace=1, max_position_embeddings=MAX_POS, tie_word_embeddings=False)
CONFIGS = {
    # V2: full q_proj, softmax routing limited to the best groups, no renormalization
    "v2": dict(COMMON, q_lora_rank=None, n_routed_experts=8, num_experts_per_tok=3,
               n_group=4, topk_group=2, topk_method="group_limited_greedy", n_shared_experts=2,
               routed_scaling_factor=1.5, norm_topk_prob=False,
               rope_parameters=YARN | {"mscale": 0.707, "mscale_all_dim": 0.707}),
    # V3: q_lora, sigmoid routing with a correction bias, grouped top-k, renormalized weights
    "v3": dict(COMMON, q_lora_rank=48, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
               topk_group=2, n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
               rope_parameters=YARN | {"mscale": 1.0, "mscale_all_dim": 0.8}),
}
PROMPT_LENS = (1, 9, 30, 70)  # the longer ones run past YaRN's original 64 positions
NEW = 32
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW, ignore_eos=True)


def _hf_model(version: str, **overrides):
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
    )

    config_cls, model_cls = {"v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
                             "v3": (DeepseekV3Config, DeepseekV3ForCausalLM)}[version]
    torch.manual_seed(20 + len(version))
    cfg = config_cls(**(CONFIGS[version] | overrides))
    cfg._attn_implementation = "eager"
    model = model_cls(cfg).eval()
    # routers 10x transformers' init, so that tokens pick varied experts; not more: saturated
    # scores make near-ties, which rounding flips between any two implementations (at this
    # seed the closest choice of the HF runs is 4e-5 apart, 100x our logits' error)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0, 0.2)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0, 0.05)
    return model


@pytest.fixture(scope="module", params=["v2", "v3"])
def case(request, tmp_path_factory):
    """(checkpoint folder, the transformers model, prompts, its greedy continuations)."""
    version = request.param
    hf = _hf_model(version)
    folder = tmp_path_factory.mktemp(f"deepseek-{version}")
    hf.save_pretrained(folder)
    if version == "v2":  # a released checkpoint's config: rope_scaling + rope_theta
        cfg = json.loads((folder / "config.json").read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = {"type": rope.pop("rope_type")} | rope
        (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p])
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=NEW, min_new_tokens=NEW)
            expected.append(out[0, len(p):].tolist())
    return folder, hf, prompts, expected


def make_engine(folder, **kw) -> LLMEngine:
    cfg = dict(device="cpu", dtype="float32", max_model_len=MAX_POS, num_kv_blocks=64,
               block_size=16, max_num_batched_tokens=512, torch_threads=2)
    return LLMEngine(str(folder), EngineConfig(**(cfg | kw)))


def test_batch_of_mixed_lengths_equals_hf(case):
    folder, _, prompts, expected = case
    engine = make_engine(folder)
    assert engine.generate(prompts, GREEDY) == expected
    assert engine.stats().kv_blocks_used == 0


def test_chunked_prefill_equals_hf(case):
    # 16-token budget: prompts go in chunks, mixed with the other requests' decodes
    folder, _, prompts, expected = case
    engine = make_engine(folder, max_num_batched_tokens=16)
    assert engine.generate(prompts, GREEDY) == expected


def test_prefix_cache_hits_equal_hf(case):
    folder, _, prompts, expected = case
    engine = make_engine(folder)
    first = engine.generate([prompts[3]], GREEDY)
    hits = engine.stats().prefix_hits
    second = engine.generate([prompts[3]], GREEDY)
    assert engine.stats().prefix_hits > hits  # the second run read cached latent blocks
    assert first == second == [expected[3]]


def test_preemption_equals_hf(case):
    # 14 blocks of 16 tokens cannot hold all eight sequences at once: some get preempted
    folder, _, prompts, expected = case
    engine = make_engine(folder, num_kv_blocks=14, max_model_len=128, max_num_batched_tokens=64,
                         enable_prefix_caching=False)
    assert engine.generate(prompts * 2, GREEDY) == expected * 2
    assert engine.scheduler.num_preemptions > 0
    assert engine.stats().kv_blocks_used == 0


def test_logits_within_1e_4(case):
    """The prefill's last-position logits (expanded K/V) and every decode step's (absorbed,
    in latent space) against transformers' forward over the same tokens."""
    folder, hf, prompts, expected = case
    engine = make_engine(folder)
    model = engine.runner.model
    seen = []

    def record(hidden, compute=model.compute_logits):
        logits = compute(hidden)
        seen.append(logits.clone())
        return logits

    model.compute_logits = record
    prompt = prompts[3]
    steps = 8
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=steps,
                                                   ignore_eos=True))[0]
    assert out == expected[3][:steps]
    with torch.no_grad():
        ref = hf(torch.tensor([prompt + out[:-1]])).logits[0, len(prompt) - 1 :]
    ours = torch.cat(seen)
    diff = (ours - ref).abs().max().item()
    print(f"max |logit difference| over prefill + {steps - 1} decode steps: {diff:.2e}")
    assert diff < 1e-4


def test_router_matches_hf(case):
    """Our routing (expert ids and weights) against transformers' router module, and the
    choices are varied (the test checkpoints exercise many experts)."""
    folder, hf, _, _ = case
    ours = make_engine(folder).runner.model.layers[1].mlp.gate
    theirs = hf.model.layers[1].mlp.gate
    x = torch.randn(256, COMMON["hidden_size"], generator=torch.Generator().manual_seed(3))
    weights, ids = ours(x)
    _, hf_weights, hf_ids = theirs(x)
    order, hf_order = ids.argsort(-1), hf_ids.argsort(-1)
    assert torch.equal(ids.gather(1, order), hf_ids.gather(1, hf_order))
    torch.testing.assert_close(weights.gather(1, order), hf_weights.gather(1, hf_order))
    assert len(ids.unique()) == ours.weight.shape[0]


def test_cache_holds_latent_and_rope_part_once_per_token(case):
    folder, *_ = case
    engine = make_engine(folder, num_kv_blocks=32)
    ds = ModelArch.from_hf(folder).deepseek
    runner = engine.runner
    dim = ds.kv_lora_rank + ds.qk_rope_head_dim
    assert runner.model.layers[0].self_attn.kv_cache.shape == (33, 16, dim)
    assert runner.kv_bytes_per_block() == COMMON["num_hidden_layers"] * 16 * dim * 4
    # against per-head K and V of the expanded attention: 2 * heads * (nope + rope) per token
    per_head = 2 * COMMON["num_attention_heads"] * (ds.qk_nope_head_dim + ds.qk_rope_head_dim)
    assert dim * 3 < per_head


def test_mtp_layers_are_skipped(case, tmp_path, caplog):
    folder, _, prompts, expected = case
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    n = COMMON["num_hidden_layers"]  # the layer after the last: a multi-token-prediction head
    save_file({f"model.layers.{n}.eh_proj.weight": torch.zeros(64, 128),
               f"model.layers.{n}.self_attn.kv_b_proj.weight": torch.zeros(160, 32)},
              str(tmp_path / "model-mtp.safetensors"))
    with caplog.at_level(logging.INFO, logger="cluster.engine.deepseek_loader"):
        engine = make_engine(tmp_path)
    assert "skipped 2 tensors of the multi-token-prediction layers" in caplog.text
    assert engine.generate(prompts[:2], GREEDY) == expected[:2]


def test_tensor_parallel_2_equals_hf(case, ray_cluster):
    """TP=2 over gloo through Ray (placement group, rank 0 and a peer actor): heads, the
    dense, shared and routed experts' widths and the vocab split in two, each rank reading
    its slices from the safetensors files; greedy tokens equal transformers'."""
    from tests.test_tensor_parallel import run_tp

    folder, _, prompts, expected = case
    out, labels = run_tp(folder, prompts, 2, max_model_len=MAX_POS, max_num_batched_tokens=64)
    assert out == [e[:16] for e in expected] and len(labels) == 2  # run_tp asks for 16


def test_tensor_parallel_with_attention_biases_is_refused(case, tmp_path):
    folder, *_ = case
    cfg = json.loads((folder / "config.json").read_text()) | {"attention_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="attention biases"):
        make_engine(tmp_path, tensor_parallel_size=2)


def test_v3_rope_not_interleaved(tmp_path):
    """rope_interleave false: rotate-half pairs (x_i, x_{i+d/2}) instead of adjacent ones."""
    hf = _hf_model("v3", rope_interleave=False, num_hidden_layers=2)
    hf.save_pretrained(tmp_path)
    prompt = torch.randint(0, VOCAB, (80,), generator=torch.Generator().manual_seed(5)).tolist()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                           max_new_tokens=16, min_new_tokens=16)[0, len(prompt):].tolist()
    engine = make_engine(tmp_path)
    assert not engine.runner.model.layers[0].self_attn.rotary.interleave
    assert engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16,
                                                    ignore_eos=True)) == [want]


def test_v2_lite_shape(tmp_path):
    """The deepseek-v2-lite preset is the released architecture: 15.7B parameters, and a cache
    of 576 values per token and layer, a tenth of per-head K and V."""
    (tmp_path / "config.json").write_text(json.dumps(DEEPSEEK_SHAPES["deepseek-v2-lite"]))
    arch = ModelArch.from_hf(tmp_path)
    ds = arch.deepseek
    assert round(arch.num_parameters() / 1e9, 1) == 15.7
    assert arch.flops_per_token() < 0.2 * 2 * arch.num_parameters()  # 6 of 64 experts a token
    assert (ds.q_lora_rank, ds.cache_dim, arch.head_dim) == (None, 576, 192)
    assert [ds.is_moe_layer(i) for i in range(3)] == [False, True, True]
    assert ds.cache_dim * 10 < 2 * arch.num_heads * arch.head_dim
