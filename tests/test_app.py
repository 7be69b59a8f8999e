"""The whole path over real HTTP on a real multi-node Ray cluster, with the official client."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from openai import AsyncOpenAI

from cluster.tokenizer import Tokenizer
from tests.helpers import model_replica_stats, node_labels, replica_actors, wait_kv_free

MODEL = "tandem-tiny"
GREEDY = {"temperature": 0.0}


def test_models_and_health(client, app_url):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{app_url}/health").json() == {"status": "ok"}


def test_completion_with_usage(client, model_dir):
    prompt = "The quick brown fox"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, **GREEDY,
                                  extra_body={"ignore_eos": True})
    n_prompt = len(Tokenizer(model_dir).encode(prompt))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == 12 and r.usage.total_tokens == n_prompt + 12
    assert r.choices[0].finish_reason == "length" and r.choices[0].text


def test_streaming_equals_non_streaming(client):
    args = dict(model=MODEL, prompt="hello world", max_tokens=20, **GREEDY,
                extra_body={"ignore_eos": True})
    whole = client.completions.create(**args).choices[0].text
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True},
                                            **args))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole
    assert chunks[-1].usage.completion_tokens == 20 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_stream_and_usage(client, model_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                           **GREEDY)
    tok = Tokenizer(model_dir)
    assert whole.usage.prompt_tokens == len(tok.encode_chat(messages))
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                            stream=True, stream_options={"include_usage": True},
                                            **GREEDY)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_string_cuts_text(client):
    full = client.completions.create(model=MODEL, prompt="hello", max_tokens=30, **GREEDY,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = full[10:13]
    assert stop and stop in full
    r = client.completions.create(model=MODEL, prompt="hello", max_tokens=30, stop=[stop],
                                  **GREEDY, extra_body={"ignore_eos": True})
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    assert wait_kv_free() and all(s["kv_used"] == 0 for s in model_replica_stats())


def test_32_concurrent_streams_keep_their_order(client, app_url):
    prompts = [f"request {i}: " + "tokens " * (i % 7) for i in range(32)]
    expected = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, **GREEDY,
                                          extra_body={"ignore_eos": True}).choices[0].text
                for p in prompts]

    async def one(c: AsyncOpenAI, p: str) -> str:
        s = await c.completions.create(model=MODEL, prompt=p, max_tokens=24, stream=True,
                                       **GREEDY, extra_body={"ignore_eos": True})
        return "".join([ch.choices[0].text async for ch in s])

    async def all_streams():
        c = AsyncOpenAI(base_url=f"{app_url}/v1", api_key="unused", max_retries=0, timeout=300)
        return await asyncio.gather(*(one(c, p) for p in prompts))

    assert asyncio.run(all_streams()) == expected


def test_multibyte_text_survives_streaming(client, model_dir):
    # the model's text is noise, so check the detokenizer on the stream it produced
    prompt = "héllo 你好 🚀 Привет"
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, **GREEDY,
                                  extra_body={"ignore_eos": True})
    chunks = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, stream=True,
                                       **GREEDY, extra_body={"ignore_eos": True})
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text


def test_placement_follows_node_labels(app_url):
    labels = node_labels()
    tok = replica_actors("Ingress")
    models = replica_actors("ModelReplica")
    assert tok and len(models) == 2
    assert all(labels[a.node_id].get("cpu-arch") == "kunpeng" for a in tok)
    assert all(labels[a.node_id].get("node-role") == "model" for a in models)


def test_client_disconnect_frees_kv_blocks(app_url):
    """Clients that leave mid-stream end their generations (aborted in the engine, not run
    to their 400 tokens) and their KV blocks come back."""
    body = {"model": MODEL, "prompt": "disconnect me " * 20, "max_tokens": 400, "stream": True,
            "temperature": 0.0, "ignore_eos": True}

    def aborted() -> int:
        time.sleep(1.2)  # engine cores report twice a second
        return sum(s["aborted"] for s in model_replica_stats())

    before = aborted()
    with httpx.Client(timeout=60) as http:
        for _ in range(3):
            with http.stream("POST", f"{app_url}/v1/completions", json=body) as resp:
                assert resp.status_code == 200
                lines = resp.iter_lines()
                got = [next(lines) for _ in range(6)]
                assert any(line.startswith("data: {") for line in got)
    stats = wait_kv_free()
    assert all(s["kv_used"] == 0 and s["running"] == 0 for s in stats), stats
    assert aborted() - before == 3


BAD = [
    ("/v1/completions", b"{not json", 400, None),
    ("/v1/completions", b"[1, 2]", 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, "model"),
    ("/v1/completions", {"model": MODEL}, 400, "prompt"),
    ("/v1/completions", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10**6}, 400, "max_tokens"),
    ("/v1/completions", {"model": MODEL, "prompt": "word " * 2000}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "temperature": -0.5}, 400,
     "temperature"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "top_p": 1.5}, 400, "top_p"),
    ("/v1/completions", {"model": MODEL, "prompt": []}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"model": MODEL, "prompt": 42}, 400, "prompt"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]},
     400, "messages.0.role"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 17}, 400, "n"),
    ("/v1/chat/completions",
     {"model": MODEL, "messages": [{"role": "assistant", "content": "x",
                                    "tool_calls": [{"id": "1", "type": "function"}]}]},
     400, "messages.0.tool_calls"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "top_logprobs": 2}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                              "tools": [{"type": "function", "function": {"name": "f"}}],
                              "tool_choice": {"type": "function",
                                              "function": {"name": "nope"}}},
     400, "tool_choice"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"abc": 1}}, 400,
     "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "logit_bias": {"99999999": 1}}, 400,
     "logit_bias"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "presence_penalty": 2.5}, 400,
     "presence_penalty"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "response_format": {
        "type": "json_schema", "json_schema": {"name": "s", "schema": {
            "type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}}}}, 400,
     "response_format"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "guided_regex": "(unclosed"}, 400,
     "guided_regex"),
    ("/v1/completions", {"model": MODEL, "prompt": "x", "guided_regex": "a",
                         "guided_choice": ["a"]}, 400, "guided_"),
] + [
    # parameters that change the answer and are not implemented: refused, never ignored
    (path, {"model": MODEL, **base, name: value}, 400, name)
    for path, base in (("/v1/completions", {"prompt": "x"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}))
    for name, value in (("best_of", 2), ("suffix", "end"), ("made_up_parameter", 1),
                        ("prompt_logprobs", 1))
] + [(path, {"model": MODEL, "prompt": "x", name: value}, 400, name)
     for path in ("/v1/completions",)
     for name, value in (("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("top_logprobs", 2))]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD)
def test_bad_input_gets_openai_error(app_url, path, body, status, param):
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(f"{app_url}{path}", timeout=30, **kw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param:
        assert err["param"] is not None and err["param"].startswith(param), err


def test_nan_temperature_is_rejected(app_url):
    r = httpx.post(f"{app_url}/v1/completions", timeout=30,
                   content=b'{"model": "tandem-tiny", "prompt": "x", "temperature": NaN}',
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and json.loads(r.text)["error"]["param"] == "temperature"


def test_unsupported_parameter_error_names_it(app_url):
    r = httpx.post(f"{app_url}/v1/completions", timeout=30,
                   json={"model": MODEL, "prompt": "x", "suffix": "y"})
    err = r.json()["error"]
    assert r.status_code == 400 and err["param"] == "suffix"
    assert err["code"] == "unsupported_parameter" and "not supported" in err["message"]


def test_parameters_that_change_nothing_are_accepted(client):
    r = client.completions.create(model=MODEL, prompt="fine", max_tokens=2, user="u-1",
                                  extra_body={"metadata": {"k": "v"}, "store": False})
    assert r.usage.completion_tokens >= 1


def test_cache_salt_keeps_prefixes_apart(client):
    """Requests share cached prompt blocks only under the same cache salt."""
    prompt = "A long shared system prompt for salted caching. " * 10

    def cached(salt):
        extra = {"cache_salt": salt} if salt else {}
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                      extra_body=extra)
        time.sleep(1.2)  # the holder's prefix report reaches the router
        return r.usage.prompt_tokens_details.cached_tokens

    assert cached("salt-a") == 0
    assert cached("salt-b") == 0
    assert cached("salt-a") >= 64
    assert cached(None) == 0


def test_service_still_serves_after_bad_input(client):
    r = client.completions.create(model=MODEL, prompt="still alive", max_tokens=4)
    assert r.usage.completion_tokens >= 1


def test_frontends_run_without_torch(app_url):
    """The Kunpeng side (HTTP, tokens, text, routing) never imports torch: a CPU host runs
    it without torch installed."""
    import ray

    def loaded(_self) -> list[str]:
        import sys

        return sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))

    for a in replica_actors("Ingress"):
        actor = ray.get_actor(a.name, namespace="serve")
        assert ray.get(actor.__ray_call__.remote(loaded)) == [], a.name


def test_200_concurrent_streams_each_get_exactly_their_own_tokens(app_url, model_dir):
    """200 streams at once over the per-step data plane (many streams share each engine
    message): each gets exactly the text of its own prompt's offline greedy tokens."""
    from cluster.config import EngineConfig
    from cluster.engine.engine import LLMEngine
    from cluster.engine.sequence import SamplingParams

    prompts = [[100 + (i * 7 + j) % 900 for j in range(8 + i % 11)] for i in range(200)]
    engine = LLMEngine(str(model_dir), EngineConfig(device="cpu", dtype="float32",
                                                    max_model_len=512, num_kv_blocks=512,
                                                    max_num_seqs=64, torch_threads=1))
    ids = engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=12,
                                                  ignore_eos=True))
    tok = Tokenizer(model_dir)
    expected = [tok.decode(x) for x in ids]

    async def one(c: httpx.AsyncClient, p: list[int]) -> str:
        body = {"model": MODEL, "prompt": p, "max_tokens": 12, "temperature": 0.0,
                "ignore_eos": True, "stream": True}
        text = ""
        async with c.stream("POST", f"{app_url}/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += "".join(ch.get("text", "") for ch in
                                    json.loads(line[6:]).get("choices", []))
        return text

    async def all_streams():
        limits = httpx.Limits(max_connections=220)
        async with httpx.AsyncClient(timeout=300, limits=limits) as c:
            return await asyncio.gather(*(one(c, p) for p in prompts))

    got = asyncio.run(all_streams())
    wrong = [i for i in range(200) if got[i] != expected[i]]
    assert not wrong, [(i, got[i], expected[i]) for i in wrong[:3]]
