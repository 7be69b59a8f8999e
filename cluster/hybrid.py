"""The hybrid policy: which of a model's two pools, GPU or CPU, takes a request.

The frontend decides after tokenizing (it knows the prompt and max_tokens then), from the
loads each pool's router holds (the replicas' own reports, plus this frontend's streams in
flight). Everything here is pure: loads in, a pool and a reason out.

    light:    the request costs less than `cpu_cost_max` FLOPs -> CPU
    overflow: the GPU pool's coolest replica is busier than `gpu_busy_max` -> CPU
    and in both cases only while the CPU pool's predicted TTFT stays within the request's
    SLO; otherwise -> GPU (reasons `light_over_slo`, `overflow_over_slo`), else `gpu`.
A pool without a live replica takes nothing while the other has one (`cpu_unavailable`,
`gpu_unavailable`): a CPU pool still pending placement never holds requests up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from cluster.config import CPU, GPU, HybridConfig
from cluster.load import ReplicaLoad

REASONS = ("light", "light_over_slo", "overflow", "overflow_over_slo", "gpu",
           "cpu_unavailable", "gpu_unavailable")


@dataclass(frozen=True)
class PoolState:
    busy: float  # utilization of the pool's coolest replica (0-1; above 1 while requests wait)
    ttft_s: float  # predicted TTFT of this request on the pool's fastest replica


def request_cost(prompt_tokens: int, max_tokens: int, flops_per_token: float) -> float:
    """FLOPs a request may take: every token it reads or writes through the whole model."""
    return (prompt_tokens + max_tokens) * flops_per_token


def utilization(load: ReplicaLoad) -> float:
    """The most pressing of KV use, batch fill (queued requests count: above 1) and the
    GPU's own busy share (NVML, where the replica has one)."""
    queued = max(load.running + load.waiting, load.in_flight)
    return max(load.kv_usage, queued / load.max_num_seqs, load.gpu_busy)


def predicted_ttft_s(load: ReplicaLoad, prompt_tokens: int, batch_tokens: int) -> float:
    """Seconds to this request's first token on a replica: the steps that prefill the
    prompts queued ahead and its own (chunked by the step's token budget), at the replica's
    recent step time (0 before its first step: an idle replica). A replica whose batch is
    full admits it only when some stream ends, which no report predicts: infinite, so it is
    never chosen against an SLO."""
    queued = max(load.running + load.waiting, load.in_flight)
    if queued >= load.max_num_seqs:
        return math.inf
    steps = 1 + (load.waiting_tokens + prompt_tokens) // batch_tokens
    return steps * load.step_s


def pool_state(loads: list[ReplicaLoad], prompt_tokens: int, batch_tokens: int
               ) -> PoolState | None:
    """A pool as the decision sees it; None without a live replica."""
    if not loads:
        return None
    return PoolState(min(map(utilization, loads)),
                     min(predicted_ttft_s(ld, prompt_tokens, batch_tokens) for ld in loads))


def decide(cost: float, slo_s: float, gpu: PoolState | None, cpu: PoolState | None,
           cfg: HybridConfig) -> tuple[str, str]:
    """(pool, reason) for one request of a model with both pools."""
    if cpu is None:
        return GPU, "cpu_unavailable"
    if gpu is None:
        return CPU, "gpu_unavailable"
    fits = cpu.ttft_s <= slo_s
    if cost < cfg.cpu_cost_max:
        return (CPU, "light") if fits else (GPU, "light_over_slo")
    if gpu.busy > cfg.gpu_busy_max:
        return (CPU, "overflow") if fits else (GPU, "overflow_over_slo")
    return GPU, "gpu"
