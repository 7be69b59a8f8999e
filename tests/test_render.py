"""Response rendering (cluster/render.py) without a cluster: reasoning split and tool calls
in chat choices, streamed and whole; completions logprobs with echo."""

from __future__ import annotations

import json

from cluster import reasoning, tool_calls
from cluster.protocol import TextDelta
from cluster.render import Choice, ChoiceSpec


def pieces(text: str, size: int) -> list[TextDelta]:
    parts = [text[i: i + size] for i in range(0, len(text), size)]
    return [TextDelta(p, "stop" if i == len(parts) - 1 else None, 5, i + 1)
            for i, p in enumerate(parts)]


OUTPUT = ("<think>\nThe user wants 1+2.\n</think>\nLet me add.\n<tool_call>\n"
          '{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>')


def spec() -> ChoiceSpec:
    return ChoiceSpec("chat", str, tool_stream=lambda: tool_calls.ToolCallStream("hermes"),
                      reasoning_stream=lambda: reasoning.ReasoningStream(False))


def test_chat_choice_splits_reasoning_and_reads_tool_calls():
    c = Choice(spec(), 0)
    for d in pieces(OUTPUT, 7):
        c.add(d)
    final = c.final()
    msg = final["message"]
    assert msg["reasoning_content"] == "The user wants 1+2."
    assert msg["content"] == "Let me add."
    assert final["finish_reason"] == "tool_calls"
    (call,) = msg["tool_calls"]
    assert call["function"]["name"] == "add" and call["id"].startswith("call_")
    assert json.loads(call["function"]["arguments"]) == {"a": 1, "b": 2}


def test_streamed_chunks_add_up_to_the_whole_answer():
    for size in (1, 3, 50):
        c = Choice(spec(), 0)
        chunks = [x for d in pieces(OUTPUT, size) if (x := c.add(d)) is not None]
        reasoning_text = "".join(x["delta"].get("reasoning_content", "") for x in chunks)
        content = "".join(x["delta"].get("content", "") for x in chunks)
        args = "".join(tc["function"].get("arguments", "") for x in chunks
                       for tc in x["delta"].get("tool_calls", []))
        assert reasoning_text == "The user wants 1+2." and content == "Let me add."
        assert json.loads(args) == {"a": 1, "b": 2}
        assert chunks[-1]["finish_reason"] == "tool_calls"


def test_completion_echo_logprobs_and_offsets():
    texts = {1: "He", 2: "llo", 3: " you"}
    s = ChoiceSpec("completion", texts.__getitem__, logprobs=1, echo=True,
                   prompt_texts=["Hello"])
    c = Choice(s, 0)
    c.add(TextDelta(" you", "length", 2, 1, token_ids=[3], logprobs=[[-0.5, [3], [-0.5]]],
                    prompt_ids=[1, 2], prompt_logprobs=[None, [-1.0, [2], [-1.0]]]))
    lp = c.final()["logprobs"]
    assert c.final()["text"] == "Hello you"
    assert lp["tokens"] == ["He", "llo", " you"]
    assert lp["token_logprobs"] == [None, -1.0, -0.5]
    assert lp["text_offset"] == [0, 2, 5] and lp["top_logprobs"][0] is None


def test_text_with_tools_keeps_special_markers_but_not_eos(model_dir):
    """Where a model's tool-call markers are special tokens, the parser must see them: a
    stream for a request with tools decodes special tokens, less EOS."""
    from cluster.arch import ModelArch
    from cluster.tokenizer import TextStream, Tokenizer

    tok = Tokenizer(model_dir)
    eos = frozenset(ModelArch.from_hf(model_dir).eos_token_ids)
    special = tok.tok.token_to_id("<|im_start|>")
    ids = tok.encode("hi", add_special_tokens=False) + [special] + sorted(eos)[:1]
    plain, tools = TextStream(tok, []), TextStream(tok, [], eos)
    (a, _), (b, _) = plain.push(ids, "stop"), tools.push(ids, "stop")
    assert a == "hi" and b == "hi<|im_start|>"
