"""A DeepSeek checkpoint (the deepseek-v3-tiny shape: MLA, MoE, transformers' own weights and
layout, the project tokenizer) served by an app of its own on the live cluster: the official
client's completion and chat answers, greedy text equal to the engine offline."""

from __future__ import annotations

from urllib.parse import urlparse

import openai
import pytest
from ray import serve

from cluster import local_cluster
from cluster.config import parse_app_config
from cluster.model_init import build
from tests.test_hybrid_serving import offline_greedy

pytestmark = pytest.mark.timeout(300)

APP, MODEL = "deepseek", "tandem-deepseek"


@pytest.fixture(scope="module")
def deepseek_app(app_url, tmp_path_factory):
    folder = build(tmp_path_factory.mktemp("ds") / "deepseek-v3-tiny", shape="deepseek-v3-tiny")
    args = {"model": {"name": MODEL, "path": str(folder)},
            "engine": {"max_model_len": 512, "max_num_seqs": 4, "max_num_batched_tokens": 512,
                       "num_kv_blocks": 64, "torch_threads": 1},
            "model_pool": {"num_replicas": 1, "num_cpus": 0.5, "num_gpus": 0,
                           "label_selector": {"node-role": "model"}},
            "frontend_pool": {"num_replicas": 1, "num_cpus": 0.25}}
    doc = {"proxy_location": "HeadOnly", "applications": [
        {"name": APP, "route_prefix": f"/{APP}", "import_path": "deployments.app:app",
         "args": args}]}
    try:
        url = local_cluster.deploy(doc, parse_app_config(args),
                                   http_port=urlparse(app_url).port) + f"/{APP}"
        yield url, folder
    finally:
        serve.delete(APP)


def test_deepseek_checkpoint_is_served_like_the_engine_offline(deepseek_app):
    url, folder = deepseek_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
    assert [m.id for m in client.models.list().data] == [MODEL]
    prompt = "latent attention and experts"
    got = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0.0,
                                    extra_body={"ignore_eos": True})
    assert got.choices[0].text == offline_greedy(folder, prompt, 16)
    assert got.usage.completion_tokens == 16
    chat = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0.0,
                                          messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].finish_reason in ("stop", "length")
    assert chat.usage.prompt_tokens > 1 and chat.usage.completion_tokens >= 1
