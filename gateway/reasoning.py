"""Reasoning (``<think>...</think>``) split from the answer, whole-text and streaming.

Reasoning models write their chain of thought between think tags before the answer; clients
expect it apart (``reasoning_content``) so that it is neither shown as the answer nor parsed for
tool calls. Only a block at the very start counts: a ``<think>`` later in the text is the model
talking about the tag, and is ordinary content.

Some chat templates (Qwen3-thinking, DeepSeek-R1) open ``<think>`` in the generation prompt
itself; the output then starts inside reasoning and only the closing tag appears, which
``starts_in_reasoning`` says.

The streamer agrees with ``split_reasoning`` however the text is fragmented: the reasoning
pieces concatenate to ``reasoning`` (or "" when it is ``None``) and the content pieces to
``content``. Text that could still be part of a tag is held back until it is decided.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["THINK_CLOSE", "THINK_OPEN", "ReasoningStreamer", "SplitText", "reasoning_token_count", "split_reasoning"]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


@dataclass(frozen=True)
class SplitText:
    """``reasoning`` is ``None`` when there was no reasoning block at all (not merely an empty one)."""

    reasoning: str | None
    content: str


def reasoning_token_count(decode: Callable[[Sequence[int]], str], completion_ids: Sequence[int]) -> int:
    """How many completion tokens were reasoning: up to the one that completes ``</think>``.

    For usage reports (``reasoning_tokens``). A block that never closed is all reasoning. Found by
    bisection over decoded prefixes, so a long completion costs a few decodes, not one per token.
    """
    if THINK_CLOSE not in decode(completion_ids):
        return len(completion_ids)
    low, high = 1, len(completion_ids)
    while low < high:
        middle = (low + high) // 2
        if THINK_CLOSE in decode(completion_ids[:middle]):
            high = middle
        else:
            low = middle + 1
    return low


def split_reasoning(text: str, *, starts_in_reasoning: bool = False) -> SplitText:
    """Split a whole output.

    Reasoning is kept verbatim (its own leading and trailing newlines included); the whitespace
    between ``</think>`` and the answer is layout and is dropped from the content. Reasoning that
    never closes (the generation ran out of tokens) is all reasoning, with empty content.
    """
    if starts_in_reasoning:
        body = text
    else:
        stripped = text.lstrip()
        if not stripped.startswith(THINK_OPEN):
            return SplitText(reasoning=None, content=text)
        body = stripped[len(THINK_OPEN) :]
    end = body.find(THINK_CLOSE)
    if end < 0:
        return SplitText(reasoning=body, content="")
    return SplitText(reasoning=body[:end], content=body[end + len(THINK_CLOSE) :].lstrip())


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker``."""
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


class ReasoningStreamer:
    """Incremental ``split_reasoning`` for one output; pieces are ``("reasoning" | "content", text)``.

    Empty pieces are never produced.
    """

    def __init__(self, *, starts_in_reasoning: bool = False) -> None:
        # "start": deciding whether the output opens with <think>; "reasoning": inside the block;
        # "after": dropping whitespace after </think>; "content": passing everything through.
        self._state = "reasoning" if starts_in_reasoning else "start"
        self._buf = ""
        self._finished = False

    def feed(self, delta: str) -> list[tuple[str, str]]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._state == "content":
            return [("content", delta)] if delta else []
        self._buf += delta
        out: list[tuple[str, str]] = []
        if self._state == "start":
            head = self._buf.lstrip()
            if not head or (len(head) < len(THINK_OPEN) and THINK_OPEN.startswith(head)):
                return out  # still undecided
            if not head.startswith(THINK_OPEN):
                self._state = "content"
                text, self._buf = self._buf, ""
                return [("content", text)]
            self._state = "reasoning"
            self._buf = head[len(THINK_OPEN) :]
        if self._state == "reasoning":
            end = self._buf.find(THINK_CLOSE)
            if end < 0:
                keep = _partial_suffix(self._buf, THINK_CLOSE)
                if len(self._buf) > keep:
                    out.append(("reasoning", self._buf[: len(self._buf) - keep]))
                    self._buf = self._buf[len(self._buf) - keep :]
                return out
            if end > 0:
                out.append(("reasoning", self._buf[:end]))
            self._buf = self._buf[end + len(THINK_CLOSE) :]
            self._state = "after"
        # state "after"
        text = self._buf.lstrip()
        self._buf = ""
        if text:
            self._state = "content"
            out.append(("content", text))
        return out

    def finish(self) -> list[tuple[str, str]]:
        """End of generation: release what was held back."""
        if self._finished:
            return []
        self._finished = True
        text, self._buf = self._buf, ""
        if not text or self._state == "after":
            return []
        # "start": an undecided prefix (whitespace, "<thi") is content, as split_reasoning says.
        return [("reasoning" if self._state == "reasoning" else "content", text)]
