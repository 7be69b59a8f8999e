"""Reasoning-model output (DeepSeek-R1 style): `<think>...</think>` becomes `reasoning_content`,
what follows becomes `content`.

Two kinds of chat template: ones where the model writes `<think>` itself, and ones that end
the prompt with `<think>\\n`, so the output starts inside the reasoning and only `</think>`
appears (`starts_in_reasoning`). A leading `<think>` is taken in either case. Whitespace
around the reasoning and right after `</think>` is dropped (R1 writes `</think>\\n\\n`). An
output cut off before `</think>` is all reasoning. No torch here.
"""

from __future__ import annotations

START, END = "<think>", "</think>"


def partial_tail(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`: what a stream
    must hold back until the next text says whether the marker follows."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def split(text: str, starts_in_reasoning: bool = False) -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output; either is None when empty."""
    stripped = text.lstrip()
    if stripped.startswith(START):
        body = stripped[len(START) :]
    elif starts_in_reasoning:
        body = text
    else:
        return None, text or None
    reasoning, found, content = body.partition(END)
    return reasoning.strip() or None, (content.lstrip() or None) if found else None


class ReasoningStream:
    """Splits streamed output as `split` does: `feed(delta)` and `finish()` return OpenAI
    chat-stream deltas, `{"reasoning_content": ...}` and `{"content": ...}`."""

    def __init__(self, starts_in_reasoning: bool = False):
        self.starts_in_reasoning = starts_in_reasoning
        self.state = "start"  # start -> reasoning -> after -> content, or start -> content
        self.pending = ""  # text held back: a possible marker start, trailing whitespace
        self.reasoned = False  # some reasoning was sent (its leading whitespace is gone)

    def feed(self, delta: str) -> list[dict]:
        return self._run(self.pending + delta, final=False)

    def finish(self) -> list[dict]:
        return self._run(self.pending, final=True)

    def _run(self, buf: str, final: bool) -> list[dict]:
        self.pending = ""
        out: list[dict] = []
        if self.state == "start":
            head = buf.lstrip()
            if head.startswith(START):
                buf, self.state = head[len(START) :], "reasoning"
            elif not final and START.startswith(head):  # whitespace or a part of "<think>"
                self.pending = buf
                return out
            else:
                self.state = "reasoning" if self.starts_in_reasoning else "content"
        if self.state == "reasoning":
            i = buf.find(END)
            if i >= 0:
                self._reason(buf[:i], out, ended=True)
                buf, self.state = buf[i + len(END) :], "after"
            else:
                keep = 0 if final else partial_tail(buf, END)
                self._reason(buf[: len(buf) - keep], out, ended=final)
                self.pending += buf[len(buf) - keep :]
                return out
        if self.state == "after":
            buf = buf.lstrip()
            if buf:
                self.state = "content"
        if self.state == "content" and buf:
            out.append({"content": buf})
        return out

    def _reason(self, text: str, out: list[dict], ended: bool) -> None:
        if not self.reasoned:
            text = text.lstrip()
        body = text.rstrip()
        if body:
            out.append({"reasoning_content": body})
            self.reasoned = True
        if not ended:  # trailing whitespace waits: it is dropped if the reasoning ends here
            self.pending = text[len(body) :]
