"""Prometheus metrics served by the ingress at GET /metrics.

Request series carry `version` (stable, or canary during a rollout) so that the rollout judge
(cluster/rollout_judge.py) can compare the two from the same text.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from cluster.rollout import STABLE

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
                 1, 2.5)


class IngressMetrics:
    """`model`: the label of requests refused before their model is known (the first one
    served); the others carry the model they asked for."""

    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        self.model = model
        self.requests = Counter("tandem_http_requests", "HTTP requests by endpoint and status",
                                ["model", "version", "endpoint", "status"],
                                registry=self.registry)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens of served requests",
                                     ["model"], registry=self.registry)
        self.generation_tokens = Counter("tandem_generation_tokens",
                                         "Tokens generated for clients", ["model"],
                                         registry=self.registry)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "Time to first token",
                              ["model", "version"], buckets=LATENCY_BUCKETS,
                              registry=self.registry)
        # per request, its mean gap between tokens after the first, as the client saw them
        self.itl = Histogram("tandem_inter_token_latency_seconds", "Mean time between a "
                             "request's output tokens", ["model", "version"],
                             buckets=TOKEN_BUCKETS, registry=self.registry)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "Request latency",
                             ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.hybrid = Counter("tandem_hybrid_decisions", "Hybrid routing decisions: the pool "
                              "chosen and why", ["model", "pool", "reason"],
                              registry=self.registry)

    def request(self, endpoint: str, status: int, model: str | None = None,
                version: str = STABLE) -> None:
        self.requests.labels(model or self.model, version, endpoint, str(status)).inc()

    def routed(self, model: str, pool: str, reason: str) -> None:
        self.hybrid.labels(model, pool, reason).inc()

    def finished(self, model: str, prompt_tokens: int, completion_tokens: int,
                 ttft_s: float | None, e2e_s: float, version: str = STABLE) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(model, version).observe(ttft_s)
            if completion_tokens > 1:
                self.itl.labels(model, version).observe(
                    max(0.0, e2e_s - ttft_s) / (completion_tokens - 1))
        self.e2e.labels(model).observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
