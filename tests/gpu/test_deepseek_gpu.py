"""DeepSeek (MLA + MoE, plain PyTorch on the GPU) against transformers on the GPU. Run on the
device:
    python -m pytest -m gpu tests/gpu/test_deepseek_gpu.py
"""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from tests.test_deepseek import GREEDY, MAX_POS, NEW, PROMPT_LENS, VOCAB, _hf_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module", params=["v2", "v3"])
def case(request, tmp_path_factory):
    hf = _hf_model(request.param)
    folder = tmp_path_factory.mktemp(f"deepseek-{request.param}")
    hf.save_pretrained(folder)
    hf = hf.cuda()
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, VOCAB, (n,), generator=g).tolist() for n in PROMPT_LENS]
    expected = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=NEW, min_new_tokens=NEW)
            expected.append(out[0, len(p):].tolist())
    return folder, hf, prompts, expected


def make_engine(folder, **kw) -> LLMEngine:
    cfg = dict(device="cuda", max_model_len=MAX_POS, num_kv_blocks=64, block_size=16,
               max_num_batched_tokens=16)
    return LLMEngine(str(folder), EngineConfig(**(cfg | kw)))


@pytest.mark.parametrize("kernels", [True, False])
def test_fp32_greedy_equals_transformers(case, kernels):
    """Chunked prefill mixed with decodes, then prefix-cache hits. With the DeepSeek kernels
    (fused MoE, MLA decode) decode steps replay CUDA graphs; without them (the PyTorch
    reference) no graph is captured: its MoE reads expert counts on the host."""
    folder, _, prompts, expected = case
    engine = make_engine(folder, dtype="float32", deepseek_kernels=kernels)
    assert bool(engine.runner.graphs) == kernels
    assert engine.generate(prompts, GREEDY) == expected
    assert engine.generate(prompts[3:], GREEDY) == expected[3:]
    assert engine.stats().prefix_hits > 0


def test_bf16_greedy_within_tolerance(case):
    from cluster.bench.engine import greedy_within

    folder, hf, prompts, _ = case
    got = make_engine(folder, dtype="bfloat16").generate(prompts, GREEDY)
    assert all(len(g) == NEW and greedy_within(hf, "cuda", p, g, 0.1)
               for p, g in zip(prompts, got, strict=True))
