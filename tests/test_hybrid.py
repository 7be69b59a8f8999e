"""The pure parts of several models, CPU pools and hybrid routing: the decision, the pool
state it reads, the cost of a request, the configuration, the cores a CPU replica takes."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import yaml
from safetensors.torch import load_file

from cluster import config_doc, cpu_cores
from cluster.arch import ModelArch
from cluster.config import (
    CPU,
    GPU,
    ConfigError,
    HybridConfig,
    load_serve_config,
    parse_app_config,
)
from cluster.cpu_cores import CoreShare, parse_cpulist, plan_shares
from cluster.hybrid import PoolState, decide, pool_state, predicted_ttft_s, request_cost
from cluster.load import ReplicaLoad
from tests.conftest import TEST_CONFIG

CFG = HybridConfig(cpu_cost_max=1e9, gpu_busy_max=0.8, slo_ttft_ms=500)
COOL, HOT = PoolState(busy=0.3, ttft_s=0.05), PoolState(busy=0.9, ttft_s=0.05)
FAST, SLOW = PoolState(busy=0.5, ttft_s=0.2), PoolState(busy=0.5, ttft_s=2.0)


@pytest.mark.parametrize("cost, gpu, cpu, want", [
    (5e8, COOL, FAST, (CPU, "light")),
    (5e8, COOL, SLOW, (GPU, "light_over_slo")),
    (5e9, HOT, FAST, (CPU, "overflow")),
    (5e9, HOT, SLOW, (GPU, "overflow_over_slo")),
    (5e9, COOL, FAST, (GPU, "gpu")),
    (5e8, COOL, None, (GPU, "cpu_unavailable")),
    (5e9, None, SLOW, (CPU, "gpu_unavailable")),
    (5e9, None, None, (GPU, "cpu_unavailable")),
])
def test_decision(cost, gpu, cpu, want):
    assert decide(cost, 0.5, gpu, cpu, CFG) == want


def test_the_request_slo_decides_not_the_default():
    assert decide(5e9, 3.0, HOT, SLOW, CFG) == (CPU, "overflow")
    assert decide(5e9, 0.1, HOT, FAST, CFG) == (GPU, "overflow_over_slo")


def test_utilization_is_the_coolest_replicas_most_pressing_signal():
    kv = ReplicaLoad(kv_usage=0.9, max_num_seqs=8)
    queue = ReplicaLoad(running=8, waiting=4, max_num_seqs=8)  # 1.5: requests wait
    nvml = ReplicaLoad(running=1, max_num_seqs=8, gpu_busy=0.85)
    burst = ReplicaLoad(in_flight=6, max_num_seqs=8)  # this frontend's, before any report
    assert [pool_state([x], 10, 512).busy for x in (kv, queue, nvml, burst)] == \
        [0.9, 1.5, 0.85, 0.75]
    assert pool_state([kv, burst], 10, 512).busy == 0.75
    assert pool_state([], 10, 512) is None


def test_predicted_ttft_counts_prefill_steps_and_never_trusts_a_full_batch():
    load = ReplicaLoad(running=2, waiting=1, waiting_tokens=700, max_num_seqs=8, step_s=0.02)
    assert predicted_ttft_s(load, 400, 512) == pytest.approx(3 * 0.02)  # 1100 tokens: 3 steps
    assert predicted_ttft_s(ReplicaLoad(max_num_seqs=8), 10, 512) == 0.0  # never stepped yet
    full = ReplicaLoad(running=8, max_num_seqs=8, step_s=0.001)
    assert predicted_ttft_s(full, 10, 512) == math.inf
    fast, slow = (ReplicaLoad(running=1, max_num_seqs=8, step_s=s) for s in (0.01, 0.1))
    assert pool_state([slow, fast], 10, 512).ttft_s == pytest.approx(0.01)


def test_cost_is_tokens_times_two_flops_per_weight(model_dir):
    arch = ModelArch.from_hf(model_dir)
    weights = load_file(str(model_dir / "model.safetensors"))
    assert arch.num_parameters() == sum(t.numel() for t in weights.values())
    assert request_cost(10, 6, arch.flops_per_token()) == 16 * 2 * arch.num_parameters()


@pytest.mark.parametrize("arch, params", [
    # Qwen2.5-0.5B (tied embeddings, qkv bias) and Llama-3.1-8B, as published
    (ModelArch("Qwen2ForCausalLM", 151936, 896, 4864, 24, 14, 2, 64, 1e-6, 1e6, None, 32768,
               True, True, False, [], "bfloat16"), 494_032_768),
    (ModelArch("LlamaForCausalLM", 128256, 4096, 14336, 32, 32, 8, 128, 1e-5, 5e5, None,
               131072, False, False, False, [], "bfloat16"), 8_030_261_248),
])
def test_parameters_of_known_shapes(arch, params):
    assert arch.num_parameters() == params


# ---- configuration

def test_the_one_model_configs_are_one_model_with_the_old_deployment_names():
    from pathlib import Path

    root = Path(__file__).parent.parent
    for path in [TEST_CONFIG, *root.glob("deployments/**/*.yaml"), root / "infra/serve.yaml"]:
        _, cfg = load_serve_config(path)
        (entry,) = cfg.served()
        assert entry.model is cfg.model and entry.pools() == [GPU], path
        assert cfg.deployment(entry, GPU) == "ModelReplica"


def hybrid_args(**router) -> dict:
    return {"models": [{"model": {"name": "a"}, "cpu_pool": {"engine": {"max_num_seqs": 4}}},
                       {"model": {"name": "b"}, "model_pool": None, "cpu_pool": {}}],
            "router": {"policy": "hybrid", **router}}


def test_several_models_with_their_pools():
    cfg = parse_app_config(hybrid_args(hybrid={"cpu_cost_max": "2e11"}))
    a, b = cfg.served()
    assert (a.pools(), b.pools()) == ([GPU, CPU], [CPU])
    assert [cfg.deployment(e, p) for e in (a, b) for p in e.pools()] == \
        ["ModelReplica-a", "ModelReplicaCPU-a", "ModelReplicaCPU-b"]
    cpu = a.engine_of(CPU)
    assert (cpu.device, cpu.max_num_seqs, a.engine_of(GPU).max_num_seqs) == ("cpu", 4, 64)
    assert cfg.router.hybrid.cpu_cost_max == 2e11
    one = cfg.of_model(b)  # what b's replicas and generations read
    assert (one.model.name, one.model_pool, one.models) == ("b", None, [])
    assert parse_app_config(one.model_dump()) == one


def test_the_app_has_a_deployment_per_pool():
    from deployments.app import build

    ingress = build(parse_app_config(hybrid_args()))._bound_deployment
    pools = ingress.init_args[1]
    assert {m: {p: d._bound_deployment.name for p, d in ps.items()} for m, ps in pools.items()} \
        == {"a": {GPU: "ModelReplica-a", CPU: "ModelReplicaCPU-a"},
            "b": {CPU: "ModelReplicaCPU-b"}}
    cpu = pools["a"][CPU]._bound_deployment
    assert cpu.ray_actor_options["label_selector"] == {"cpu-arch": "kunpeng"}
    assert "num_gpus" not in cpu.ray_actor_options and cpu.init_args[1] == CPU
    kwargs = cpu._deployment_config.request_router_config.request_router_kwargs
    assert (kwargs["policy"], kwargs["deployment"]) == ("prefix_aware", "ModelReplicaCPU-a")


@pytest.mark.parametrize("args, says", [
    ({"cpu_pool": {}}, "needs router.policy: hybrid"),
    ({"models": [{"model": {"name": "a"}}, {"model": {"name": "a"}}]}, "must differ: a"),
    ({"models": [{}], "engine": {"max_num_seqs": 2}}, "set engine per model"),
    ({"models": [{"model_pool": None}]}, "models.0: Value error, a model needs"),
    ({"model_pool": None}, "a model needs a model_pool, a cpu_pool or both"),
    ({"router": {"policy": "hybrid"}, "cpu_pool": {"engine": {"device": "cuda"}}},
     "device is set by the pool"),
    ({"router": {"policy": "hybrid"}, "cpu_pool": {"engine": {"max_num_seqs": 0}}},
     "cpu_pool.engine.max_num_seqs: Input should be greater than or equal to 1"),
    ({"router": {"policy": "hybrid", "hybrid": {"gpu_busy_max": 1.5}}},
     "router.hybrid.gpu_busy_max"),
    ({"router": {"hybrid": {"slo_ttft_ms": 0}}}, "router.hybrid.slo_ttft_ms"),
    ({"cpu_pool": {"num_gpus": 1}, "router": {"policy": "hybrid"}}, "cpu_pool.num_gpus"),
])
def test_bad_configs_name_the_problem(args, says):
    with pytest.raises(ConfigError) as err:
        parse_app_config(args)
    assert says in str(err.value)


def test_the_table_documents_the_new_keys():
    table = config_doc.table()
    for key in ("cpu_pool.pin_threads", "cpu_pool.engine", "models[].cpu_pool",
                "router.hybrid.cpu_cost_max", "router.hybrid.gpu_busy_max",
                "router.hybrid.slo_ttft_ms"):
        assert f"| `{key}` |" in table


def test_readme_yaml_example_is_valid():
    from pathlib import Path

    text = (Path(__file__).parent.parent / "README.md").read_text()
    example = text.split("<!-- hybrid-example -->")[1].split("```yaml")[1].split("```")[0]
    parse_app_config(yaml.safe_load(example)["applications"][0]["args"])


# ---- cores

def test_cpulist_and_shares():
    assert parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    nodes = [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert plan_shares(nodes, 2) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert plan_shares(nodes, 3) == [[0, 1, 2], [4, 5, 6]]  # inside a node; 3 and 7 idle
    assert plan_shares(nodes, 8) == [[0, 1, 2, 3, 4, 5, 6, 7]]  # spans nodes when it must
    assert plan_shares(nodes, 64) == [[0, 1, 2, 3, 4, 5, 6, 7]]  # at most the host
    assert plan_shares([[0, 1, 2]], 2) == [[0, 1]]


def test_claims_take_distinct_cores_then_share(tmp_path, monkeypatch):
    monkeypatch.setattr(cpu_cores, "LOCKS", tmp_path)
    cores = sum(map(len, cpu_cores.host_cores()))
    claims = [CoreShare.claim(1, pin=True) for _ in range(cores + 1)]
    taken = [c.cpus[0] for c in claims[:cores]]
    assert len(set(taken)) == cores and all(c.threads == 1 for c in claims)
    assert claims[-1].cpus[0] in taken  # the host is full: it shares (and logs it)
    assert CoreShare.claim(99, pin=False).threads == cores


def test_a_pinned_share_holds_the_engine_process_to_its_core():
    share = CoreShare([max(os.sched_getaffinity(0))], 1, True)
    code = "import os; print(sorted(os.sched_getaffinity(0)), os.environ['OMP_PLACES'])"
    before = os.sched_getaffinity(0), os.environ.get("OMP_PLACES")
    with share.applied():
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split() == [str(share.cpus), "cores"]
    assert (os.sched_getaffinity(0), os.environ.get("OMP_PLACES")) == before
