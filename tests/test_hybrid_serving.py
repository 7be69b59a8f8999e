"""Several models and hybrid GPU/CPU pools on the live cluster: one app beside the main one.

Model tiny-a has a GPU-role pool (on the model node, throttled so that it can be filled) and
a CPU pool (on a Kunpeng node, pinned to a core); tiny-b (other weights) has a GPU pool and
a CPU pool that no node can take, so it stays pending. The hybrid policy's decisions are read
from each answer's headers and from the frontend's /metrics.
"""

from __future__ import annotations

import os
import shutil
import time
from urllib.parse import urlparse

import httpx
import pytest
import torch
from ray import serve
from safetensors.torch import load_file, save_file

from cluster import local_cluster
from cluster.config import EngineConfig, parse_app_config
from cluster.engine.engine import LLMEngine
from cluster.engine.sequence import SamplingParams
from cluster.tokenizer import Tokenizer
from tests.helpers import model_replica_stats

pytestmark = pytest.mark.timeout(300)

APP = "hybrid"
ENGINE = {"max_model_len": 512, "max_num_seqs": 4, "max_num_batched_tokens": 512,
          "num_kv_blocks": 128, "torch_threads": 1}
# tiny-a: 10.5 MFLOPs a token; a request under 14 tokens (prompt + max_tokens) is light
CPU_COST_MAX = 1.5e8
NOWHERE = {"cpu-arch": "kunpeng", "tandem-test": "no-such-node"}


def other_weights(src, out):
    """The built-in checkpoint with other seeded random weights: a second model."""
    shutil.copytree(src, out, dirs_exist_ok=True)
    g = torch.Generator().manual_seed(99)
    weights = load_file(str(out / "model.safetensors"))
    save_file({k: (torch.randn(v.shape, generator=g) * 0.02 if v.dim() == 2 else v)
               for k, v in weights.items()}, str(out / "model.safetensors"))
    return out


def args_for(model_b) -> dict:
    gpu = {"num_replicas": 1, "num_cpus": 0.5, "label_selector": {"node-role": "model"}}
    return {
        "models": [
            {"model": {"name": "tiny-a"},
             "engine": {**ENGINE, "slow_replica_ranks": [0], "slow_step_delay_s": 0.03},
             "model_pool": gpu,
             "cpu_pool": {"num_cpus": 1, "engine": {"slow_replica_ranks": []}}},
            {"model": {"name": "tiny-b", "path": str(model_b)}, "engine": ENGINE,
             "model_pool": gpu,
             "cpu_pool": {"num_cpus": 1, "label_selector": NOWHERE}}],
        "frontend_pool": {"num_replicas": 1, "num_cpus": 0.25},
        "router": {"policy": "hybrid", "stats_period_s": 0.25,
                   "hybrid": {"cpu_cost_max": CPU_COST_MAX, "gpu_busy_max": 0.8,
                              "slo_ttft_ms": 10000}}}


def pools_seen(url: str, model: str) -> dict:
    return httpx.get(f"{url}/v1/models/{model}", timeout=30).json()["pools"]


@pytest.fixture(scope="module")
def hybrid(app_url, model_dir, tmp_path_factory):
    model_b = other_weights(model_dir, tmp_path_factory.mktemp("tiny-b"))
    args = args_for(model_b)
    doc = {"proxy_location": "HeadOnly", "applications": [
        {"name": APP, "route_prefix": f"/{APP}", "import_path": "deployments.app:app",
         "args": args,
         # the pending replica never started: no 20 s grace for it when the app goes
         "deployments": [{"name": "ModelReplicaCPU-tiny-b", "graceful_shutdown_timeout_s": 1}]}]}
    try:
        url = local_cluster.deploy(doc, parse_app_config(args),
                                   http_port=urlparse(app_url).port) + f"/{APP}"
        deadline = time.monotonic() + 60
        while pools_seen(url, "tiny-a") != {"gpu": 1, "cpu": 1}:  # the frontend's routers
            assert time.monotonic() < deadline, pools_seen(url, "tiny-a")
            time.sleep(0.25)
        yield url, model_b
    finally:
        serve.delete(APP)


def complete(url: str, model: str, prompt: str, max_tokens: int, **headers) -> httpx.Response:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "ignore_eos": True}
    r = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120)
    assert r.status_code == 200, r.text
    return r


def offline_greedy(model_dir, prompt: str, max_tokens: int) -> str:
    tok = Tokenizer(model_dir)
    engine = LLMEngine(str(model_dir), EngineConfig(device="cpu", dtype="float32",
                                                    max_model_len=512, num_kv_blocks=64,
                                                    torch_threads=1))
    out = engine.generate([tok.encode(prompt)], SamplingParams(temperature=0.0,
                                                               max_tokens=max_tokens,
                                                               ignore_eos=True))
    return tok.decode(out[0])


def decisions(url: str) -> dict[tuple[str, str, str], float]:
    """tandem_hybrid_decisions_total of the app's one frontend, by (model, pool, reason)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for s in family.samples:
            if s.name == "tandem_hybrid_decisions_total":
                out[s.labels["model"], s.labels["pool"], s.labels["reason"]] = s.value
    return out


def test_two_models_each_answer_with_their_own_weights(hybrid, model_dir):
    url, model_b = hybrid
    listed = httpx.get(f"{url}/v1/models").json()["data"]
    assert [m["id"] for m in listed] == ["tiny-a", "tiny-b"]
    prompt = "The cluster serves two models"
    got = {m: complete(url, m, prompt, 16).json()["choices"][0]["text"]
           for m in ("tiny-a", "tiny-b")}
    want = {"tiny-a": offline_greedy(model_dir, prompt, 16),
            "tiny-b": offline_greedy(model_b, prompt, 16)}
    assert got == want and want["tiny-a"] != want["tiny-b"]
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-c", "prompt": "x"})
    assert r.status_code == 404 and "tiny-a" in r.json()["error"]["message"]


def test_light_request_goes_to_the_cpu_pool_pinned_to_its_core(hybrid):
    url, _ = hybrid
    before = decisions(url)
    light = complete(url, "tiny-a", "Hi there", 4)  # 3 + 4 tokens: ~7e7 FLOPs
    heavy = complete(url, "tiny-a", "Hi there", 24)
    assert (light.headers["x-tandem-pool"], light.headers["x-tandem-route"]) == ("cpu", "light")
    assert (heavy.headers["x-tandem-pool"], heavy.headers["x-tandem-route"]) == ("gpu", "gpu")
    # the CPU pool's engine gives the GPU pool's greedy tokens (same weights, fp32)
    assert heavy.json()["choices"][0]["text"].startswith(light.json()["choices"][0]["text"])
    after = decisions(url)
    assert after[("tiny-a", "cpu", "light")] == before.get(("tiny-a", "cpu", "light"), 0) + 1
    (cpu,) = model_replica_stats(APP, "ModelReplicaCPU-tiny-a")
    info = serve.get_deployment_handle("ModelReplicaCPU-tiny-a", APP).stats.remote().result()
    assert info["pool"] == "cpu" and info["device"] == "cpu"
    assert info["node_labels"]["cpu-arch"] == "kunpeng"
    assert info["torch_threads"] == 1 and len(info["cpus"]) == 1
    assert os.sched_getaffinity(cpu["core_pid"]) == set(info["cpus"])


def test_hot_gpu_pool_overflows_to_cpu_unless_that_would_breach_the_slo(hybrid):
    """The GPU pool's one replica (4 sequences) is filled with long streams; then a request
    overflows to the CPU pool, and one whose SLO the CPU pool cannot meet stays on the GPU."""
    url, _ = hybrid
    body = {"model": "tiny-a", "prompt": "fill the batch", "max_tokens": 480,
            "temperature": 0.0, "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=120) as c:
        streams = []  # (context, its line iterator): a dropped iterator closes its stream
        try:
            for _ in range(4):
                s = c.stream("POST", f"{url}/v1/completions", json=body)
                r = s.__enter__()
                streams.append((s, r.iter_lines()))
                assert r.headers["x-tandem-route"] == "gpu"
                next(streams[-1][1])  # its first token: it runs
            over = complete(url, "tiny-a", "one more request", 16)
            assert (over.headers["x-tandem-pool"], over.headers["x-tandem-route"]) == \
                ("cpu", "overflow")
            deadline = time.monotonic() + 10  # the CPU replica's step time reaches the router
            while not model_replica_stats(APP, "ModelReplicaCPU-tiny-a")[0]["step_s"]:
                assert time.monotonic() < deadline
                time.sleep(0.2)
            time.sleep(0.6)
            with c.stream("POST", f"{url}/v1/completions", headers={"x-slo-ttft-ms": "0.001"},
                          json={**body, "max_tokens": 16}) as refused:
                assert (refused.headers["x-tandem-pool"],
                        refused.headers["x-tandem-route"]) == ("gpu", "overflow_over_slo")
        finally:
            for s, _ in streams:
                s.__exit__(None, None, None)
    seen = decisions(url)
    assert seen[("tiny-a", "cpu", "overflow")] >= 1
    assert seen[("tiny-a", "gpu", "overflow_over_slo")] >= 1


def test_cpu_pool_without_a_node_stays_pending_and_its_requests_go_to_the_gpu_pool(hybrid):
    url, _ = hybrid
    dep = serve.status().applications[APP].deployments["ModelReplicaCPU-tiny-b"]
    assert dep.status != "HEALTHY" and not dep.replica_states.get("RUNNING"), dep
    assert pools_seen(url, "tiny-b") == {"gpu": 1, "cpu": 0}
    t0 = time.monotonic()
    r = complete(url, "tiny-b", "Hi", 4)  # light: the CPU pool would take it if it ran
    assert time.monotonic() - t0 < 30
    assert (r.headers["x-tandem-pool"], r.headers["x-tandem-route"]) == \
        ("gpu", "cpu_unavailable")
    assert r.json()["usage"]["completion_tokens"] == 4
    r = httpx.post(f"{url}/v1/completions", json={"model": "tiny-a", "prompt": "Hi",
                                                   "max_tokens": 4},
                   headers={"x-slo-ttft-ms": "soon"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "x-slo-ttft-ms"
