"""Tool-call parsers: each family's syntax, malformed calls kept as text, and streaming that agrees
with whole-text parsing however the output is fragmented."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from arborl.gateway.tool_parsers import (
    PARSERS,
    MalformedToolCall,
    ParsedOutput,
    TextDelta,
    ToolCallArgsDelta,
    ToolCallParser,
    ToolCallStart,
    get_parser,
)

ID_RE = re.compile(r"call_[A-Za-z0-9]{24}")


def _calls(parsed: ParsedOutput) -> list[tuple[str, dict]]:
    for call in parsed.tool_calls:
        assert ID_RE.fullmatch(call.id)
        # Arguments are compact JSON text of an object.
        args = json.loads(call.arguments)
        assert isinstance(args, dict)
        assert call.arguments == json.dumps(args, ensure_ascii=False, separators=(",", ":"))
    return [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls]


# ---------------------------------------------------------------------------------------------
# Registry


def test_registry():
    assert set(PARSERS) == {"hermes", "qwen3_coder", "llama3_json"}
    for name in PARSERS:
        parser = get_parser(name)
        assert isinstance(parser, ToolCallParser)
        assert parser.name == name


def test_unknown_parser_is_a_clear_key_error():
    with pytest.raises(KeyError, match="unknown tool-call parser 'nope'.*hermes"):
        get_parser("nope")


# ---------------------------------------------------------------------------------------------
# hermes

hermes = get_parser("hermes")


def test_hermes_one_call():
    text = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    out = hermes.parse(text)
    assert out.content == "" and out.malformed == 0
    assert _calls(out) == [("get_weather", {"city": "Paris"})]
    assert out.tool_calls[0].arguments == '{"city":"Paris"}'


def test_hermes_two_calls_with_surrounding_text():
    text = (
        "Let me check.\n"
        '<tool_call>{"name": "a", "arguments": {"x": 1}}</tool_call>\n'
        '<tool_call>  {"name": "b", "arguments": {}}\n\n</tool_call>'
        " Done."
    )
    out = hermes.parse(text)
    assert out.content == "Let me check.\n\n Done."
    assert _calls(out) == [("a", {"x": 1}), ("b", {})]
    assert out.tool_calls[0].id != out.tool_calls[1].id


def test_hermes_no_calls():
    out = hermes.parse("Just text, with a < and a <tool tag.")
    assert out == ParsedOutput(content="Just text, with a < and a <tool tag.", tool_calls=[], malformed=0)


def test_hermes_arguments_as_string_are_normalised():
    text = '<tool_call>{"name": "f", "arguments": "{\\"q\\": \\"ü\\", \\"n\\": [1, 2]}"}</tool_call>'
    out = hermes.parse(text)
    assert _calls(out) == [("f", {"q": "ü", "n": [1, 2]})]
    assert out.tool_calls[0].arguments == '{"q":"ü","n":[1,2]}'


def test_hermes_missing_arguments_mean_no_arguments():
    assert _calls(hermes.parse('<tool_call>{"name": "now"}</tool_call>')) == [("now", {})]


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>{not json}</tool_call>",
        '<tool_call>{"arguments": {}}</tool_call>',  # missing name
        '<tool_call>{"name": 3, "arguments": {}}</tool_call>',  # name not a string
        '<tool_call>{"name": "", "arguments": {}}</tool_call>',  # empty name
        '<tool_call>["f", {}]</tool_call>',  # not an object
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',  # arguments not an object
        '<tool_call>{"name": "f", "arguments": "not json"}</tool_call>',
        '<tool_call>{"name": "f", "arguments": {"x": NaN}}</tool_call>',  # not standard JSON
        '<tool_call>{"name": "f"} trailing</tool_call>',
    ],
)
def test_hermes_malformed_block_is_kept_as_text(block: str):
    text = f"before {block} after"
    out = hermes.parse(text)
    assert out.content == text
    assert out.tool_calls == []
    assert out.malformed == 1


def test_hermes_malformed_between_good_calls():
    good = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    bad = "<tool_call>{oops</tool_call>"
    out = hermes.parse(good + bad + good)
    assert out.content == bad and out.malformed == 1
    assert [c.name for c in out.tool_calls] == ["f", "f"]


def test_hermes_unterminated_block_at_end_is_malformed():
    text = 'Sure. <tool_call>{"name": "f", "arguments": {"a": 1}}'
    out = hermes.parse(text)
    assert out.content == text and out.malformed == 1 and out.tool_calls == []


def test_hermes_format_call():
    assert (
        hermes.format_call("f", {"a": "ü"})
        == '<tool_call>\n{"name": "f", "arguments": {"a": "ü"}}\n</tool_call>'
    )


# ---------------------------------------------------------------------------------------------
# qwen3_coder

qwen = get_parser("qwen3_coder")

QWEN_CALL = (
    "<tool_call>\n<function=run>\n"
    "<parameter=cmd>\nls -la\n/tmp\n</parameter>\n"
    "<parameter=timeout>\n30\n</parameter>\n"
    '<parameter=opts>\n{"a": [1, true, null]}\n</parameter>\n'
    '<parameter=quoted>\n"hi"\n</parameter>\n'
    "</function>\n</tool_call>"
)


def test_qwen3_coder_one_call_with_value_typing():
    out = qwen.parse(QWEN_CALL)
    assert out.content == "" and out.malformed == 0
    assert _calls(out) == [
        ("run", {"cmd": "ls -la\n/tmp", "timeout": 30, "opts": {"a": [1, True, None]}, "quoted": '"hi"'})
    ]


def test_qwen3_coder_two_calls_with_text():
    second = "<tool_call>\n<function=noop>\n</function>\n</tool_call>"
    text = "I'll run it.\n" + QWEN_CALL + "\n" + second + "\nok"
    out = qwen.parse(text)
    assert out.content == "I'll run it.\n\n\nok"
    assert [c.name for c in out.tool_calls] == ["run", "noop"]
    assert out.tool_calls[1].arguments == "{}"


def test_qwen3_coder_value_newlines_only_one_each_side_stripped():
    text = "<tool_call><function=f><parameter=s>\n\n  x  \n\n</parameter></function></tool_call>"
    assert _calls(qwen.parse(text)) == [("f", {"s": "\n  x  \n"})]


def test_qwen3_coder_missing_function_close_is_tolerated():
    text = "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</tool_call>"
    assert _calls(qwen.parse(text)) == [("f", {"a": 1})]


@pytest.mark.parametrize(
    "block",
    [
        "<tool_call>\n<parameter=a>\n1\n</parameter>\n</tool_call>",  # no <function=
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>",  # unclosed parameter
        "<tool_call>\n<function=f>\n<parameter=a>\n1\n<parameter=b>\n2\n</parameter>\n</function>\n</tool_call>",
        "<tool_call>\n<function=>\n</function>\n</tool_call>",  # empty name
        "<tool_call>\n<function=f>\nstray text\n</function>\n</tool_call>",
        (
            "<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n<parameter=a>\n2\n</parameter>\n"
            "</function>\n</tool_call>"
        ),  # duplicate parameter
        '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',  # hermes syntax
    ],
)
def test_qwen3_coder_malformed_block_is_kept_as_text(block: str):
    text = "x " + block + " y"
    out = qwen.parse(text)
    assert out.content == text and out.malformed == 1 and out.tool_calls == []


def test_qwen3_coder_unterminated_block_at_end_is_malformed():
    text = "go\n<tool_call>\n<function=f>\n<parameter=a>\n1\n</parameter>\n</function>\n"
    out = qwen.parse(text)
    assert out.content == text and out.malformed == 1


def test_qwen3_coder_format_call():
    assert qwen.format_call("f", {"s": "a b", "n": 2, "o": {"k": "ü"}}) == (
        "<tool_call>\n<function=f>\n"
        "<parameter=s>\na b\n</parameter>\n"
        "<parameter=n>\n2\n</parameter>\n"
        '<parameter=o>\n{"k": "ü"}\n</parameter>\n'
        "</function>\n</tool_call>"
    )


# ---------------------------------------------------------------------------------------------
# llama3_json

llama = get_parser("llama3_json")


def test_llama3_one_call():
    out = llama.parse('{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert out.content == "" and out.malformed == 0
    assert _calls(out) == [("get_weather", {"city": "Oslo"})]


def test_llama3_python_tag_and_arguments_key():
    out = llama.parse('  <|python_tag|>{"name": "f", "arguments": {"a": 1}}')
    assert out.content == "" and _calls(out) == [("f", {"a": 1})]


def test_llama3_two_calls_separated_by_semicolon():
    text = '{"name": "a", "parameters": {"s": "x;y"}}; {"name": "b", "parameters": {}};\n'
    out = llama.parse(text)
    assert out.content == ""
    assert _calls(out) == [("a", {"s": "x;y"}), ("b", {})]


def test_llama3_arguments_as_string_are_normalised():
    out = llama.parse('{"name": "f", "parameters": "{\\"a\\": 1}"}')
    assert _calls(out) == [("f", {"a": 1})]


def test_llama3_plain_text_is_content():
    for text in ["The answer is {x}.", "", "  \n", "<|python_tag|>print('hi')", "<b>{}</b>"]:
        assert llama.parse(text) == ParsedOutput(content=text, tool_calls=[], malformed=0)


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "f", "parameters": {"a": 1}',  # unterminated
        '{"parameters": {}}',  # missing name
        '{"name": "f", "parameters": {}} and then some text',
        '{"name": "f", "parameters": {}}; {"oops"}',
        '<|python_tag|>{"name": "f", "parameters": []}',
        "{not json at all}",
    ],
)
def test_llama3_malformed_is_kept_as_text(text: str):
    out = llama.parse(text)
    assert out.content == text and out.malformed == 1 and out.tool_calls == []


def test_llama3_format_call():
    assert llama.format_call("f", {"a": 1}) == '{"name": "f", "parameters": {"a": 1}}'


# ---------------------------------------------------------------------------------------------
# format_call -> parse round trip

ROUND_TRIP_ARGS = [
    {},
    {"city": "Paris"},
    {"n": 3, "x": 1.5, "flag": False, "nothing": None},
    {"text": "multi\nline\n\nwith trailing newline\n", "unicode": "naïve — 日本"},
    {"nested": {"list": [1, {"a": "b"}], "empty": {}}, "arr": ["x", 2]},
    {"code": 'print("<tool_call>?")\n'},
    {"leading": "\nstarts with newline", "spaces": "  padded  "},
    {"empty": ""},
]


@pytest.mark.parametrize("family", sorted(PARSERS))
@pytest.mark.parametrize("arguments", ROUND_TRIP_ARGS)
def test_format_call_round_trip(family: str, arguments: dict):
    parser = get_parser(family)
    out = parser.parse(parser.format_call("my_tool", arguments))
    assert out.malformed == 0 and out.content == ""
    assert _calls(out) == [("my_tool", arguments)]


@pytest.mark.parametrize("family", ["hermes", "qwen3_coder"])
def test_format_call_round_trip_several_calls(family: str):
    parser = get_parser(family)
    text = "\n".join(parser.format_call(f"t{i}", args) for i, args in enumerate(ROUND_TRIP_ARGS))
    out = parser.parse(text)
    assert out.malformed == 0
    assert _calls(out) == [(f"t{i}", args) for i, args in enumerate(ROUND_TRIP_ARGS)]


def test_llama3_round_trip_several_calls():
    text = "; ".join(llama.format_call(f"t{i}", args) for i, args in enumerate(ROUND_TRIP_ARGS))
    assert _calls(llama.parse(text)) == [(f"t{i}", args) for i, args in enumerate(ROUND_TRIP_ARGS)]


# ---------------------------------------------------------------------------------------------
# Streaming


def _stream(parser: ToolCallParser, fragments: list[str]) -> list:
    streamer = parser.streamer()
    events = [e for f in fragments for e in streamer.feed(f)]
    return events + streamer.finish()


def _summarise(events: list) -> tuple[str, list[tuple[str, str]], int]:
    """(content, [(name, arguments)], malformed), checking the event protocol on the way."""
    text: list[str] = []
    calls: list[list[str]] = []  # [name, arguments so far]
    malformed = 0
    pending_raw: str | None = None
    for event in events:
        if pending_raw is not None:
            assert event == TextDelta(pending_raw), "MalformedToolCall must come with its raw text"
            pending_raw = None
        if isinstance(event, TextDelta):
            assert event.text, "empty text deltas are noise"
            text.append(event.text)
        elif isinstance(event, ToolCallStart):
            assert event.index == len(calls)
            assert ID_RE.fullmatch(event.id)
            calls.append([event.name, ""])
        elif isinstance(event, ToolCallArgsDelta):
            assert calls and event.index == len(calls) - 1, "fragments belong to the current call"
            assert event.fragment
            calls[-1][1] += event.fragment
        elif isinstance(event, MalformedToolCall):
            malformed += 1
            pending_raw = event.raw
        else:  # pragma: no cover
            pytest.fail(f"unexpected event {event!r}")
    assert pending_raw is None
    return "".join(text), [(n, a) for n, a in calls], malformed


def _random_split(rng: random.Random, text: str) -> list[str]:
    if len(text) < 2:
        return [text]
    mode = rng.random()
    if mode < 0.3:  # few large pieces
        k = rng.randint(0, min(4, len(text) - 1))
    elif mode < 0.6:  # token-sized pieces
        k = len(text) // rng.randint(2, 6)
    else:  # anything
        k = rng.randint(0, len(text) - 1)
    cuts = sorted(rng.sample(range(1, len(text)), k))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _pieces_for(family: str, rng: random.Random) -> list[str]:
    """Building blocks for random outputs: good calls, broken calls, and confusing text."""
    parser = get_parser(family)
    good = [
        parser.format_call("f", {}),
        parser.format_call("get_weather", {"city": "Paris", "days": 3}),
        parser.format_call("write", {"path": "a.txt", "text": "line1\nline2 <tool_call> " + "x" * 50}),
    ]
    text = ["Hello", " ", "\n", "<", "<tool", "<tool_call", "</tool_call>", "tool_call>", "ü→", "{", "}", ";"]
    if family == "hermes":
        bad = ["<tool_call>{bad json}</tool_call>", '<tool_call>{"arguments": {}}</tool_call>', "<tool_call>"]
    elif family == "qwen3_coder":
        bad = [
            "<tool_call>\n<parameter=a>\n1\n</parameter>\n</tool_call>",
            "<tool_call>\n<function=f>\n<parameter=a>\n1\n</function>\n</tool_call>",
            "<tool_call>\n<function=f>",
        ]
    else:
        bad = []
    return good * 2 + bad + text


def _examples(family: str, rng: random.Random, n: int) -> list[str]:
    parser = get_parser(family)
    fixed = {
        "hermes": [
            (
                'Let me check.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
                '<tool_call>\n{"name": "b", "arguments": "{\\"y\\": 2}"}\n</tool_call>'
            ),
            "text < more text <tool but not a call",
            "<tool_call>{broken}</tool_call> then <tool_call>",
            '<tool_call>{"name": "f", "arguments": {"a": "</tool"}}</tool_call>',
        ],
        "qwen3_coder": [QWEN_CALL, "a <tool_call>\n<function=f>\n<parameter=x>\n1\n", "<<tool_call>>"],
        "llama3_json": [
            '{"name": "a", "parameters": {"s": "x;y"}}; {"name": "b", "parameters": {}}',
            '  \n<|python_tag|>{"name": "f", "arguments": {"a": 1}}',
            "<|python_tag|>print(1)",
            "<|python_ta",
            "<|pyth0n_tag|> nope",
            "  plain text { with braces }",
            '{"name": "f"',
            "{",
            "   ",
            "<",
        ],
    }[family]
    examples = ["", "plain", *fixed]
    if family == "llama3_json":
        calls = [llama.format_call("t", a) for a in ROUND_TRIP_ARGS]
        for _ in range(n):
            k = rng.randint(1, 3)
            body = ";".join(rng.choice([" ", "", "\n"]) + rng.choice(calls) for _ in range(k))
            prefix = rng.choice(["", " ", "\n", "<|python_tag|>", " <|python_tag|> "])
            suffix = rng.choice(["", ";", " ", " junk", "}"])
            examples.append(prefix + body + suffix)
    else:
        pieces = _pieces_for(family, rng)
        for _ in range(n):
            examples.append("".join(rng.choice(pieces) for _ in range(rng.randint(1, 8))))
    assert any(parser.parse(e).tool_calls for e in examples)
    return examples


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_streaming_matches_parse_under_random_fragmentation(family: str):
    parser = get_parser(family)
    rng = random.Random(f"stream-{family}")
    for text in _examples(family, rng, n=150):
        parsed = parser.parse(text)
        expected = (parsed.content, [(c.name, c.arguments) for c in parsed.tool_calls], parsed.malformed)
        splits = [[text], list(text)] + [_random_split(rng, text) for _ in range(15)]
        for fragments in splits:
            assert "".join(fragments) == text
            assert _summarise(_stream(parser, fragments)) == expected, (text, fragments)


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_streamed_arguments_come_in_several_fragments(family: str):
    parser = get_parser(family)
    text = parser.format_call("write", {"path": "/tmp/x", "text": "y" * 100})
    events = _stream(parser, [text])
    assert sum(isinstance(e, ToolCallArgsDelta) for e in events) > 1
    assert isinstance(events[0], ToolCallStart) and events[0].name == "write"


@pytest.mark.parametrize("family", ["hermes", "qwen3_coder"])
def test_marker_prefix_is_never_leaked_as_text(family: str):
    parser = get_parser(family)
    call = parser.format_call("f", {"a": 1})
    streamer = parser.streamer()
    assert streamer.feed("Hi ") == [TextDelta("Hi ")]  # plain text goes out immediately
    # Feed the call one character at a time: no text may come out while the marker is spelled.
    events = []
    for ch in call:
        events += streamer.feed(ch)
    events += streamer.finish()
    assert not any(isinstance(e, TextDelta) for e in events)
    assert [type(e) for e in events][:2] == [ToolCallStart, ToolCallArgsDelta]


@pytest.mark.parametrize("family", ["hermes", "qwen3_coder"])
def test_held_back_prefix_is_released_when_it_is_not_a_marker(family: str):
    streamer = get_parser(family).streamer()
    assert streamer.feed("a <") == [TextDelta("a ")]
    assert streamer.feed("tool") == []
    assert streamer.feed("box> b") == [TextDelta("<toolbox> b")]
    assert streamer.feed("<tool_cal") == []
    assert streamer.finish() == [TextDelta("<tool_cal")]


def test_hermes_streaming_malformed_and_unterminated():
    streamer = hermes.streamer()
    events = streamer.feed("<tool_call>{bad}</tool_call>x<tool_call>{")
    assert events == [
        MalformedToolCall("<tool_call>{bad}</tool_call>"),
        TextDelta("<tool_call>{bad}</tool_call>"),
        TextDelta("x"),
    ]
    assert streamer.finish() == [MalformedToolCall("<tool_call>{"), TextDelta("<tool_call>{")]


def test_streaming_indices_count_only_good_calls():
    good = hermes.format_call("g", {})
    events = _stream(hermes, [good, "<tool_call>nope</tool_call>", good])
    starts = [e for e in events if isinstance(e, ToolCallStart)]
    assert [s.index for s in starts] == [0, 1]
    assert len({s.id for s in starts}) == 2


def test_llama3_streaming_decides_at_first_character():
    streamer = llama.streamer()
    assert streamer.feed("  ") == []
    assert streamer.feed("The") == [TextDelta("  The")]
    assert streamer.feed(" answer {x}") == [TextDelta(" answer {x}")]
    assert streamer.finish() == []

    streamer = llama.streamer()
    assert streamer.feed('\n{"name": "f", ') == []
    assert streamer.feed('"parameters": {"a": 1}}') == []
    events = streamer.finish()
    assert isinstance(events[0], ToolCallStart) and events[0].name == "f"
    assert "".join(e.fragment for e in events[1:]) == '{"a":1}'

    streamer = llama.streamer()
    assert streamer.feed("<|python") == []
    assert streamer.feed("_tag|>") == []
    assert streamer.feed("print(2)") == []
    assert streamer.finish() == [TextDelta("<|python_tag|>print(2)")]

    streamer = llama.streamer()
    assert streamer.feed("<|pyt") == []
    assert streamer.feed("x") == [TextDelta("<|pytx")]


def test_llama3_streaming_malformed():
    events = _stream(llama, ['{"name": "f", "param', 'eters": {}} trailing'])
    text = '{"name": "f", "parameters": {}} trailing'
    assert events == [MalformedToolCall(text), TextDelta(text)]


@pytest.mark.parametrize("family", sorted(PARSERS))
def test_feed_after_finish_is_an_error(family: str):
    streamer = get_parser(family).streamer()
    streamer.finish()
    with pytest.raises(RuntimeError):
        streamer.feed("x")
    assert streamer.finish() == []
