"""Incremental detokenization with stop strings.

Decoding token by token is wrong for byte-level BPE (a character can span tokens) and for
tokenizers that merge spaces, so each step decodes a short window and emits only the new,
complete suffix. Text that could still become a stop string is held back until it either
completes the stop (the generation ends and the stop text is dropped, as OpenAI does) or
stops matching.
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import TokenizerLike


class IncrementalDetokenizer:
    def __init__(self, tokenizer: TokenizerLike, stop: Sequence[str] = ()):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the window decoded for context
        self._read_offset = 0  # tokens before this have been turned into text
        self._stop = [s for s in stop if s]
        self._pending = ""  # decoded text not yet emitted (a possible stop-string prefix)
        self.matched_stop: str | None = None

    def add(self, token_id: int) -> str:
        """Add a sampled token; return the text that may be shown now."""
        self._ids.append(token_id)
        window = self._ids[self._prefix_offset :]
        before = self._tokenizer.decode(window[: self._read_offset - self._prefix_offset])
        after = self._tokenizer.decode(window)
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return self._release(after[len(before) :])

    def flush(self) -> str:
        """Text still held back at the end of the generation."""
        text, self._pending = self._pending, ""
        return text

    def _release(self, new_text: str) -> str:
        if not self._stop:
            return new_text
        text = self._pending + new_text
        cut = min((i for i in (text.find(s) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.matched_stop = next(s for s in self._stop if text.find(s) == cut)
            self._pending = ""
            return text[:cut]
        hold = max((k for s in self._stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self._pending = text[len(text) - hold :] if hold else ""
        return text[: len(text) - hold]
