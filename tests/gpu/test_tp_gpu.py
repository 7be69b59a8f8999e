"""TP=2 on two GPUs (NCCL, all-reduces inside the decode CUDA graphs) against TP=1.
Run on the device's nvidia-h200-x2: python -m pytest -m gpu tests/gpu/test_tp_gpu.py"""

from __future__ import annotations

import pytest
import torch

from cluster.config import EngineConfig
from cluster.engine.sequence import SamplingParams

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs")]


def test_tp2_fp32_equals_tp1():
    import ray

    from cluster.bench.engine import _free, _ray_hosts, model_folder

    ray.init(num_gpus=2, include_dashboard=False, ignore_reinit_error=True)
    folder = model_folder("qwen2.5-0.5b")
    cfg = EngineConfig(device="cuda", dtype="float32", max_model_len=1024, max_num_seqs=8,
                       max_num_batched_tokens=512)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 150000, (n,), generator=g).tolist() for n in (7, 100, 600)]
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    out = {}
    for size in (1, 2):
        hosts, pgs = _ray_hosts(size, 1, cfg, folder, "synthetic:0")
        out[size] = ray.get(hosts[0].generate.remote(prompts, params))
        _free(hosts, pgs)
    assert out[1] == out[2]
