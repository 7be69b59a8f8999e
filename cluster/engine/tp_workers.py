"""A model replica spanning GPUs: rank 0 is the engine's own process; ranks 1..N-1 are Ray
actors in the same placement group (STRICT_PACK, one GPU per bundle), all in one
torch.distributed group. Rank 0 schedules and samples; each step it sends the host-side
step inputs to the peers (Ray actor calls run in submission order) and runs its own shard;
the collectives inside the forward pass keep the ranks in lockstep.
"""

from __future__ import annotations

import datetime
import os
import socket

import ray
import torch
import torch.distributed as dist
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.engine.parallel import TP

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=int(os.environ.get("TANDEM_TP_TIMEOUT_S", 120)))


def init_group(init_method: str, rank: int, size: int, device: torch.device) -> TP:
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=size,
                            timeout=COLLECTIVE_TIMEOUT)
    # step inputs travel on a CPU (gloo) group: a broadcast costs ~0.1 ms where a Ray actor
    # call per step costs milliseconds, which would cancel TP's gain on a decode step
    # (no timeout there: a peer waits as long as rank 0 idles; if rank 0 dies, Ray ends the
    # peers it owns)
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))
    return TP(rank, size, dist.group.WORLD, control)


class TPWorker:
    """Rank r >= 1: loads its shard, then runs whatever rank 0 sends, in order."""

    def __init__(self, model_dir: str, cfg: dict, rank: int, size: int, init_method: str,
                 weights=None):
        from cluster.config import EngineConfig
        from cluster.engine.engine import build_runner

        self.runner = build_runner(model_dir, EngineConfig.model_validate(cfg), weights,
                                   lambda dev: init_group(init_method, rank, size, dev))

    def ready(self) -> bool:
        return True

    def serve(self) -> None:
        """Runs rank 0's commands until told to stop (or the group breaks)."""
        control = self.runner.tp.control
        while True:
            msg = [None]
            dist.broadcast_object_list(msg, src=0, group=control)
            method, args = msg[0]
            if method == "stop":
                return
            getattr(self.runner, method)(*args)


class Peers:
    """Rank 0's handles on ranks 1..N-1."""

    def __init__(self, actors: list):
        self.actors = actors
        self.pending: list = []

    @classmethod
    def launch(cls, model_dir: str, cfg, weights, size: int, use_gpu: bool):
        pg = get_current_placement_group()
        if pg is None or pg.bundle_count < size:
            raise RuntimeError(f"tensor_parallel_size={size} needs this process to run in a "
                               f"placement group of {size} bundles (one per rank)")
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        init_method = f"tcp://{ray.util.get_node_ip_address()}:{port}"
        remote = ray.remote(TPWorker)
        actors = []
        for r in range(1, size):
            where = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r)
            actors.append(remote.options(
                num_cpus=0, num_gpus=1 if use_gpu else 0, max_restarts=0,
                max_concurrency=2,  # the command loop holds one thread; calls get the other
                scheduling_strategy=where,
            ).remote(model_dir, cfg.model_dump(), r, size, init_method, weights))
        return cls(actors), init_method

    def start(self, control) -> None:
        """Once every rank has joined: peers enter their command loops."""
        ray.get([a.ready.remote() for a in self.actors])
        self.control = control
        self.loops = [a.serve.remote() for a in self.actors]

    def alive(self) -> bool:
        """Whether every peer's command loop still runs (it returns only when it failed)."""
        done, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        return not done

    def submit(self, method: str, *args) -> None:
        """Broadcasts a command; rank 0 then runs its own part, peers run theirs."""
        done, _ = ray.wait(self.loops, num_returns=len(self.loops), timeout=0)
        if done:  # a loop only returns when its peer failed: fail, don't hang on a collective
            ray.get(done)
            raise RuntimeError("a tensor-parallel peer stopped")
        dist.broadcast_object_list([(method, args)], src=0, group=self.control)


class EngineHost:
    """A whole engine in one Ray actor: what a Serve model replica is, for tests and the
    benchmark (started in bundle 0 of a placement group when tensor parallel)."""

    def __init__(self, model_dir: str, cfg: dict, weights=None):
        from cluster.config import EngineConfig
        from cluster.engine.engine import LLMEngine

        self.engine = LLMEngine(model_dir, EngineConfig.model_validate(cfg), weights=weights)

    def generate(self, prompts, params):
        return self.engine.generate(prompts, params)

    def run(self, fn, *args):
        """Runs fn(engine, *args) here (the benchmark's measurement loop)."""
        return fn(self.engine, *args)
