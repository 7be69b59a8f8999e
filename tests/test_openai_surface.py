"""The OpenAI surface real clients use, over HTTP on the session's cluster with the official
client: logprobs (against transformers), echo, n, prompt arrays, penalties and biases,
structured outputs, tool calls, the extra endpoints."""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import pytest
import torch

from cluster.tokenizer import Tokenizer

MODEL = "tandem-tiny"


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tok(model_dir):
    return Tokenizer(model_dir)


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_completion_logprobs_equal_transformers_streamed_and_not(client, hf, tok):
    prompt = "The cluster serves tokens"
    ids = tok.encode(prompt)
    args = dict(model=MODEL, prompt=prompt, max_tokens=8, temperature=0.0, logprobs=3,
                extra_body={"ignore_eos": True})
    r = client.completions.create(**args)
    lp = r.choices[0].logprobs
    with torch.no_grad():  # greedy: the same tokens as transformers'
        out = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=8,
                          min_new_tokens=8, attention_mask=torch.ones(1, len(ids)))
    out = out[0, len(ids):].tolist()
    assert lp.tokens == [tok.decode([t], False) for t in out]
    ref = hf_logprobs(hf, ids + out)[len(ids) - 1: -1]
    for i, t in enumerate(out):
        assert abs(lp.token_logprobs[i] - ref[i, t].item()) < 1e-4
        assert len(lp.top_logprobs[i]) == 3
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [len("".join(lp.tokens[:i])) for i in range(len(lp.tokens))]
    chunks = list(client.completions.create(stream=True, **args))
    streamed = [x for c in chunks for x in c.choices[0].logprobs.token_logprobs]
    # the same values, to float32's last bits: the two requests may run on the app's two
    # replicas, each of which times its projections' layout at load (cpu_linear.decide)
    assert streamed == pytest.approx(lp.token_logprobs, abs=1e-5)


def test_chat_logprobs_have_bytes_and_top_logprobs(client):
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5,
        temperature=0.0, logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 5 and "".join(c.token for c in content) == \
        r.choices[0].message.content
    for c in content:
        assert bytes(c.bytes).decode(errors="replace") == c.token
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].logprob >= c.logprob - 1e-6


def test_echo_scores_the_prompt_like_transformers(client, hf, tok):
    """lm-eval's loglikelihood request: echo + logprobs + max_tokens 0."""
    prompt = "Paris is the capital of France"
    ids = tok.encode(prompt)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True,
                                  logprobs=1, temperature=0.0)
    c = r.choices[0]
    assert c.text == prompt and r.usage.completion_tokens == 0
    lps = c.logprobs.token_logprobs
    assert len(lps) == len(ids) and lps[0] is None
    ref = hf_logprobs(hf, ids)
    for j in range(1, len(ids)):
        assert abs(lps[j] - ref[j - 1, ids[j]].item()) < 1e-4


def test_n_choices_are_seeded_indexed_and_counted(client):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=6, n=3, seed=11,
                temperature=1.0, extra_body={"ignore_eos": True})
    a = client.completions.create(**args)
    b = client.completions.create(**args)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1
    assert a.usage.completion_tokens == 18
    streamed: dict[int, str] = {}
    for chunk in client.completions.create(stream=True, **args):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in a.choices]


def test_prompt_arrays_give_one_choice_per_prompt(client, tok):
    prompts = ["first prompt", "second, longer prompt here"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=4, n=2,
                                  temperature=0.0, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(model=MODEL, prompt=p, max_tokens=4,
                                         temperature=0.0, extra_body={"ignore_eos": True}
                                         ).choices[0].text for p in prompts]
    assert [c.text for c in r.choices] == [singles[0]] * 2 + [singles[1]] * 2
    assert r.usage.prompt_tokens == sum(len(tok.encode(p)) for p in prompts)
    ids = [tok.encode(p) for p in prompts]
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=4, temperature=0.0,
                                   extra_body={"ignore_eos": True})
    assert [c.text for c in r2.choices] == singles


def test_return_token_ids_gives_prompt_and_output_ids_token_exact(client, app_url, tok, hf):
    """vLLM's extension: the prompt's ids (a text prompt's as tokenized) and the generated
    ids, equal to transformers' greedy tokens, whole and streamed; a conversation extended
    with them reuses the first turn's cached blocks. Chat refuses it (not served there)."""
    prompt = "The cluster serves tokens to many clients at once"
    ids = tok.encode(prompt)
    args = dict(model=MODEL, prompt=prompt, max_tokens=24, temperature=0.0,
                extra_body={"ignore_eos": True, "return_token_ids": True})
    c = client.completions.create(**args).choices[0].model_dump()
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24,
                          min_new_tokens=24, attention_mask=torch.ones(1, len(ids)))
    assert c["prompt_token_ids"] == ids and c["token_ids"] == ref[0, len(ids):].tolist()
    chunks = [x.choices[0].model_dump() for x in client.completions.create(stream=True, **args)]
    assert chunks[0]["prompt_token_ids"] == ids
    assert all(x["prompt_token_ids"] is None for x in chunks[1:])
    assert [t for x in chunks for t in x["token_ids"]] == c["token_ids"]
    assert "".join(x["text"] for x in chunks) == c["text"]
    # the next turn, token-exact: the first turn's full blocks come from the prefix cache,
    # one at least that output tokens filled (24 outputs, the last one's KV never made)
    time.sleep(2.0)  # a stats period or more: the holder's report reaches the router
    turn = ids + c["token_ids"] + tok.encode(" and more", add_special_tokens=False)
    r = client.completions.create(model=MODEL, prompt=turn, max_tokens=1, temperature=0.0)
    assert r.usage.prompt_tokens_details.cached_tokens == (len(ids) + 23) // 16 * 16
    bad = httpx.post(f"{app_url}/v1/chat/completions", timeout=30, json={
        "model": MODEL, "messages": [{"role": "user", "content": "hi"}],
        "return_token_ids": True})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "return_token_ids"


def test_logit_bias_forces_a_token(client, tok):
    target = tok.encode("hello", add_special_tokens=False)[0]
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=4, temperature=0.8,
                                  logit_bias={str(target): 100}, seed=1)
    assert r.choices[0].text == tok.decode([target] * 4)


SCHEMAS = [
    {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                      "days": {"type": "integer"}},
     "required": ["city", "days"], "additionalProperties": False},
    {"type": "object", "properties": {
        "items": {"type": "array", "minItems": 1, "maxItems": 3, "items": {
            "type": "object", "properties": {"k": {"enum": ["x", "y"]}, "v": {"type": "boolean"}},
            "required": ["k", "v"], "additionalProperties": False}}},
     "required": ["items"], "additionalProperties": False},
]


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_json_schema_output_is_valid(client, schema, stream):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "give JSON"}],
                max_tokens=200, temperature=1.0, seed=5, response_format={
                    "type": "json_schema", "json_schema": {"name": "s", "schema": schema,
                                                           "strict": True}})
    if stream:
        text = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(stream=True, **args) if c.choices)
    else:
        r = client.chat.completions.create(**args)
        assert r.choices[0].finish_reason == "stop"
        text = r.choices[0].message.content
    jsonschema.validate(json.loads(text), schema)


def test_guided_choice_regex_and_json_object(client):
    r = client.completions.create(model=MODEL, prompt="pick", max_tokens=10, temperature=1.0,
                                  extra_body={"guided_choice": ["red", "green", "blue"]})
    assert r.choices[0].text in {"red", "green", "blue"}
    r = client.completions.create(model=MODEL, prompt="num", max_tokens=20, temperature=1.0,
                                  extra_body={"guided_regex": r"[0-9]{3}-[a-z]{2}"})
    import re
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", r.choices[0].text)
    r = client.completions.create(model=MODEL, prompt="obj", max_tokens=60, temperature=1.0,
                                  seed=2, extra_body={"response_format": {"type": "json_object"}})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].text), dict)
    else:  # cut by max_tokens: still a prefix of one object
        assert r.choices[0].text.lstrip().startswith("{")


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "add", "parameters": {"type": "object", "properties": {
            "a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
            "additionalProperties": False}}}]


# integers bounded: a random-weight model writes digits until max_tokens otherwise
BOUNDED = {"type": "integer", "minimum": -999, "maximum": 999}
FORCED_TOOLS = [TOOLS[0], {"type": "function", "function": {
    "name": "add", "parameters": {"type": "object", "properties": {"a": BOUNDED, "b": BOUNDED},
                                  "required": ["a", "b"], "additionalProperties": False}}}]


@pytest.mark.parametrize("choice", ["required", {"type": "function",
                                                 "function": {"name": "add"}}],
                         ids=["required", "named"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_forced_tool_calls_match_their_schema(client, choice, stream):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "weather in Paris?"}],
                tools=FORCED_TOOLS, tool_choice=choice, max_tokens=100, temperature=1.0,
                seed=3)
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in FORCED_TOOLS}
    if stream:
        calls: dict[int, dict] = {}
        reason = None
        for c in client.chat.completions.create(stream=True, **args):
            if not c.choices:
                continue
            reason = c.choices[0].finish_reason or reason
            for tc in c.choices[0].delta.tool_calls or []:
                call = calls.setdefault(tc.index, {"name": "", "arguments": ""})
                call["name"] += (tc.function.name or "") if tc.function else ""
                call["arguments"] += (tc.function.arguments or "") if tc.function else ""
        got = [calls[i] for i in sorted(calls)]
    else:
        r = client.chat.completions.create(**args)
        reason = r.choices[0].finish_reason
        got = [{"name": c.function.name, "arguments": c.function.arguments}
               for c in r.choices[0].message.tool_calls]
        assert all(c.id for c in r.choices[0].message.tool_calls)
    # `required` lets the model add calls until max_tokens: then the last one is cut
    # (finish_reason length) and every call before it must be whole
    assert reason in ("tool_calls", "length") and got
    whole = got if reason == "tool_calls" else got[:-1]
    assert whole, got
    for call in whole:
        if isinstance(choice, dict):
            assert call["name"] == "add"
        jsonschema.validate(json.loads(call["arguments"]), schemas[call["name"]])


def test_a_forced_call_cut_by_max_tokens_ends_with_length(client):
    """Its arguments are unfinished: the answer says "length", as OpenAI's does, not
    "tool_calls"."""
    r = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "add"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, max_tokens=3,
        temperature=0.0)
    assert r.choices[0].finish_reason == "length"


def test_auto_tool_choice_reads_the_models_own_format(client):
    """tool_choice auto: the model's text (here steered by a regex) in the Hermes format
    comes back as a tool call; the history may hold calls and tool results."""
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": None, "tool_calls": [{
                    "id": "call_1", "type": "function",
                    "function": {"name": "add", "arguments": '{"a": 1, "b": 1}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "2"},
                {"role": "user", "content": "and 1+2?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, tools=TOOLS,
                                       max_tokens=60, temperature=0.0,
                                       extra_body={"guided_regex": __import__("re").escape(call)})
    msg = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls"
    assert msg.tool_calls[0].function.name == "add"
    assert json.loads(msg.tool_calls[0].function.arguments) == {"a": 1, "b": 2}


def test_usage_is_null_on_every_chunk_but_the_last(app_url):
    body = {"model": MODEL, "prompt": "x", "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{app_url}/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"]
    assert all(e["system_fingerprint"] for e in events)
    body["stream_options"]["continuous_usage_stats"] = True
    with httpx.stream("POST", f"{app_url}/v1/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines()
                  if line.startswith("data: {")]
    assert all(e["usage"]["prompt_tokens"] > 0 for e in events)


def test_models_tokenize_detokenize(client, app_url, tok):
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(f"{app_url}/v1/models/nope", timeout=30).status_code == 404
    r = httpx.post(f"{app_url}/tokenize", json={"model": MODEL, "prompt": "hello world"},
                   timeout=30).json()
    assert r["tokens"] == tok.encode("hello world") and r["count"] == len(r["tokens"])
    chat = httpx.post(f"{app_url}/tokenize", timeout=30, json={
        "messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat["tokens"] == tok.encode_chat([{"role": "user", "content": "hi"}])
    back = httpx.post(f"{app_url}/detokenize", json={"tokens": r["tokens"]}, timeout=30)
    assert back.json()["prompt"] == "hello world"
    bad = httpx.post(f"{app_url}/detokenize", json={"tokens": [10**9]}, timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
