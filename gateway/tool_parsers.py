"""Tool calls out of generated text, for the model families the gateway serves.

A model writes its tool calls as text in a family-specific syntax; OpenAI clients expect them as
structured ``tool_calls``. Each family has a ``ToolCallParser`` that does this whole-text
(``parse``) and incrementally (``streamer``), plus ``format_call`` so that the gateway can
re-render an assistant message's calls from history the way the model itself writes them.

Two rules hold for every family, because clients and recording depend on them:

* Nothing is lost. Text that is not a well-formed call, including a call the parser could not
  read, stays in ``content`` verbatim (and a malformed call is counted), so a broken call is
  visible to the client instead of silently vanishing.
* Streaming agrees with ``parse``. However the text is split into fragments, the streamed text
  concatenates to ``parse(text).content`` and the streamed calls equal ``parse(text).tool_calls``
  (ids aside). The streamer holds back text that could still turn out to be the start of a call,
  so marker text is never sent as content for a call that then follows.
"""

from __future__ import annotations

import abc
import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "PARSERS",
    "Hermes",
    "Llama3Json",
    "MalformedToolCall",
    "ParsedOutput",
    "Qwen3Coder",
    "StreamEvent",
    "TextDelta",
    "ToolCall",
    "ToolCallArgsDelta",
    "ToolCallParser",
    "ToolCallStart",
    "ToolCallStreamer",
    "get_parser",
]

_ID_ALPHABET = string.ascii_letters + string.digits
# Streamed arguments are cut into pieces of this many characters: the whole call is known by the
# time it is streamed, but clients should still see (and be tested against) the fragment protocol.
ARGS_FRAGMENT_CHARS = 32


def new_call_id() -> str:
    """An OpenAI-style tool-call id: ``call_`` and 24 random alphanumerics."""
    return "call_" + "".join(secrets.choice(_ID_ALPHABET) for _ in range(24))


@dataclass(frozen=True)
class ToolCall:
    """One well-formed call. ``arguments`` is a JSON object as compact text."""

    id: str
    name: str
    arguments: str


@dataclass
class ParsedOutput:
    """A whole output split into content and calls.

    ``content`` is every piece of text that is not a well-formed call, in order and verbatim
    (whitespace around calls included: the caller decides whether to strip it).
    """

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    malformed: int = 0


@dataclass(frozen=True)
class TextDelta:
    """Content text, to be sent as soon as it cannot be part of a call."""

    text: str


@dataclass(frozen=True)
class ToolCallStart:
    """The first event of a well-formed call; ``index`` counts calls 0, 1, 2... in one output."""

    index: int
    id: str
    name: str


@dataclass(frozen=True)
class ToolCallArgsDelta:
    """A piece of a call's arguments; a call's pieces concatenate to ``ToolCall.arguments``."""

    index: int
    fragment: str


@dataclass(frozen=True)
class MalformedToolCall:
    """A call block that could not be read. Always accompanied by a ``TextDelta`` of ``raw``."""

    raw: str


StreamEvent = TextDelta | ToolCallStart | ToolCallArgsDelta | MalformedToolCall


class ToolCallStreamer(abc.ABC):
    """Incremental parsing of one output. Make a fresh one per generation."""

    @abc.abstractmethod
    def feed(self, delta: str) -> list[StreamEvent]:
        """Take the next piece of generated text; return what can be said about it already."""

    @abc.abstractmethod
    def finish(self) -> list[StreamEvent]:
        """End of generation: flush held-back text; an unterminated call is malformed text."""


class ToolCallParser(abc.ABC):
    """One model family's tool-call syntax. Parsers are stateless; streamers carry the state."""

    name: str

    @abc.abstractmethod
    def parse(self, text: str) -> ParsedOutput:
        """Split a whole output into content and tool calls."""

    @abc.abstractmethod
    def streamer(self) -> ToolCallStreamer:
        """A new incremental parser for one output."""

    @abc.abstractmethod
    def format_call(self, name: str, arguments: dict[str, Any] | str) -> str:
        """One call written the way this family writes it (to re-render history). ``arguments``
        is a JSON object, or the text a client sent as a call's arguments when that text is not
        one (it is written as it is, not dropped)."""


# ---------------------------------------------------------------------------------------------
# Shared helpers


def _reject_constant(token: str) -> Any:
    raise ValueError(f"non-standard JSON constant {token}")


def _loads(text: str) -> Any:
    """``json.loads`` that rejects NaN/Infinity, which ``json.dumps`` would turn into invalid JSON.

    Raises ``ValueError`` for anything that is not standard JSON.
    """
    try:
        return json.loads(text, parse_constant=_reject_constant)
    except RecursionError as exc:  # absurdly deep nesting is not a call either
        raise ValueError("JSON nested too deeply") from exc


def _dumps_arguments(arguments: dict[str, Any]) -> str:
    return json.dumps(arguments, ensure_ascii=False, separators=(",", ":"))


def _normalise_arguments(value: Any) -> dict[str, Any] | None:
    """Arguments as an object; models also write them as a JSON string holding an object.

    Missing or null arguments mean a call without arguments. ``None`` means unusable.
    """
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = _loads(value)
        except ValueError:
            return None
    return value if isinstance(value, dict) else None


def _json_call(obj: Any, *, args_keys: tuple[str, ...]) -> tuple[str, dict[str, Any]] | None:
    """(name, arguments) from a decoded ``{"name": ..., <args_key>: ...}`` object, or ``None``."""
    if not isinstance(obj, dict):
        return None
    name = obj.get("name")
    if not isinstance(name, str) or not name.strip():
        return None
    raw_args = next((obj[key] for key in args_keys if key in obj), None)
    arguments = _normalise_arguments(raw_args)
    if arguments is None:
        return None
    return name, arguments


def _partial_suffix(text: str, marker: str) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of ``marker``.

    That much text must be held back: the next fragment may complete the marker.
    """
    for k in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:k]):
            return k
    return 0


def _call_events(index: int, name: str, arguments: str) -> list[StreamEvent]:
    events: list[StreamEvent] = [ToolCallStart(index=index, id=new_call_id(), name=name)]
    for i in range(0, len(arguments), ARGS_FRAGMENT_CHARS):
        events.append(ToolCallArgsDelta(index=index, fragment=arguments[i : i + ARGS_FRAGMENT_CHARS]))
    return events


# ---------------------------------------------------------------------------------------------
# Families whose calls are <tool_call>...</tool_call> blocks anywhere in the text


class _TaggedBlockParser(ToolCallParser):
    """Calls are blocks between a start and an end marker; only the block body differs by family.

    A block ends at the first end marker after its start (calls do not nest), in ``parse`` and
    in the streamer alike, which is what keeps the two in agreement.
    """

    start_marker = "<tool_call>"
    end_marker = "</tool_call>"

    @abc.abstractmethod
    def _parse_body(self, body: str) -> tuple[str, dict[str, Any]] | None:
        """(name, arguments) from the text between the markers, or ``None`` when malformed."""

    def parse(self, text: str) -> ParsedOutput:
        start, end = self.start_marker, self.end_marker
        content: list[str] = []
        calls: list[ToolCall] = []
        malformed = 0
        pos = 0
        while True:
            s = text.find(start, pos)
            if s < 0:
                content.append(text[pos:])
                break
            content.append(text[pos:s])
            e = text.find(end, s + len(start))
            if e < 0:  # unterminated: the rest of the output is the broken block
                content.append(text[s:])
                malformed += 1
                break
            call = self._parse_body(text[s + len(start) : e])
            if call is None:
                content.append(text[s : e + len(end)])
                malformed += 1
            else:
                calls.append(ToolCall(id=new_call_id(), name=call[0], arguments=_dumps_arguments(call[1])))
            pos = e + len(end)
        return ParsedOutput(content="".join(content), tool_calls=calls, malformed=malformed)

    def streamer(self) -> ToolCallStreamer:
        return _TaggedBlockStreamer(self)


class _TaggedBlockStreamer(ToolCallStreamer):
    """Text streams through until a start marker; a block is buffered whole until its end marker."""

    def __init__(self, parser: _TaggedBlockParser) -> None:
        self._parser = parser
        self._buf = ""
        self._in_block = False
        # Where to resume looking for the end marker, so a long block is not rescanned per fragment.
        self._scan_from = 0
        self._index = 0
        self._finished = False

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        self._buf += delta
        start, end = self._parser.start_marker, self._parser.end_marker
        events: list[StreamEvent] = []
        while True:
            if not self._in_block:
                s = self._buf.find(start)
                if s < 0:
                    keep = _partial_suffix(self._buf, start)
                    if len(self._buf) > keep:
                        events.append(TextDelta(self._buf[: len(self._buf) - keep]))
                        self._buf = self._buf[len(self._buf) - keep :]
                    return events
                if s > 0:
                    events.append(TextDelta(self._buf[:s]))
                self._buf = self._buf[s + len(start) :]
                self._in_block = True
                self._scan_from = 0
            else:
                e = self._buf.find(end, self._scan_from)
                if e < 0:
                    self._scan_from = max(0, len(self._buf) - len(end) + 1)
                    return events
                body, self._buf = self._buf[:e], self._buf[e + len(end) :]
                self._in_block = False
                events.extend(self._block_events(body))

    def finish(self) -> list[StreamEvent]:
        if self._finished:
            return []
        self._finished = True
        rest, self._buf = self._buf, ""
        if self._in_block:
            raw = self._parser.start_marker + rest
            return [MalformedToolCall(raw), TextDelta(raw)]
        return [TextDelta(rest)] if rest else []

    def _block_events(self, body: str) -> list[StreamEvent]:
        call = self._parser._parse_body(body)
        if call is None:
            raw = self._parser.start_marker + body + self._parser.end_marker
            return [MalformedToolCall(raw), TextDelta(raw)]
        events = _call_events(self._index, call[0], _dumps_arguments(call[1]))
        self._index += 1
        return events


class Hermes(_TaggedBlockParser):
    """``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``: Qwen2.5, Qwen3, Hermes.

    Also arborl's fallback prompt format for models without a native one.
    """

    name = "hermes"

    def _parse_body(self, body: str) -> tuple[str, dict[str, Any]] | None:
        try:
            obj = _loads(body)
        except ValueError:
            return None
        # "parameters" is accepted too: models trained on Llama-style data mix the two up.
        return _json_call(obj, args_keys=("arguments", "parameters"))

    def format_call(self, name: str, arguments: dict[str, Any] | str) -> str:
        # Same spacing as the Qwen chat templates' ``tojson``, so re-rendered history matches
        # what the model produced.
        body = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        return f"{self.start_marker}\n{body}\n{self.end_marker}"


_FUNCTION_RE = re.compile(r"\s*<function=([^>\n]*)>(.*)\Z", re.DOTALL)
_PARAM_OPEN = "<parameter="
_PARAM_CLOSE = "</parameter>"
_FUNCTION_CLOSE = "</function>"


class Qwen3Coder(_TaggedBlockParser):
    """Qwen3-Coder's XML calls::

        <tool_call>
        <function=NAME>
        <parameter=P>
        VALUE
        </parameter>
        </function>
        </tool_call>

    Values carry no type, so one is guessed: text that is a JSON number, boolean, null, object or
    array becomes that value; anything else (a JSON string literal included) stays the raw text,
    which is how the chat template writes strings. The guess is wrong for a string parameter
    whose value looks like JSON (``"123"`` comes back as ``123``); only the tool's schema could
    tell, and the parser does not see it.
    """

    name = "qwen3_coder"

    def _parse_body(self, body: str) -> tuple[str, dict[str, Any]] | None:
        m = _FUNCTION_RE.match(body)
        if m is None:
            return None
        name = m.group(1).strip()
        if not name:
            return None
        rest = m.group(2).rstrip()
        # The block already ends at </tool_call>, so a forgotten </function> loses nothing.
        rest = rest.removesuffix(_FUNCTION_CLOSE)
        arguments: dict[str, Any] = {}
        pos = 0
        while True:
            while pos < len(rest) and rest[pos].isspace():
                pos += 1
            if pos == len(rest):
                return name, arguments
            # Anything but a parameter here (stray text) would be dropped; keep the block as text.
            if not rest.startswith(_PARAM_OPEN, pos):
                return None
            gt = rest.find(">", pos)
            if gt < 0:
                return None
            pname = rest[pos + len(_PARAM_OPEN) : gt].strip()
            close = rest.find(_PARAM_CLOSE, gt + 1)
            if not pname or "\n" in pname or close < 0 or pname in arguments:
                return None
            value = rest[gt + 1 : close]
            # A parameter opening inside a value means the previous parameter was never closed.
            if _PARAM_OPEN in value:
                return None
            arguments[pname] = _guess_value(value)
            pos = close + len(_PARAM_CLOSE)

    def format_call(self, name: str, arguments: dict[str, Any] | str) -> str:
        lines = [self.start_marker, f"<function={name}>"]
        if isinstance(arguments, str):  # not a JSON object, so no parameters: the text as it is
            lines.append(arguments)
        else:
            for key, value in arguments.items():
                text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
                lines += [f"{_PARAM_OPEN}{key}>", text, _PARAM_CLOSE]
        lines += [_FUNCTION_CLOSE, self.end_marker]
        return "\n".join(lines)


def _guess_value(raw: str) -> Any:
    """A Qwen3-Coder parameter value: one newline each side is layout, not value."""
    raw = raw.removeprefix("\n")
    raw = raw.removesuffix("\n")
    try:
        value = _loads(raw)
    except ValueError:
        return raw
    return raw if isinstance(value, str) else value


# ---------------------------------------------------------------------------------------------
# Llama 3.1 / 3.2: the whole output is the call(s), or it is plain content


_PYTHON_TAG = "<|python_tag|>"


class Llama3Json(ToolCallParser):
    """``[<|python_tag|>]{"name": ..., "parameters": {...}}[; {...}]*``: Llama 3.1 and 3.2.

    Llama has no closing marker: an output is calls only if, after optional whitespace and
    python tag, it starts with ``{``. Then all of it must be calls; otherwise the whole output
    is one malformed block, since there is no way to tell where a call would have ended.
    """

    name = "llama3_json"

    def parse(self, text: str) -> ParsedOutput:
        body = text.lstrip()
        if body.startswith(_PYTHON_TAG):
            body = body[len(_PYTHON_TAG) :].lstrip()
        if not body.startswith("{"):
            return ParsedOutput(content=text)
        calls = self._parse_calls(body)
        if calls is None:
            return ParsedOutput(content=text, malformed=1)
        return ParsedOutput(
            content="",
            tool_calls=[ToolCall(id=new_call_id(), name=n, arguments=_dumps_arguments(a)) for n, a in calls],
        )

    @staticmethod
    def _parse_calls(body: str) -> list[tuple[str, dict[str, Any]]] | None:
        decoder = json.JSONDecoder(parse_constant=_reject_constant)
        calls: list[tuple[str, dict[str, Any]]] = []
        pos = 0
        while True:
            try:
                obj, pos = decoder.raw_decode(body, pos)
            except (ValueError, RecursionError):
                return None
            call = _json_call(obj, args_keys=("parameters", "arguments"))
            if call is None:
                return None
            calls.append(call)
            while pos < len(body) and body[pos].isspace():
                pos += 1
            if pos == len(body):
                return calls
            if body[pos] != ";":
                return None
            pos += 1
            while pos < len(body) and body[pos].isspace():
                pos += 1
            if pos == len(body):  # a trailing separator is harmless
                return calls

    def streamer(self) -> ToolCallStreamer:
        return _Llama3Streamer(self)

    def format_call(self, name: str, arguments: dict[str, Any] | str) -> str:
        return json.dumps({"name": name, "parameters": arguments}, ensure_ascii=False)


class _Llama3Streamer(ToolCallStreamer):
    """Decides at the first non-whitespace character: a call is buffered to the end, text streams."""

    def __init__(self, parser: Llama3Json) -> None:
        self._parser = parser
        self._buf = ""
        self._mode = "undecided"  # -> "text" | "calls"
        self._finished = False

    def feed(self, delta: str) -> list[StreamEvent]:
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if self._mode == "text":
            return [TextDelta(delta)] if delta else []
        self._buf += delta
        if self._mode == "calls":
            return []
        head = self._buf.lstrip()
        if not head or (len(head) < len(_PYTHON_TAG) and _PYTHON_TAG.startswith(head)):
            return []  # whitespace (dropped if a call follows) or a partial python tag
        if head.startswith(("{", _PYTHON_TAG)):
            self._mode = "calls"
            return []
        self._mode = "text"
        text, self._buf = self._buf, ""
        return [TextDelta(text)]

    def finish(self) -> list[StreamEvent]:
        if self._finished:
            return []
        self._finished = True
        text, self._buf = self._buf, ""
        # Whatever was buffered is judged exactly as parse() judges it.
        parsed = self._parser.parse(text)
        events: list[StreamEvent] = []
        if parsed.malformed:
            events.append(MalformedToolCall(parsed.content))
        if parsed.content:
            events.append(TextDelta(parsed.content))
        for index, call in enumerate(parsed.tool_calls):
            events.extend(_call_events(index, call.name, call.arguments))
        return events


# ---------------------------------------------------------------------------------------------

PARSERS: dict[str, type[ToolCallParser]] = {
    Hermes.name: Hermes,
    Qwen3Coder.name: Qwen3Coder,
    Llama3Json.name: Llama3Json,
}


def get_parser(name: str) -> ToolCallParser:
    """A parser by family name (as configured per model)."""
    try:
        cls = PARSERS[name]
    except KeyError:
        known = ", ".join(sorted(PARSERS))
        raise KeyError(f"unknown tool-call parser {name!r}; known parsers: {known}") from None
    return cls()
