"""`tandem up` applies the whole Serve config file as `serve deploy` does (Ray Serve's own
schema and controller), and refuses keys that Serve would silently ignore."""

from __future__ import annotations

import copy
import subprocess
import sys
from urllib.parse import urlparse

import httpx
import pytest
import yaml
from ray import serve

from cluster import local_cluster
from cluster.config import parse_app_config
from tests.conftest import TEST_CONFIG
from tests.helpers import replica_actors


def up(tmp_path, edit) -> subprocess.CompletedProcess:
    doc = yaml.safe_load(TEST_CONFIG.read_text())
    # a model folder without config.json: the run stops before any cluster starts
    doc["applications"][0]["args"]["model"]["path"] = str(tmp_path)
    edit(doc)
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(doc))
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "up", "--config", str(path)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert str(path) in r.stderr, r.stderr
    return r


def override(doc: dict, **opts) -> None:
    doc["applications"][0]["deployments"] = [{"name": "ModelReplica", **opts}]


IGNORED = [  # (edit, the key named in the error)
    (lambda d: d.update(tracing={}), "tracing"),
    (lambda d: d["applications"][0].update(runtime_envs={}), "applications[0].runtime_envs"),
    (lambda d: override(d, num_replica=3), "applications[0].deployments[0].num_replica"),
    (lambda d: override(d, ray_actor_options={"num_cpu": 1}),
     "applications[0].deployments[0].ray_actor_options.num_cpu"),
]


@pytest.mark.parametrize("edit, key", IGNORED, ids=[key for _, key in IGNORED])
def test_keys_serve_would_ignore_are_refused(tmp_path, edit, key):
    assert key in up(tmp_path, edit).stderr


def test_bad_serve_value_names_the_field(tmp_path):
    r = up(tmp_path, lambda d: override(d, num_replicas=0))
    assert "applications.0.deployments.0.num_replicas" in r.stderr


def second_app(name: str, **model_opts) -> tuple[dict, object]:
    """The test app under another name and prefix, its model replicas off the GPUs that
    the main app holds, and a `deployments:` override for its model replicas."""
    doc = copy.deepcopy(yaml.safe_load(TEST_CONFIG.read_text()))
    app = doc["applications"][0]
    app.update(name=name, route_prefix=f"/{name}")
    app["args"]["model_pool"].update(num_replicas=2, num_gpus=0)
    override(doc, **model_opts)
    return doc, parse_app_config(app["args"])


def test_deployments_override_applies_beside_the_main_app(app_url):
    main_before = {a.actor_id for a in replica_actors("ModelReplica")}
    doc, cfg = second_app("override", num_replicas=1, max_ongoing_requests=7)
    port = urlparse(app_url).port
    try:
        url = local_cluster.deploy(doc, cfg, http_port=port) + "/override"
        body = {"model": "tandem-tiny", "prompt": "hi", "max_tokens": 4}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 200
        # the file says 1 replica where the args say 2: the override wins, as in serve deploy
        assert len(replica_actors("ModelReplica", "override")) == 1
        dep = serve.status().applications["override"].deployments["ModelReplica"]
        assert dep.replica_states == {"RUNNING": 1}
        details = local_cluster._details(serve.context._get_global_client())
        deployed = details.applications["override"].deployments["ModelReplica"]
        assert deployed.deployment_config.max_ongoing_requests == 7
    finally:
        serve.delete("override")
    # the main app was left as it was: the same replicas, still serving
    assert {a.actor_id for a in replica_actors("ModelReplica")} == main_before
    assert httpx.get(f"{app_url}/health").json() == {"status": "ok"}


def test_an_override_serve_cannot_apply_fails_with_its_reason(app_url):
    doc, cfg = second_app("badoverride", num_replicas=1)
    doc["applications"][0]["deployments"][0]["name"] = "NoSuchDeployment"
    try:
        with pytest.raises(RuntimeError, match="NoSuchDeployment"):
            local_cluster.deploy(doc, cfg, http_port=urlparse(app_url).port,
                                 blocking_timeout_s=120)
    finally:
        serve.delete("badoverride")
    assert httpx.get(f"{app_url}/health").json() == {"status": "ok"}
