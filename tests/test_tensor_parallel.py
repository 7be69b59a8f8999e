"""TP=2 over gloo through the real Ray path (placement group + actors) equals TP=1."""

from __future__ import annotations

import pytest
import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import EngineConfig
from cluster.engine.engine import LLMEngine
from cluster.engine.sequence import SamplingParams
from cluster.engine.tp_workers import EngineHost
from cluster.tokenizer import Tokenizer

CFG = dict(device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=64,
           max_num_batched_tokens=64, torch_threads=1)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts(model_dir):
    tok = Tokenizer(model_dir)
    return [tok.encode(t) for t in ("hello world", "tensor parallel " * 12, "a")]


def run_tp(model_dir, prompts, size: int, probe=None, **cfg):
    """(greedy outputs, probe(engine) run on the host: by default the ranks' node labels)"""
    pg = placement_group([{"CPU": 1}] * size, strategy="STRICT_PACK",
                         bundle_label_selector=[{"node-role": "model"}] * size)
    ray.get(pg.ready(), timeout=120)
    try:
        host = ray.remote(EngineHost).options(
            num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
        ).remote(str(model_dir), EngineConfig(**(CFG | cfg), tensor_parallel_size=size)
                 .model_dump())
        nodes = ray.get(host.run.remote(probe or _node_labels_of_ranks))
        out = ray.get(host.generate.remote(prompts, GREEDY), timeout=300)
        ray.kill(host)
        return out, nodes
    finally:
        remove_placement_group(pg)


def _node_labels_of_ranks(engine):
    peers = engine.runner.peers.actors if engine.runner.peers else []
    return [ray.get_runtime_context().get_node_labels()] + ray.get(
        [p.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_labels())
         for p in peers])


def test_tp2_equals_tp1_token_for_token(ray_cluster, model_dir, prompts):
    expected = LLMEngine(str(model_dir), EngineConfig(**CFG)).generate(prompts, GREEDY)
    out, labels = run_tp(model_dir, prompts, 2)
    assert out == expected
    assert len(labels) == 2 and all(lab.get("node-role") == "model" for lab in labels)


def _kv_scales_of_ranks(engine):
    peers = engine.runner.peers.actors if engine.runner.peers else []
    return [engine.runner.kv_scales] + ray.get(
        [p.__ray_call__.remote(lambda self: self.runner.kv_scales) for p in peers])


def test_tp2_fp8_kv_cache_calibrates_each_ranks_heads_as_tp1(ray_cluster, model_dir, prompts):
    """Every rank runs the calibration forward (its all-reduces meet the other's) and keeps
    its own KV heads' scales: together TP=1's, and the same greedy tokens."""
    one = LLMEngine(str(model_dir), EngineConfig(**CFG, kv_cache_dtype="fp8"))
    out, ranks = run_tp(model_dir, prompts, 2, probe=_kv_scales_of_ranks, kv_cache_dtype="fp8")
    assert out == one.generate(prompts, GREEDY)
    for layer, want in enumerate(one.runner.kv_scales):  # 4 KV heads: 2 per rank
        assert torch.equal(torch.cat([r[layer] for r in ranks], dim=1), want)


def test_tp_needs_a_placement_group(model_dir):
    with pytest.raises(RuntimeError, match="placement group"):
        LLMEngine(str(model_dir), EngineConfig(**CFG, tensor_parallel_size=2))


def test_tp2_serve_replica_answers_like_tp1_and_is_replaced_when_a_peer_dies(app_url,
                                                                            app_config):
    """A TP=2 model replica as Serve deploys it (placement group bundles, rank 0 in the
    replica) serves the same greedy text over HTTP as the TP=1 replicas of the main app.
    When its peer rank's process dies, the replica fails its health check, Serve replaces
    it (a new rank 0 and a new peer), and new requests get the same text again."""
    import os
    import signal
    import time

    import httpx
    from ray import serve
    from ray.util.state import list_actors

    from deployments.app import build
    from tests.helpers import replica_actors

    _, cfg = app_config
    tp_cfg = cfg.model_copy(deep=True)
    tp_cfg.engine.tensor_parallel_size = 2
    tp_cfg.model_pool.num_replicas, tp_cfg.model_pool.num_gpus = 1, 0
    serve.run(build(tp_cfg), name="tp", route_prefix="/tp")
    try:
        body = {"model": "tandem-tiny", "prompt": "split across ranks", "max_tokens": 16,
                "temperature": 0.0, "ignore_eos": True}
        one = httpx.post(f"{app_url}/v1/completions", json=body, timeout=120).json()
        two = httpx.post(f"{app_url}/tp/v1/completions", json=body, timeout=120).json()
        assert two["choices"][0]["text"] == one["choices"][0]["text"]
        assert two["usage"] == one["usage"]
        (replica,) = replica_actors("ModelReplica", "tp")
        (peer,) = list_actors(address=ray.get_runtime_context().gcs_address, detail=True,
                              filters=[("class_name", "=", "TPWorker"), ("state", "=", "ALIVE")])
        os.kill(peer.pid, signal.SIGKILL)
        deadline = time.monotonic() + 120
        while True:
            now = replica_actors("ModelReplica", "tp")
            if len(now) == 1 and now[0].actor_id != replica.actor_id:
                break
            assert time.monotonic() < deadline, "the replica with a dead peer was not replaced"
            time.sleep(1)
        while True:  # the new replica answers once its own peer has joined
            r = httpx.post(f"{app_url}/tp/v1/completions", json=body, timeout=120)
            if r.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == one["choices"][0]["text"]
    finally:
        serve.delete("tp")


def _kill_peer(engine):
    ray.kill(engine.runner.peers.actors[0])
    return True


def test_dead_peer_fails_the_replica_without_hanging(ray_cluster, model_dir, prompts):
    pg = placement_group([{"CPU": 1}] * 2, strategy="STRICT_PACK",
                         bundle_label_selector=[{"node-role": "model"}] * 2)
    ray.get(pg.ready(), timeout=120)
    try:
        host = ray.remote(EngineHost).options(
            num_cpus=1, scheduling_strategy=PlacementGroupSchedulingStrategy(
                pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
        ).remote(str(model_dir), EngineConfig(**CFG, tensor_parallel_size=2).model_dump())
        assert ray.get(host.run.remote(_kill_peer))
        with pytest.raises(ray.exceptions.RayTaskError):
            ray.get(host.generate.remote(prompts, GREEDY), timeout=60)
        ray.kill(host)
    finally:
        remove_placement_group(pg)
