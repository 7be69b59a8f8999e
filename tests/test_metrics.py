"""A real Prometheus server scrapes the session cluster's Ray metrics endpoints under a short
load; the series exist through its HTTP API with values that match what the client saw."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import ray
import yaml

from cluster.config import KVPoolConfig
from tests.conftest import free_port
from tests.skips import skip_or_fail

INFRA = Path(__file__).parent.parent / "infra" / "prometheus"
MODEL = "tandem-metrics"  # its own app and model label: series start from zero


def ensure_prometheus() -> str:
    if shutil.which("prometheus") is None:
        subprocess.run(["apt-get", "install", "-y", "-q", "prometheus"], check=False,
                       capture_output=True, timeout=600)
    path = shutil.which("prometheus")
    if path is None:
        skip_or_fail("the Debian package prometheus could not be installed here")
    return path


@pytest.fixture(scope="module")
def prometheus(ray_cluster, app_url, tmp_path_factory):
    binary = ensure_prometheus()
    work = tmp_path_factory.mktemp("prom")
    targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}"
               for n in ray.nodes() if n["Alive"]]
    # the shipped config, with this cluster's endpoints in place of the file-SD path (two
    # clusters on one machine share that file)
    cfg = yaml.safe_load((INFRA / "prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = "1s"
    cfg["rule_files"] = [str(INFRA / "alerts.yml")]
    cfg["scrape_configs"] = [{"job_name": "ray", "static_configs": [{"targets": targets}]}]
    (work / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={work / 'prometheus.yml'}",
                             f"--storage.tsdb.path={work / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.3)
    yield url
    proc.terminate()
    proc.wait(timeout=20)


def query(url: str, expr: str) -> float | None:
    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=10).json()
    result = r["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def test_alert_rules_are_valid():
    promtool = shutil.which("promtool")
    if promtool is None:
        ensure_prometheus()
        promtool = shutil.which("promtool")
    r = subprocess.run([promtool, "check", "rules", str(INFRA / "alerts.yml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture(scope="module")
def metrics_client(app_url, app_config):
    from openai import OpenAI
    from ray import serve

    from deployments.app import build

    _, cfg = app_config
    cfg = cfg.model_copy(deep=True)
    cfg.model.name = MODEL
    cfg.model_pool.num_replicas, cfg.model_pool.num_gpus = 2, 0
    serve.run(build(cfg), name="metrics", route_prefix="/metrics-app")
    yield OpenAI(base_url=f"{app_url}/metrics-app/v1", api_key="unused", max_retries=0)
    serve.delete("metrics")


def test_stage_series_under_load(prometheus, metrics_client):
    client = metrics_client

    def total(name: str) -> float:
        return query(prometheus, f'sum({name}{{model="{MODEL}"}})') or 0.0

    gen_before = total("ray_tandem_generation_tokens_total")
    tok_before = total("ray_tandem_tokenizer_requests_total")
    assert gen_before == tok_before == 0
    received = 0
    for i in range(8):
        r = client.completions.create(model=MODEL, prompt=f"metrics {i}", max_tokens=10,
                                      extra_body={"ignore_eos": True})
        received += r.usage.completion_tokens
    deadline = time.monotonic() + 90  # Ray's agent exports every ~10 s
    while time.monotonic() < deadline:
        gen = total("ray_tandem_generation_tokens_total") - gen_before
        if gen >= received and total("ray_tandem_tokenizer_requests_total") - tok_before >= 8:
            break
        time.sleep(2)
    assert gen == received
    assert total("ray_tandem_tokenizer_requests_total") - tok_before == 8
    kv = f'count(ray_tandem_kv_cache_usage_perc{{model="{MODEL}"}})'
    assert query(prometheus, kv) == 2  # one series per replica
    ttft = f'sum(ray_tandem_time_to_first_token_seconds_count{{model="{MODEL}"}})'
    assert query(prometheus, ttft) == 8
    assert query(prometheus, "sum(ray_tandem_router_decisions_total)") >= 8

    def count(name: str) -> float:
        return query(prometheus, f'sum(ray_tandem_{name}_count{{model="{MODEL}"}})') or 0.0

    # one observation per request: queue and prefill at its first token, decode at its end
    for name in ("request_queue_time_seconds", "request_prefill_time_seconds",
                 "request_decode_time_seconds"):
        assert count(name) == 8, name
    # every token after a request's first arrives with an inter-token gap, alone or in a group
    assert 8 <= count("inter_token_latency_seconds") <= received - 8
    # ten decode steps a request: the engine saw steps follow steps with work waiting, and
    # the gaps between them are measured (the host's time between steps), never a constant
    assert count("gpu_idle_gap_seconds") > 0
    gap_sum = query(prometheus, f'sum(ray_tandem_gpu_idle_gap_seconds_sum{{model="{MODEL}"}})')
    assert gap_sum and gap_sum > 0
    p50 = query(prometheus, "histogram_quantile(0.5, sum by (le) "
                            f'(ray_tandem_inter_token_latency_seconds_bucket{{model="{MODEL}"}}))')
    assert 0 < p50 < 2.5
    roles = httpx.get(f"{prometheus}/api/v1/label/node_role/values", timeout=10).json()
    assert "model" in roles["data"]


def test_serving_benchmark_with_client_processes_and_node_metrics(app_url, tmp_path):
    """The serving benchmark end to end: two client processes share the requests, and the
    utilization comes straight from Ray's node endpoints (no Prometheus server)."""
    from cluster.bench.serve import main

    targets = tmp_path / "targets.json"
    targets.write_text(json.dumps([{"labels": {"job": "ray"}, "targets": [
        f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes()
        if n["Alive"]]}]))
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["--url", app_url, "--num-requests", "12", "--concurrency", "4",
                   "--workers", "2", "--input-len", "8", "16", "--output-len", "4", "8",
                   "--ray-metrics", str(targets), "--json"])
    res = json.loads(buf.getvalue())
    assert rc == 0 and res["requests"] == 12 and res["errors"] == 0, res
    assert res["output_tok_s"] > 0 and res["ttft_ms"]["p99"] >= res["ttft_ms"]["p50"] > 0
    assert 0 < res["utilization"]["cpu_util_perc"]["mean"] <= 100
    # the engine's own histograms over the run, beside the client's view: every request of
    # the run reached an engine, and its TTFT there is within what the client saw
    engine = res["engine"]["engine_ttft_ms"]
    assert engine["count"] >= 12
    assert engine["p50_le"] is not None and engine["p99_le"] >= engine["p50_le"]
    assert res["engine"]["engine_queue_ms"]["count"] >= 12
    assert res["engine"]["engine_itl_ms"]["count"] > 0  # 4-8 tokens each: gaps were seen
    assert res["client"]["processes"] == 2 and res["client"]["library"].startswith("aiohttp")


def test_engine_histogram_quantiles_are_the_bounds_of_their_buckets():
    """What the serving benchmark reports of the engine's histograms: only the observations
    between two readings count, and a quantile is the upper bound of its bucket."""
    from cluster.bench.serve import bucket_quantiles

    inf = float("inf")
    before = {0.05: 2, 0.1: 2, 1.0: 3, inf: 3}
    # 100 new: 50 under 50 ms, 40 in (50, 100] ms, 9 in (0.1, 1] s, 1 above
    after = {0.05: 52, 0.1: 92, 1.0: 102, inf: 103}
    assert bucket_quantiles(before, after) == {"count": 100, "p50_le": 50.0, "p90_le": 100.0,
                                               "p99_le": 1000.0}
    assert bucket_quantiles(after, after)["p50_le"] is None  # nothing new: no quantile


def test_ttft_after_the_first_wave_leaves_out_the_synchronized_start():
    """A closed loop starts its first `concurrency` requests at once: the steady-state
    TTFT counts only requests sent after all of those had their first token."""
    from cluster.bench.serve import after_first_wave

    def r(start, ttft):
        return {"start": start, "ttft": ttft, "e2e": (ttft or 0) + 1.0}

    # two clients: the first wave's tokens come at 0.9 and 1.5 s
    ok = [r(10.0, 0.9), r(10.0, 1.5), r(11.0, 0.2), r(11.6, 0.1), r(12.0, 0.3),
          r(11.4, None)]
    later, wave_s = after_first_wave(ok, concurrency=2)
    assert wave_s == pytest.approx(1.5) and sorted(later) == [0.1, 0.3]
    assert after_first_wave([], 2) == ([], None)


TIER_MODEL = "tandem-tiers"
KV_BLOCK = 16 * 2 * 4 * 4 * 32 * 4  # a block of the default model: 16 tokens, fp32 K and V


def test_kv_tier_series_match_what_the_tiers_served(prometheus, app_url, app_config):
    """An app whose engine caches 24 blocks, its host tier 12 more, the pool the rest: six
    150-token prompts, then the same in reverse order (the latest evicted come back from
    host memory, the first ones from the pool's stores on the Kunpeng nodes). The tiers'
    series in Prometheus count what the engine restored, within what the client was told
    was cached, and the dashboard's KV tier panels show them."""
    import random

    from openai import OpenAI
    from ray import serve

    from deployments.app import build

    _, cfg = app_config
    cfg = cfg.model_copy(deep=True)
    cfg.model.name = TIER_MODEL
    cfg.model_pool.num_replicas, cfg.model_pool.num_gpus = 1, 0
    cfg.engine = cfg.engine.model_copy(update=dict(
        max_model_len=256, num_kv_blocks=24, block_size=16, max_num_batched_tokens=64,
        kv_host_tier_bytes=12 * KV_BLOCK))
    cfg.kv_pool = KVPoolConfig(capacity_bytes=16 << 20)
    serve.run(build(cfg), name="metrics-tiers", route_prefix="/metrics-tiers")
    try:
        client = OpenAI(base_url=f"{app_url}/metrics-tiers/v1", api_key="unused",
                        max_retries=0)
        prompts = [[random.Random(i).randrange(3, 4000) for _ in range(150)]
                   for i in range(6)]
        cached = 0
        for p in prompts + prompts[::-1]:
            r = client.completions.create(model=TIER_MODEL, prompt=p, max_tokens=8,
                                          temperature=0, extra_body={"ignore_eos": True})
            cached += r.usage.prompt_tokens_details.cached_tokens
        m = f'model="{TIER_MODEL}"'

        def hits(tier: str) -> float:
            return query(prometheus, f'sum(ray_tandem_kv_tier_hits_total{{{m},tier="{tier}"}})'
                         ) or 0.0

        def stores(name: str) -> float:  # exported by the Kunpeng nodes' agents
            return query(prometheus, f"sum(ray_tandem_kv_pool_{name})") or 0.0

        deadline = time.monotonic() + 90  # Ray's agents export every ~10 s, each on its own
        while time.monotonic() < deadline and not (
                hits("host") and hits("pool") and stores("blocks") >= 12
                and stores("hits_total") >= hits("pool")):
            time.sleep(2)
        host, pool = hits("host"), hits("pool")
        assert host > 0 and pool > 0
        assert 16 * (host + pool) <= cached  # restored blocks are cached prompt tokens
        fetched = query(prometheus, f"sum(ray_tandem_kv_pool_fetched_bytes_total{{{m}}})")
        assert fetched >= pool * KV_BLOCK  # every restored pool block came in a fetch
        fetches = query(prometheus,
                        f'sum(ray_tandem_kv_tier_decisions_total{{{m},decision="fetch"}})')
        assert fetches >= 1
        assert query(prometheus, f"sum(ray_tandem_kv_host_tier_blocks{{{m}}})") == 12
        assert query(prometheus, f"sum(ray_tandem_kv_host_tier_bytes{{{m}}})") == 12 * KV_BLOCK
        assert query(prometheus, f"sum(ray_tandem_kv_pool_fetch_bandwidth_bytes{{{m}}})") > 0
        assert query(prometheus, f"sum(ray_tandem_kv_tier_prefill_tokens_per_second{{{m}}})") > 0
        # the stores' own series: they hold what was spilled and served what was restored
        assert stores("blocks") >= 12 and stores("bytes") >= 12 * KV_BLOCK
        assert stores("hits_total") >= pool
        # the dashboard's KV tier panels read these series (no fault happened: that one is
        # empty)
        dash = json.loads((INFRA.parent / "grafana" / "tandem.json").read_text())
        in_row, exprs = False, []
        for panel in dash["panels"]:
            if panel["type"] == "row":
                in_row = panel["title"].startswith("KV tiers")
            elif in_row and "faults" not in panel["title"]:
                exprs += [t["expr"] for t in panel["targets"]]
        assert len(exprs) == 6
        deadline = time.monotonic() + 30  # a rate needs two samples of its series
        for expr in exprs:
            while query(prometheus, expr) is None and time.monotonic() < deadline:
                time.sleep(1)
            assert query(prometheus, expr) is not None, expr
    finally:
        serve.delete("metrics-tiers")
