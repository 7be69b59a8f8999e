"""TP=2 on two GPUs (NCCL, all-reduces inside the decode CUDA graphs) against TP=1.
Run on the device's nvidia-h200-x2: python -m pytest -m gpu tests/gpu/test_tp_gpu.py"""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine.sequence import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


@pytest.mark.parametrize("preset", ["qwen2.5-0.5b", "deepseek-v3-tiny"])
def test_tp2_fp32_equals_tp1(preset):
    """deepseek-v3-tiny: heads and expert widths split, its decode CUDA graphs holding the
    all-reduces beside the fused MoE and MLA decode kernels."""
    import json
    from pathlib import Path

    import ray

    from cluster.bench.engine import _free, _ray_hosts, model_folder

    ray.init(num_gpus=2, include_dashboard=False, ignore_reinit_error=True)
    folder = model_folder(preset)
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    cfg = EngineConfig(device="cuda", dtype="float32", max_model_len=1024, max_num_seqs=8,
                       max_num_batched_tokens=512)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (7, 100, 600)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    out = {}
    for size in (1, 2):
        hosts, pgs = _ray_hosts(size, 1, cfg, folder, "synthetic:0")
        out[size] = ray.get(hosts[0].generate.remote(prompts, params))
        _free(hosts, pgs)
    assert out[1] == out[2]
