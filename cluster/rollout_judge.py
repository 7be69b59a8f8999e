"""The canary's judgement: its error rate, TTFT p99 and ITL p99 against the stable version's,
from two metric snapshots. Pure; the snapshots come from the frontends' /metrics text
(`snapshot_from_text`, one per frontend, summed), cumulative, so a window is a difference.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from cluster.rollout import Judgement

TTFT = "tandem_time_to_first_token_seconds"
ITL = "tandem_inter_token_latency_seconds"
REQUESTS = "tandem_http_requests"


@dataclass(frozen=True)
class Histogram:
    """Cumulative bucket counts by upper bound (the last bound is +Inf), as exported."""

    bounds: tuple[float, ...] = ()
    counts: tuple[float, ...] = ()

    @property
    def count(self) -> float:
        return self.counts[-1] if self.counts else 0.0

    def quantile(self, q: float) -> float:
        """As PromQL's histogram_quantile: linear within the bucket the rank falls in; in the
        +Inf bucket, the highest finite bound."""
        rank = q * self.count
        lower, below = 0.0, 0.0
        for bound, cum in zip(self.bounds, self.counts, strict=True):
            if cum >= rank:
                if bound == float("inf"):
                    return lower
                inside = cum - below
                return lower + (bound - lower) * ((rank - below) / inside if inside else 1.0)
            lower, below = bound, cum
        return lower

    def _combine(self, other: Histogram, sign: float) -> Histogram:
        if not self.bounds:
            return other if sign > 0 else self
        if not other.bounds:
            return self
        if self.bounds != other.bounds:
            raise ValueError("histograms with different buckets")
        return Histogram(self.bounds, tuple(a + sign * b for a, b in
                                            zip(self.counts, other.counts, strict=True)))

    def __add__(self, other: Histogram) -> Histogram:
        return self._combine(other, 1.0)

    def __sub__(self, other: Histogram) -> Histogram:
        return self._combine(other, -1.0)


@dataclass(frozen=True)
class Snapshot:
    """One version's cumulative request metrics."""

    requests: float = 0.0
    errors: float = 0.0  # 5xx answers: a client's own mistakes (4xx) are not the version's
    ttft: Histogram = Histogram()
    itl: Histogram = Histogram()

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    def __add__(self, o: Snapshot) -> Snapshot:
        return Snapshot(self.requests + o.requests, self.errors + o.errors,
                        self.ttft + o.ttft, self.itl + o.itl)

    def __sub__(self, o: Snapshot) -> Snapshot:
        return Snapshot(self.requests - o.requests, self.errors - o.errors,
                        self.ttft - o.ttft, self.itl - o.itl)


@dataclass(frozen=True)
class Verdict:
    kind: str  # "pass", "fail" or "wait" (not enough samples yet)
    reason: str


def judge(stable: Snapshot, canary: Snapshot, j: Judgement) -> Verdict:
    """The error rate first (it needs only `min_requests` canary requests), then the p99s,
    each once both versions have `min_latency_samples` of it."""
    if canary.requests < j.min_requests:
        return Verdict("wait", f"{canary.requests:.0f} of {j.min_requests} canary requests")
    if canary.error_rate - stable.error_rate > j.max_error_rate_increase:
        return Verdict("fail", f"error rate {canary.error_rate:.3f} vs stable "
                       f"{stable.error_rate:.3f} (allowed +{j.max_error_rate_increase})")
    for name, c, s in (("TTFT", canary.ttft, stable.ttft), ("ITL", canary.itl, stable.itl)):
        if min(c.count, s.count) < j.min_latency_samples:
            return Verdict("wait", f"{name}: {min(c.count, s.count):.0f} of "
                           f"{j.min_latency_samples} samples")
        cp, sp = c.quantile(0.99), s.quantile(0.99)
        if cp > j.max_latency_ratio * (sp + j.latency_slack_s):
            return Verdict("fail", f"{name} p99 {cp:.3f}s vs stable {sp:.3f}s (allowed "
                           f"x{j.max_latency_ratio} of it + {j.latency_slack_s}s)")
    return Verdict("pass", "error rate, TTFT p99 and ITL p99 within bounds")


def snapshot_from_text(text: str, version: str, model: str | None = None) -> Snapshot:
    """One version's snapshot from a frontend's /metrics text (all models, or one)."""
    requests = errors = 0.0
    buckets: dict[str, dict[float, float]] = {TTFT: {}, ITL: {}}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = s.labels
            if labels.get("version") != version or model and labels.get("model") != model:
                continue
            if s.name == f"{REQUESTS}_total":
                requests += s.value
                errors += s.value if labels.get("status", "").startswith("5") else 0.0
            elif s.name.endswith("_bucket") and s.name[:-7] in buckets:
                le = float(labels["le"])
                hist = buckets[s.name[:-7]]
                hist[le] = hist.get(le, 0.0) + s.value
    return Snapshot(requests, errors, *(_histogram(buckets[n]) for n in (TTFT, ITL)))


def _histogram(by_bound: dict[float, float]) -> Histogram:
    bounds = tuple(sorted(by_bound))
    return Histogram(bounds, tuple(by_bound[b] for b in bounds))


def total(snapshots: Iterable[Snapshot]) -> Snapshot:
    """Several frontends' snapshots as one."""
    out = Snapshot()
    for s in snapshots:
        out = out + s
    return out
