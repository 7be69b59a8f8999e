"""Locust load for a tandem endpoint: streaming chat completions, TTFT as its own metric.

    pip install locust
    locust -f infra/locust/locustfile.py --host http://127.0.0.1:8000 \\
        --users 64 --spawn-rate 8 --run-time 2m --headless

Environment: TANDEM_MODEL (default tandem-tiny), TANDEM_API_KEY, TANDEM_MAX_TOKENS (64).
Locust's own row times a streamed request only to its response headers (checked with Locust
2.47), so the whole stream has its own "E2E" row; "TTFT" times the first content chunk and
"ITL" the mean gap between content chunks of a request.
"""

from __future__ import annotations

import json
import os
import random
import time

from locust import HttpUser, between, task

MODEL = os.environ.get("TANDEM_MODEL", "tandem-tiny")
MAX_TOKENS = int(os.environ.get("TANDEM_MAX_TOKENS", "64"))
KEY = os.environ.get("TANDEM_API_KEY")
TOPICS = ["the cluster", "paged attention", "a Kunpeng node", "continuous batching",
          "prefix caching", "tensor parallelism", "autoscaling", "the router"]


class ChatUser(HttpUser):
    wait_time = between(0.1, 0.5)

    @task
    def stream_chat(self) -> None:
        body = {"model": MODEL, "stream": True, "max_tokens": MAX_TOKENS,
                "messages": [{"role": "user",
                              "content": f"Explain {random.choice(TOPICS)} briefly."}]}
        headers = {"Authorization": f"Bearer {KEY}"} if KEY else {}
        start = time.perf_counter()
        stamps: list[float] = []
        with self.client.post("/v1/chat/completions", json=body, headers=headers, stream=True,
                              catch_response=True, name="chat (stream)") as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")
                return
            for line in resp.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    resp.failure(event["error"].get("message", "error event"))
                    return
                delta = event["choices"][0].get("delta", {}) if event.get("choices") else {}
                if delta.get("content"):
                    stamps.append(time.perf_counter())
            resp.success()
        self._report("E2E", (time.perf_counter() - start) * 1000)
        if stamps:
            self._report("TTFT", (stamps[0] - start) * 1000)
        if len(stamps) > 1:
            self._report("ITL", (stamps[-1] - stamps[0]) / (len(stamps) - 1) * 1000)

    def _report(self, kind: str, ms: float) -> None:
        self.environment.events.request.fire(request_type=kind, name="chat", response_time=ms,
                                             response_length=0, exception=None, context={})
