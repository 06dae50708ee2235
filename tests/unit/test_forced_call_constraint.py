"""The forced-tool-call constraint: its JSON automaton against Python's json, and the call's phases."""

from __future__ import annotations

import json
import random

import pytest

from arborl.gateway.engines.base import ForcedToolCall
from arborl.gateway.engines.constraints import JsonObjectPrefix, Verdict, check

HERMES = ForcedToolCall(names=("get_weather", "get"), after_name='", "arguments": ', json_arguments=True,
                        closer="}\n</tool_call>")


def _value(rng: random.Random, depth: int):
    kind = rng.random()
    if depth > 4 or kind < 0.35:
        return rng.choice([0, -1, 12, 3.5, -0.25, 1e-7, 2.5e10, True, False, None, "", "a", 'q"uote', "back\\slash",
                           "tab\tline\nend", "\u00e9\u4e2d\U0001f600", "\x01"])
    if kind < 0.65:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    keys = ["k", "key", "\u00fc", 'x"y']
    return {rng.choice(keys) + str(i): _value(rng, depth + 1) for i in range(rng.randint(0, 3))}


def _feed(text: str) -> tuple[bool, bool, int]:
    """(all accepted, complete, index where it completed or -1)."""
    automaton = JsonObjectPrefix()
    for i, char in enumerate(text):
        if not automaton.feed(char):
            return False, automaton.complete, -1
        if automaton.complete:
            return True, True, i
    return True, automaton.complete, -1


@pytest.mark.parametrize("seed", range(3))
def test_every_prefix_of_a_json_object_is_accepted_and_completes_at_its_end(seed):
    rng = random.Random(seed)
    for _ in range(300):
        obj = {f"a{i}": _value(rng, 1) for i in range(rng.randint(0, 4))}
        text = json.dumps(obj, ensure_ascii=rng.random() < 0.5, indent=rng.choice([None, 1, 4]))
        accepted, complete, at = _feed(text)
        assert accepted and complete and at == len(text) - 1, text
        for cut in range(len(text) - 1):
            accepted, complete, _ = _feed(text[:cut])
            assert accepted and not complete, text[:cut]


@pytest.mark.parametrize("text", ['[1]', '"x"', "{,}", '{"a" 1}', '{"a": 01}', '{"a": 1.}', '{"a": -}',
                                  '{"a": tru}', '{"a": NaN}', '{"a": [1,]}', '{"a": "\\x"}', '{"a": "\\u12g4"}',
                                  '{"a": 1]', '{"a": "line\nbreak"}', "{'a': 1}", '{"a": 1}}'])
def test_what_is_not_exactly_one_json_object_is_refused(text):
    """Not an object, not standard JSON (NaN, which Python's json would take), or more than one."""
    accepted, complete, at = _feed(text)
    assert not (accepted and complete and at == len(text) - 1), (accepted, complete, at)


def test_the_call_must_name_a_declared_tool_then_carry_parseable_arguments():
    ok = 'get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert check(HERMES, ok).verdict is Verdict.DONE
    assert check(HERMES, ok + "\nthen anything at all").verdict is Verdict.DONE
    for cut in range(len(ok)):
        assert check(HERMES, ok[:cut]).verdict is Verdict.OPEN, ok[:cut]
    assert check(HERMES, 'get", "arguments": {}}\n</tool_call>').verdict is Verdict.DONE  # a name that prefixes another
    assert check(HERMES, "weather_city_Paris").verdict is Verdict.INVALID
    assert check(HERMES, 'get_weathers"').verdict is Verdict.INVALID
    assert check(HERMES, 'get_weather", "arguments": {"city": Paris}').verdict is Verdict.INVALID
    assert check(HERMES, 'get_weather", "arguments": {"city": "Paris"}]').verdict is Verdict.INVALID


def test_a_named_choice_constrains_only_the_arguments():
    named = ForcedToolCall(names=(), after_name="", json_arguments=True, closer="}")
    assert check(named, ' {"q": [1, 2]}}').verdict is Verdict.DONE
    assert check(named, ' {"q": [1, 2').verdict is Verdict.OPEN
    assert check(named, "oops").verdict is Verdict.INVALID
    xml = ForcedToolCall(names=("run",), after_name=">\n", json_arguments=False, closer="")
    assert check(xml, "run>\n<parameter=cmd>").verdict is Verdict.DONE and check(xml, "ru").verdict is Verdict.OPEN
    assert check(xml, "rm>").verdict is Verdict.INVALID


def test_the_shortest_completion_completes_and_the_next_characters_are_the_ones_accepted():
    """From every prefix of a call: appending ``completion`` makes it DONE, and a character is
    accepted next only if it is among ``next_chars`` (when those are given)."""
    rng = random.Random(7)
    probes = [chr(c) for c in range(32, 127)] + ["\u00e9", "\n"]
    for _ in range(12):
        arguments = json.dumps({f"a{i}": _value(rng, 1) for i in range(rng.randint(0, 3))})
        text = rng.choice(["get_weather", "get"]) + '", "arguments": ' + arguments + "}\n</tool_call>"
        for cut in range(len(text)):
            progress = check(HERMES, text[:cut])
            assert progress.verdict is Verdict.OPEN, text[:cut]
            assert check(HERMES, text[:cut] + progress.completion).verdict is Verdict.DONE, (text[:cut], progress)
            if progress.next_chars is not None:
                for char in probes:
                    if check(HERMES, text[:cut] + char).verdict is not Verdict.INVALID:
                        assert char in progress.next_chars, (text[:cut], char)
