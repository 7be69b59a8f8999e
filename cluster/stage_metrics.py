"""Prometheus metrics of the stages, exported through Ray's per-node metrics agent.

Names follow vLLM's (`vllm:` becomes `tandem_`; Ray adds its `ray_` prefix on export) so that
dashboards written for vLLM carry over. Labels are bounded: model, replica, node, node_role
(never a request id).
"""

from __future__ import annotations

import random

import ray
from ray.util import metrics

from cluster.engine.step_clock import CUDA_EVERY

LATENCY_BUCKETS = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]
TOKEN_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                 1, 2.5]
GAP_BUCKETS = [0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1]
TAGS = ("model", "replica", "node", "node_role")
# inter-token gaps observed per core report (two a second) at most: see token_gaps
ITL_OBSERVATIONS_MAX = 2000


def base_tags(model: str, replica: str) -> dict[str, str]:
    ctx = ray.get_runtime_context()
    return {"model": model, "replica": replica, "node": ctx.get_node_id()[:12],
            "node_role": ctx.get_node_labels().get("node-role", "")}


class EngineMetrics:
    def __init__(self, tags: dict[str, str]):
        self.tags = tags
        g, c, h = metrics.Gauge, metrics.Counter, metrics.Histogram
        self.running = g("tandem_num_requests_running", "Requests in the batch", TAGS)
        self.waiting = g("tandem_num_requests_waiting", "Requests queued", TAGS)
        self.kv_usage = g("tandem_kv_cache_usage_perc", "KV cache blocks in use (0-1)", TAGS)
        self.prefix_queries = c("tandem_prefix_cache_queries", "Prompt blocks looked up", TAGS)
        self.prefix_hits = c("tandem_prefix_cache_hits", "Prompt blocks found cached", TAGS)
        self.prompt_tokens = c("tandem_prompt_tokens", "Prompt tokens prefilled", TAGS)
        self.generation_tokens = c("tandem_generation_tokens", "Tokens generated", TAGS)
        self.finished = c("tandem_request_success", "Finished requests by reason",
                          (*TAGS, "finished_reason"))
        self.ttft = h("tandem_time_to_first_token_seconds", "Time to first token",
                      LATENCY_BUCKETS, TAGS)
        self.e2e = h("tandem_e2e_request_latency_seconds", "Request latency in the engine",
                     LATENCY_BUCKETS, TAGS)
        self.itl = h("tandem_inter_token_latency_seconds", "Time between output tokens "
                     f"(above {ITL_OBSERVATIONS_MAX:,} outputs per core report, two a second, "
                     "a proportional sample: the count is not the output count)",
                     TOKEN_BUCKETS, TAGS)
        self.queue = h("tandem_request_queue_time_seconds", "Time waiting to be scheduled",
                       LATENCY_BUCKETS, TAGS)
        self.prefill = h("tandem_request_prefill_time_seconds", "First schedule to first token",
                         LATENCY_BUCKETS, TAGS)
        self.decode = h("tandem_request_decode_time_seconds", "First token to the last",
                        LATENCY_BUCKETS, TAGS)
        self.moved = c("tandem_requests_moved", "Queued requests a hot replica handed back "
                       "to be routed to a cooler one", TAGS)
        self.idle_gap = h("tandem_gpu_idle_gap_seconds", "Host time between engine steps with "
                          "work waiting (the device idles through it); on a GPU one gap in "
                          f"{CUDA_EVERY} is measured", GAP_BUCKETS, TAGS)
        self.last = {"prefix_queries": 0, "prefix_hits": 0}
        self.gpu = _nvml_handle()
        if self.gpu is not None:
            self.gpu_util = g("tandem_gpu_utilization_perc", "GPU busy share (NVML)", TAGS)
            self.gpu_mem = g("tandem_gpu_memory_used_bytes", "GPU memory in use (NVML)", TAGS)
            self.gpu_power = g("tandem_gpu_power_watts", "GPU power draw (NVML)", TAGS)

    def sample(self, stats, idle_gaps) -> None:
        """Gauges and cache counters from one EngineStats reading (called once a second), and
        the idle gaps between steps since the last call (drained from the engine's deque)."""
        t = self.tags
        while idle_gaps:
            self.idle_gap.observe(idle_gaps.popleft(), t)
        self.running.set(stats.running, t)
        self.waiting.set(stats.waiting, t)
        self.kv_usage.set(stats.kv_usage, t)
        for name, counter in (("prefix_queries", self.prefix_queries),
                              ("prefix_hits", self.prefix_hits)):
            value = getattr(stats, name)
            if value > self.last[name]:
                counter.inc(value - self.last[name], t)
            self.last[name] = value
        gpu = self.gpu_reading()
        if gpu:
            self.gpu_util.set(gpu["gpu_util_perc"], t)
            self.gpu_mem.set(gpu["gpu_mem_used"], t)
            self.gpu_power.set(gpu["gpu_power_w"], t)

    def kv_tier(self, s: dict) -> None:
        """The KV tiers' figures from one core report (kv_tier.KVTier.stats); their series
        exist only on replicas with tiers."""
        t = self.tags
        if not hasattr(self, "kv_hits"):
            g, c = metrics.Gauge, metrics.Counter
            self.kv_hits = c("tandem_kv_tier_hits", "Prompt blocks copied back from a KV "
                             "tier instead of computed", (*TAGS, "tier"))
            self.kv_decisions = c("tandem_kv_tier_decisions", "Requests whose missing "
                                  "blocks were fetched from the KV pool or computed",
                                  (*TAGS, "decision"))
            self.kv_host_bytes = g("tandem_kv_host_tier_bytes", "Bytes held by the host "
                                   "KV tier", TAGS)
            self.kv_host_blocks = g("tandem_kv_host_tier_blocks", "Blocks held by the host "
                                    "KV tier", TAGS)
            self.kv_fetch_bw = g("tandem_kv_pool_fetch_bandwidth_bytes", "KV pool fetch "
                                 "bandwidth, fitted over recent fetches (B/s)", TAGS)
            self.kv_prefill = g("tandem_kv_tier_prefill_tokens_per_second", "The engine's "
                                "prefill speed the fetch-or-recompute rule uses", TAGS)
            self.kv_fetched = c("tandem_kv_pool_fetched_bytes", "Block bytes fetched from "
                                "the KV pool", TAGS)
            self.kv_transfer = c("tandem_kv_pool_transfer_engine_blocks", "Blocks of the KV "
                                 "pool that its stores wrote by the transfer engine (the "
                                 "rest came by Ray)", TAGS)
            self.kv_faults = c("tandem_kv_tier_faults", "KV tier trouble read as a miss or "
                               "a skipped spill: torn answers, failed pool calls, spills "
                               "the link could not take, pushed blocks whose seal did not "
                               "land", (*TAGS, "kind"))
        for name, counter, label in (("host_hits", self.kv_hits, {"tier": "host"}),
                                     ("pool_hits", self.kv_hits, {"tier": "pool"}),
                                     ("fetch_decisions", self.kv_decisions,
                                      {"decision": "fetch"}),
                                     ("recompute_decisions", self.kv_decisions,
                                      {"decision": "recompute"}),
                                     ("fetched_bytes", self.kv_fetched, {}),
                                     ("transfer_blocks", self.kv_transfer, {}),
                                     ("torn", self.kv_faults, {"kind": "torn"}),
                                     ("pool_errors", self.kv_faults, {"kind": "pool_error"}),
                                     ("spills_dropped", self.kv_faults,
                                      {"kind": "spill_dropped"}),
                                     ("unsealed", self.kv_faults, {"kind": "unsealed"})):
            value, last = s.get(name, 0), self.last.get(name, 0)
            if value > last:
                counter.inc(value - last, {**t, **label})
            self.last[name] = value
        self.kv_host_bytes.set(s.get("host_bytes", 0), t)
        self.kv_host_blocks.set(s.get("host_blocks", 0), t)
        self.kv_fetch_bw.set(s.get("fetch_bw_bytes_s", 0.0), t)
        self.kv_prefill.set(s.get("prefill_tok_s", 0.0), t)

    def gpu_reading(self) -> dict[str, float]:
        """NVML's view of this replica's GPU now; empty without one."""
        if self.gpu is None:
            return {}
        import pynvml

        mem = pynvml.nvmlDeviceGetMemoryInfo(self.gpu)
        return {"gpu_util_perc": float(pynvml.nvmlDeviceGetUtilizationRates(self.gpu).gpu),
                "gpu_mem_used": float(mem.used), "gpu_mem_total": float(mem.total),
                "gpu_power_w": pynvml.nvmlDeviceGetPowerUsage(self.gpu) / 1000.0}

    def moved_away(self) -> None:
        self.moved.inc(1, self.tags)

    def first_token(self, queue_s: float, prefill_s: float) -> None:
        self.queue.observe(queue_s, self.tags)
        self.prefill.observe(prefill_s, self.tags)

    def token_gaps(self, gaps: list, cap: int = ITL_OBSERVATIONS_MAX) -> None:
        """[gap, rows] pairs from a core report: `rows` outputs whose tokens came `gap` s
        (per token) after the stream's previous ones. Above `cap` rows a report is sampled
        in proportion (each count scaled, rounded at random), which keeps the histogram's
        shape and bounds the observe calls."""
        total = sum(n for _, n in gaps)
        scale = min(1.0, cap / total) if total else 1.0
        for gap, n in gaps:
            k = n * scale
            for _ in range(int(k) + (random.random() < k - int(k))):
                self.itl.observe(gap, self.tags)

    def request_done(self, prompt_tokens: int, output_tokens: int, reason: str,
                     ttft_s: float | None, e2e_s: float) -> None:
        t = self.tags
        if ttft_s is not None and output_tokens > 1:
            self.decode.observe(e2e_s - ttft_s, t)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens, t)
        if output_tokens:
            self.generation_tokens.inc(output_tokens, t)
        self.finished.inc(1, {**t, "finished_reason": reason})
        if ttft_s is not None:
            self.ttft.observe(ttft_s, t)
        self.e2e.observe(e2e_s, t)


def _nvml_handle():
    """The NVML handle of this replica's GPU, or None (no GPU, or nvidia-ml-py missing)."""
    import os

    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0] or "0"
    try:
        return pynvml.nvmlDeviceGetHandleByIndex(int(visible))
    except Exception:
        return None


class TokenizerMetrics:
    def __init__(self, tags: dict[str, str]):
        self.tags = tags
        self.requests = metrics.Counter("tandem_tokenizer_requests", "Requests tokenized", TAGS)
        self.tokens = metrics.Counter("tandem_tokenizer_tokens", "Prompt tokens produced", TAGS)
        self.latency = metrics.Histogram("tandem_tokenizer_latency_seconds",
                                         "Time to build and tokenize a prompt",
                                         LATENCY_BUCKETS, TAGS)

    def tokenized(self, n_tokens: int, seconds: float) -> None:
        self.requests.inc(1, self.tags)
        self.tokens.inc(n_tokens, self.tags)
        self.latency.observe(seconds, self.tags)
