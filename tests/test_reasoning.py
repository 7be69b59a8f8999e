"""Reasoning output: `<think>...</think>` split into reasoning_content and content, whole and
streamed in chunks of every size."""

from __future__ import annotations

import random

import pytest

from cluster.reasoning import ReasoningStream, partial_tail, split


def stream(text: str, starts_in_reasoning: bool, seed: int) -> list[dict]:
    rng = random.Random(seed)
    s = ReasoningStream(starts_in_reasoning)
    out, i = [], 0
    while i < len(text):
        n = 1 if seed == 0 else rng.randint(1, 12)
        out += s.feed(text[i : i + n])
        i += n
    return out + s.finish()


def joined(deltas: list[dict], key: str) -> str | None:
    return "".join(d.get(key, "") for d in deltas) or None


CASES = [  # (text, starts_in_reasoning, reasoning, content)
    ("<think>\nLet me see.\n2+2=4\n</think>\n\nIt is 4.", False, "Let me see.\n2+2=4", "It is 4."),
    ("  <think>x</think>y", False, "x", "y"),
    ("Just an answer, no <think> here.", False, None, "Just an answer, no <think> here."),
    ("<think>cut off while thinking </th", False, "cut off while thinking </th", None),
    ("<think></think>answer", False, None, "answer"),
    ("Okay, so.\n</think>\n\nThe answer.\n", True, "Okay, so.", "The answer.\n"),
    ("<think>\nwith its own tag\n</think>ok", True, "with its own tag", "ok"),
    ("still thinking, a < b, </thin", True, "still thinking, a < b, </thin", None),
    ("a</think></think>b", True, "a", "</think>b"),
    ("<thinking>not the tag</thinking>", False, None, "<thinking>not the tag</thinking>"),
    ("", False, None, None),
    ("", True, None, None),
]


@pytest.mark.parametrize("text,starts,reasoning,content", CASES)
def test_split(text, starts, reasoning, content):
    assert split(text, starts) == (reasoning, content)


@pytest.mark.parametrize("text,starts,reasoning,content", CASES)
def test_streaming_matches_split_in_any_chunks(text, starts, reasoning, content):
    for seed in range(25):
        deltas = stream(text, starts, seed)
        assert (joined(deltas, "reasoning_content"), joined(deltas, "content")) == (
            reasoning, content), seed
        assert all(len(d) == 1 and next(iter(d.values())) for d in deltas)


def test_stream_holds_back_only_a_possible_end_marker():
    s = ReasoningStream(starts_in_reasoning=True)
    assert s.feed("step one</th") == [{"reasoning_content": "step one"}]
    assert s.feed("ere") == [{"reasoning_content": "</there"}]
    assert s.feed(" </think>\n\nDone") == [{"content": "Done"}]
    assert s.feed(" now") == [{"content": " now"}]
    assert s.finish() == []


def test_stream_without_a_think_block_passes_content_through():
    s = ReasoningStream()
    assert s.feed(" <") == []  # could still be "<think>"
    assert s.feed("b>bold</b>") == [{"content": " <b>bold</b>"}]
    assert s.feed("<think>") == [{"content": "<think>"}]  # not at the start: plain text


def test_partial_tail():
    assert partial_tail("abc</th", "</think>") == 4
    assert partial_tail("abc<", "</think>") == 1
    assert partial_tail("abc", "</think>") == 0
    assert partial_tail("</think>", "</think>") == 0  # a whole marker is found, not held
