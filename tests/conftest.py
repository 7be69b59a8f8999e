"""Shared fixtures: the default model, and one real local multi-node Ray cluster with the
app deployed on it (started once per test session; it takes ~30 s on 2 cores)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster.config import DEFAULT_MODEL_DIR, load_serve_config
from cluster.model_init import build

TEST_CONFIG = Path(__file__).parent / "test_config.yaml"


def free_port() -> int:
    from cluster.local_cluster import free_port

    return free_port()


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return build(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="session")
def ray_cluster(model_dir):
    """Head + two Kunpeng nodes + a model node declaring two GPUs (helpers.CLUSTER)."""
    import dataclasses

    import ray

    from cluster import local_cluster
    from tests.helpers import CLUSTER

    cluster = local_cluster.start(dataclasses.replace(CLUSTER, dashboard_port=free_port()))
    ray.init(address=cluster.address)
    yield cluster
    from ray import serve

    serve.shutdown()
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="session")
def app_config(model_dir):
    return load_serve_config(TEST_CONFIG)


@pytest.fixture(scope="session")
def app_url(ray_cluster, app_config) -> str:
    """Base URL (no /v1) of the tandem app on the session's cluster."""
    from cluster import local_cluster

    doc, cfg = app_config
    return local_cluster.deploy(doc, cfg, http_port=free_port())


@pytest.fixture
def client(app_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=120)
