"""Tool calling, text side: each format read whole and streamed in chunks of every size, the
request checks, forced-call grammars driven through llguidance with random logits on the
built-in model's tokenizer, and the built-in chat template with tools (against transformers).
"""

from __future__ import annotations

import json
import random
import shutil

import jsonschema
import llguidance
import llguidance.hf
import llguidance.numpy as llnp
import numpy as np
import pytest
import transformers

from cluster.model_init import CHAT_TEMPLATE, build
from cluster.tokenizer import IncrementalDetokenizer, Tokenizer
from cluster.tool_calls import (
    ToolCallStream,
    check_tools,
    forced_call_grammar,
    parse,
)

DS = {"B": "<｜tool▁calls▁begin｜>", "E": "<｜tool▁calls▁end｜>", "b": "<｜tool▁call▁begin｜>",
      "e": "<｜tool▁call▁end｜>", "s": "<｜tool▁sep｜>"}


def ds_call(name: str, args: str) -> str:
    return f"{DS['b']}function{DS['s']}{name}\n```json\n{args}\n```{DS['e']}"


W1 = '{"city": "Paris", "days": [1, {"x": "}\\"</tool_call>"}]}'  # markers inside strings
W2 = '{"city":"Zürich"}'
# (parser, text, content, [(name, arguments)])
CASES = [
    ("hermes", f'<tool_call>\n{{"name": "get_weather", "arguments": {W1}}}\n</tool_call>',
     None, [("get_weather", W1)]),
    ("hermes", f'Let me check.\n\n<tool_call>\n{{"name": "get_weather", "arguments": {W1}}}\n'
     f'</tool_call>\n<tool_call>\n{{"arguments": {W2}, "name": "get_weather"}}\n</tool_call>\n',
     "Let me check.", [("get_weather", W1), ("get_weather", W2)]),
    ("hermes", '<tool_call>{"name": "ping", "arguments": {}}</tool_call> and then text',
     "and then text", [("ping", "{}")]),
    ("hermes", '<tool_call>\n{"name": "ping", "arguments": {}}\n', None, [("ping", "{}")]),
    ("hermes", "hi <tool_call>\nnot json\n</tool_call> bye",
     "hi <tool_call>\nnot json\n</tool_call> bye", []),
    ("hermes", '<tool_call>{"name": 3, "arguments": {}}</tool_call>',
     '<tool_call>{"name": 3, "arguments": {}}</tool_call>', []),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>',
     '<tool_call>{"arguments": {}}</tool_call>', []),
    ("hermes", "if a <tool and b > c", "if a <tool and b > c", []),
    ("hermes", "Plain answer.\n", "Plain answer.\n", []),
    ("llama3_json", f'{{"name": "get_weather", "parameters": {W1}}}', None,
     [("get_weather", W1)]),
    ("llama3_json", f'<|python_tag|>{{"name": "a", "parameters": {W2}}}; '
     '{"name": "ping", "parameters": {}};', None, [("a", W2), ("ping", "{}")]),
    ("llama3_json", '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),
    ("llama3_json", 'The answer is {"name": "x", "parameters": {}}',
     'The answer is {"name": "x", "parameters": {}}', []),
    ("llama3_json", '{"name": "ping", "parameters": {}} then prose', "then prose",
     [("ping", "{}")]),
    ("deepseek_v3", f"{DS['B']}{ds_call('get_weather', W1)}{DS['E']}", None,
     [("get_weather", W1)]),
    ("deepseek_v3", f"Sure.{DS['B']}{ds_call('get_weather', W1)}\n{ds_call('ping', '{}')}"
     f"{DS['E']}", "Sure.", [("get_weather", W1), ("ping", "{}")]),
    ("deepseek_v3", f"x{DS['B']}{DS['b']}function{DS['s']}f\n```json\nnope\n```{DS['e']}{DS['E']}",
     f"x{DS['B']}{DS['b']}function{DS['s']}f\n```json\nnope\n```{DS['e']}{DS['E']}", []),
    ("deepseek_v3", "No tools needed.", "No tools needed.", []),
]


def streamed(parser: str, text: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    s = ToolCallStream(parser)
    out, i = [], 0
    while i < len(text):
        n = 1 if seed == 0 else rng.randint(1, 9)
        out += s.feed(text[i : i + n])
        i += n
    return out + s.finish()


def assemble(deltas: list[dict]) -> tuple[str | None, list[tuple[str, str]]]:
    content, calls = "", {}
    for d in deltas:
        content += d.get("content", "")
        for t in d.get("tool_calls", []):
            if "id" in t:
                assert t["id"].startswith("call_") and t["type"] == "function"
                assert t["function"]["arguments"] == "" and t["index"] == len(calls)
                calls[t["index"]] = [t["function"]["name"], ""]
            else:
                assert set(t) == {"index", "function"} and set(t["function"]) == {"arguments"}
                calls[t["index"]][1] += t["function"]["arguments"]
    return content or None, [tuple(c) for c in calls.values()]


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_parse(parser, text, content, calls):
    got_content, got = parse(text, parser)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got] == calls
    assert all(json.loads(c.arguments) is not None for c in got)
    assert len({c.id for c in got}) == len(got)
    for c in got:
        assert c.to_openai() == {"id": c.id, "type": "function",
                                 "function": {"name": c.name, "arguments": c.arguments}}


@pytest.mark.parametrize("parser,text,content,calls", CASES)
def test_streaming_matches_parse_in_any_chunks(parser, text, content, calls):
    for seed in range(20):
        assert assemble(streamed(parser, text, seed)) == (content, calls), seed


def test_stream_passes_content_through_and_streams_arguments():
    s = ToolCallStream("hermes")
    assert s.feed("Checking <") == [{"content": "Checking"}]  # " <" might start a call
    assert s.feed("b>now</b> <tool_") == [{"content": " <b>now</b>"}]
    assert s.feed('call>\n{"name": "f", "argu') == []
    first = s.feed('ments": {"q": "a')
    assert first[0]["tool_calls"][0]["function"] == {"name": "f", "arguments": ""}
    assert first[1:] == [{"tool_calls": [{"index": 0, "function": {"arguments": '{"q": "a'}}]}]
    assert s.feed('b"}}\n</tool_call>') == [
        {"tool_calls": [{"index": 0, "function": {"arguments": 'b"}'}}]}]
    assert s.finish() == []


def test_a_call_broken_after_it_streamed_keeps_what_streamed():
    text = '<tool_call>{"name": "f", "arguments": {"a": tru}}</tool_call>after'
    content, calls = parse(text, "hermes")
    assert (content, calls) == (text, [])  # whole: it is no call
    c, streamed_calls = assemble(streamed("hermes", text, 0))
    assert streamed_calls == [("f", '{"a": tru')] and c == "after"


def test_unknown_parser():
    with pytest.raises(ValueError, match="unknown tool call parser"):
        ToolCallStream("nope")
    with pytest.raises(ValueError, match="unknown tool call parser"):
        forced_call_grammar([], "required", "nope")


# ---- request checks

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 12},
                          "unit": {"enum": ["c", "f"]},
                          "days": {"type": "integer", "minimum": 1, "maximum": 14}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["query"],
          "properties": {"query": {"type": "string", "maxLength": 16},
                         "tags": {"type": "array", "maxItems": 3,
                                  "items": {"type": "string", "maxLength": 5}},
                         "exact": {"type": "boolean"},
                         "filter": {"type": "object", "additionalProperties": False,
                                    "properties": {"lang": {"enum": ["en", "zh"]}}}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "description": "Finds <things>",
                                           "parameters": SEARCH}},
         {"type": "function", "function": {"name": "ping"}}]


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def fn(**f) -> list[dict]:
    return [{"type": "function", "function": f}]


@pytest.mark.parametrize("tools,choice,error", [
    (None, "required", "only allowed when tools are given"),
    ([], named("x"), "only allowed when tools are given"),
    (TOOLS, named("nope"), "'nope', which is not in tools"),
    (TOOLS, "sometimes", "tool_choice must be"),
    (TOOLS, {"type": "function"}, "tool_choice must be"),
    (fn(description="no name"), None, r"tools\[0\].function.name is required"),
    ([{"type": "function"}], None, r"tools\[0\].function.name is required"),
    ([{"type": "retrieval", "function": {"name": "x"}}], None, "only tools of type 'function'"),
    (fn(name="two words"), None, "without whitespace"),
    (fn(name="x" * 65), None, "1-64 characters"),
    (TOOLS + fn(name="ping"), None, "a second function named 'ping'"),
    (fn(name="f", parameters={"type": "array"}), None, "of type 'object'"),
    (fn(name="f", parameters="{}"), None, "of type 'object'"),
])
def test_check_tools_refuses(tools, choice, error):
    with pytest.raises(ValueError, match=error):
        check_tools(tools, choice)


@pytest.mark.parametrize("tools,choice", [
    (None, None), (None, "none"), (TOOLS, None), (TOOLS, "auto"), (TOOLS, "none"),
    (TOOLS, "required"), (TOOLS, named("search")), (fn(name="f", parameters={}), "auto")])
def test_check_tools_accepts(tools, choice):
    check_tools(tools, choice)


# ---- forced calls, through llguidance on the built-in model's tokenizer


@pytest.fixture(scope="module")
def hf_tok(model_dir):
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                                eos_token="<|im_end|>")


def generate(lltok, grammar: str, seed: int, limit: int = 3000) -> list[int]:
    """Tokens a random-logit "model" writes under the grammar, up to its end (EOS dropped)."""
    assert llguidance.LLMatcher.validate_grammar(llguidance.grammar_from("lark", grammar),
                                                 lltok) == ""
    m = llguidance.LLMatcher(lltok, llguidance.grammar_from("lark", grammar))
    mask = llnp.allocate_token_bitmask(1, lltok.vocab_size)
    rng = np.random.default_rng(seed)
    ids = []
    while not m.is_stopped():
        assert len(ids) < limit, "the grammar never let it stop"
        llnp.fill_next_token_bitmask(m, mask)
        logits = rng.standard_normal(lltok.vocab_size).astype(np.float32)
        llnp.apply_token_bitmask_inplace(logits, mask)
        t = int(np.argmax(logits))
        assert m.consume_token(t), m.get_error()
        ids.append(t)
    assert m.is_accepting() and not m.is_error()
    return [t for t in ids if t not in lltok.eos_tokens]


def check_calls(calls, choice) -> None:
    schemas = {t["function"]["name"]: t["function"].get("parameters") for t in TOOLS}
    assert calls
    if isinstance(choice, dict):
        assert [c.name for c in calls] == [choice["function"]["name"]]
    for c in calls:
        args = json.loads(c.arguments)
        jsonschema.validate(args, schemas[c.name] or {"type": "object", "maxProperties": 0})


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "deepseek_v3"])
@pytest.mark.parametrize("choice", ["required", named("get_weather"), named("search"),
                                    named("ping")])
def test_forced_calls_parse_as_valid_calls(model_dir, hf_tok, parser, choice):
    check_tools(TOOLS, choice)
    grammar = forced_call_grammar(TOOLS, choice, parser)
    lltok = llguidance.hf.from_tokenizer(hf_tok)
    tok = Tokenizer(model_dir)
    names = set()
    for seed in range(4):
        ids = generate(lltok, grammar, seed)
        text = tok.decode(ids)
        content, calls = parse(text, parser)
        assert content is None, text
        check_calls(calls, choice)
        names |= {c.name for c in calls}
        # streamed as the frontend would: token by token through the detokenizer
        detok, stream, deltas = IncrementalDetokenizer(tok), ToolCallStream(parser), []
        for i in ids:
            deltas += stream.feed(detok.push([i]))
        deltas += stream.feed(detok.flush()) + stream.finish()
        assert assemble(deltas) == (None, [(c.name, c.arguments) for c in calls])
    if choice == "required":
        assert len(names) > 1  # any of the tools, not just the first


@pytest.mark.parametrize("parser", ["hermes", "llama3_json", "deepseek_v3"])
def test_forced_names_are_escaped(model_dir, hf_tok, parser):
    name = 'naïve.tool-"q"\\'
    # no other keys: an open object lets random logits add keys past any limit (llguidance
    # 1.9 lets them; the names, not the arguments, are what this test is about)
    tools = fn(name=name, parameters={"type": "object", "properties": {},
                                      "additionalProperties": False})
    check_tools(tools, named(name))
    grammar = forced_call_grammar(tools, named(name), parser)
    ids = generate(llguidance.hf.from_tokenizer(hf_tok), grammar, seed=0)
    content, calls = parse(Tokenizer(model_dir).decode(ids), parser)
    assert content is None and [c.name for c in calls] == [name]


def test_auto_and_none_force_nothing():
    assert forced_call_grammar(TOOLS, "auto", "hermes") is None
    assert forced_call_grammar(TOOLS, "none", "hermes") is None
    assert forced_call_grammar(TOOLS, None, "hermes") is None


def test_markers_that_are_special_tokens_are_forced_as_tokens(model_dir):
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"),
                                              eos_token="<|im_end|>")
    hf.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    begin, end = hf.convert_tokens_to_ids(["<tool_call>", "</tool_call>"])
    grammar = forced_call_grammar(TOOLS, "required", "hermes",
                                  special_tokens={"<tool_call>", "</tool_call>", "<|im_start|>"})
    assert "<tool_call>" in grammar and '"<tool_call>' not in grammar
    ids = generate(llguidance.hf.from_tokenizer(hf), grammar, seed=1)
    assert ids[0] == begin and end in ids
    # such markers only reach the parser when the text is decoded with special tokens kept
    content, calls = parse(hf.decode(ids, skip_special_tokens=False), "hermes")
    assert content is None
    check_calls(calls, "required")


# ---- the built-in model's chat template with tools

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Weather in Paris and Zürich?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}},
        {"id": "call_2", "type": "function",  # Hugging Face style: arguments as an object
         "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21"},
    {"role": "tool", "tool_call_id": "call_2", "content": "rain <3 & more"},
    {"role": "assistant", "content": "Paris: sunny. Zürich: rain."},
    {"role": "user", "content": "ping it"},
    {"role": "assistant", "content": "Pinging.", "tool_calls": [
        {"id": "call_3", "type": "function", "function": {"name": "ping", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_3", "content": "pong"},
]


@pytest.fixture(scope="module")
def hf_auto(model_dir):
    return transformers.AutoTokenizer.from_pretrained(model_dir)


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], CONVERSATION[:2],
                                      [{"role": "user", "content": "hi"}]])
@pytest.mark.parametrize("tools", [TOOLS, None])
def test_template_renders_as_transformers_does(model_dir, hf_auto, messages, tools):
    ours, theirs = Tokenizer(model_dir), hf_auto
    for prompt in (True, False):
        text = ours.apply_chat_template(messages, add_generation_prompt=prompt, tools=tools)
        assert text == theirs.apply_chat_template(messages, tools=tools, tokenize=False,
                                                  add_generation_prompt=prompt)
    assert ours.encode_chat(messages, tools=tools) == ours.encode(text + "<|im_start|>assistant\n",
                                                                  add_special_tokens=False)


def test_template_shows_tools_calls_and_results(model_dir):
    text = Tokenizer(model_dir).apply_chat_template(CONVERSATION, tools=TOOLS)
    system = text[: text.index("<|im_end|>")]
    assert system.startswith("<|begin_of_text|><|im_start|>system\nYou are terse.\n\n# Tools")
    for tool in TOOLS:
        assert "\n" + json.dumps(tool, ensure_ascii=False) + "\n" in system
    assert "Finds <things>" in system  # tojson as Hugging Face's: no HTML escapes
    assert text.count("<|im_start|>system") == 1
    assert ("<|im_start|>user\n<tool_response>\nsunny, 21\n</tool_response>\n<tool_response>\n"
            "rain <3 & more\n</tool_response><|im_end|>") in text
    # an assistant turn as rendered reads back as its calls: the template and parser agree
    turn = text.split("<|im_start|>assistant\n")[1].split("<|im_end|>")[0]
    content, calls = parse(turn, "hermes")
    assert content is None
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"}),
        ("get_weather", {"city": "Zürich", "unit": "c"})]
    last = text.split("<|im_start|>assistant\n")[3].split("<|im_end|>")[0]
    assert parse(last, "hermes")[0] == "Pinging."


def test_model_init_upgrades_an_old_template(model_dir, tmp_path):
    old = tmp_path / "old"
    old.mkdir()
    shutil.copy(model_dir / "tokenizer.json", old)
    cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    (old / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": "{{ x }}"}))
    (old / "model.safetensors").write_bytes(b"weights")  # a built checkpoint: not rebuilt
    build(old)
    assert json.loads((old / "tokenizer_config.json").read_text()) == cfg | {
        "chat_template": CHAT_TEMPLATE}
    assert (old / "model.safetensors").read_bytes() == b"weights"
