"""Prometheus metrics served by the ingress at GET /metrics."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class IngressMetrics:
    """`model`: the label of requests refused before their model is known (the first one
    served); the others carry the model they asked for."""

    def __init__(self, model: str):
        self.registry = CollectorRegistry()
        self.model = model
        self.requests = Counter("tandem_http_requests", "HTTP requests by endpoint and status",
                                ["model", "endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("tandem_prompt_tokens", "Prompt tokens of served requests",
                                     ["model"], registry=self.registry)
        self.generation_tokens = Counter("tandem_generation_tokens",
                                         "Tokens generated for clients", ["model"],
                                         registry=self.registry)
        self.ttft = Histogram("tandem_time_to_first_token_seconds", "Time to first token",
                              ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.e2e = Histogram("tandem_e2e_request_latency_seconds", "Request latency",
                             ["model"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.hybrid = Counter("tandem_hybrid_decisions", "Hybrid routing decisions: the pool "
                              "chosen and why", ["model", "pool", "reason"],
                              registry=self.registry)

    def request(self, endpoint: str, status: int, model: str | None = None) -> None:
        self.requests.labels(model or self.model, endpoint, str(status)).inc()

    def routed(self, model: str, pool: str, reason: str) -> None:
        self.hybrid.labels(model, pool, reason).inc()

    def finished(self, model: str, prompt_tokens: int, completion_tokens: int,
                 ttft_s: float | None, e2e_s: float) -> None:
        self.prompt_tokens.labels(model).inc(prompt_tokens)
        self.generation_tokens.labels(model).inc(completion_tokens)
        if ttft_s is not None:
            self.ttft.labels(model).observe(ttft_s)
        self.e2e.labels(model).observe(e2e_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
