"""Autoscaling for real: a load ramp on the local multi-node cluster scales both pools up and
back down (deployments/autoscaling/ramp.yaml, deployed beside the main app), and no request
fails while replicas come and go."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

import pytest
from ray import serve

from cluster import local_cluster
from cluster.bench.autoscale import RAMP, run_ramp, summary
from cluster.config import load_serve_config

pytestmark = pytest.mark.timeout(400)


def test_load_ramp_scales_both_pools_up_and_down_without_errors(app_url):
    doc, cfg = load_serve_config(Path(RAMP))
    doc["applications"][0].update(name="scaling", route_prefix="/scaling")
    port = urlparse(app_url).port
    url = local_cluster.deploy(doc, cfg, http_port=port) + "/scaling"
    low = {"model": cfg.model_pool.autoscaling.min_replicas,
           "frontend": cfg.frontend_pool.autoscaling.min_replicas}
    try:
        ramp = run_ramp(url, "scaling", low, high_concurrency=16, up_max_s=90, down_max_s=120)
    finally:
        serve.delete("scaling")
    res = summary(ramp)
    assert res["requests_failed"] == 0, res["error_samples"]
    assert res["requests_total"] > 50
    assert res["model"]["max_replicas"] >= low["model"] + 2, res
    assert res["frontend"]["max_replicas"] > low["frontend"], res
    last = ramp.samples[-1].replicas
    assert last == low, f"not back at the minimum when the load stopped: {last}"
    assert res["scale_up_s"] is not None and res["scale_down_s"] is not None
