"""Qwen3 reasoning: text inside ``<think>...</think>`` is reasoning, the rest is content.

One incremental parser serves streaming and non-streaming alike (non-streaming feeds the whole text
at once), so both return the same split.
"""

from __future__ import annotations

THINK_START = "<think>"
THINK_END = "</think>"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``tag``."""
    for k in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


class ReasoningParser:
    """Feed text deltas; get (reasoning_delta, content_delta) pairs.

    The output is reasoning when it opens with ``<think>`` (leading whitespace allowed); the reasoning
    ends at ``</think>``, after which leading newlines are dropped and everything is content.
    """

    def __init__(self) -> None:
        self._state = "start"  # start -> reasoning -> after_think -> content
        self._held = ""
        self.saw_reasoning = False

    def feed(self, delta: str) -> tuple[str, str]:
        text = self._held + delta
        self._held = ""
        reasoning, content = "", ""
        if self._state == "start":
            stripped = text.lstrip()
            if stripped.startswith(THINK_START):
                self._state = "reasoning"
                self.saw_reasoning = True
                text = stripped[len(THINK_START) :]
            elif THINK_START.startswith(stripped):
                self._held = text  # could still become "<think>"
                return "", ""
            else:
                self._state = "content"
        if self._state == "reasoning":
            end = text.find(THINK_END)
            if end < 0:
                keep = partial_suffix(text, THINK_END)
                self._held = text[len(text) - keep :] if keep else ""
                return text[: len(text) - keep], ""
            reasoning = text[:end]
            text = text[end + len(THINK_END) :]
            self._state = "after_think"
        if self._state == "after_think":
            text = text.lstrip("\n")
            if not text:
                return reasoning, ""
            self._state = "content"
        content = text
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """End of output: release held text (an unclosed ``<think>`` keeps its text as reasoning)."""
        held, self._held = self._held, ""
        if self._state == "reasoning":
            return held, ""
        return "", held


def split_reasoning(text: str) -> tuple[str | None, str]:
    """Non-streaming split: (reasoning or None, content)."""
    parser = ReasoningParser()
    r1, c1 = parser.feed(text)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.saw_reasoning else None), c1 + c2
