"""Checking a completion against a ``ForcedToolCall`` (tool_choice "required" or a named tool).

The embedded engine samples under the constraint by rejection: a token whose text would make
the completion something the constraint cannot become is masked out and the distribution
renormalised (``sampling.sample_token``). What this module decides is only whether a text is
still acceptable:

    <one of the declared names><after_name><a JSON object><closer>   then anything

``check(constraint, text)`` says ``INVALID`` (no continuation of ``text`` satisfies it), ``OPEN``
(some continuation does: with the shortest one, and the characters that may come next) or
``DONE`` (a prefix of ``text`` already satisfies it: the call is complete and the rest is free).
The JSON object is checked by a character-level pushdown automaton (``JsonObjectPrefix``), so a
forced call's arguments always parse.

Invariant (tested): for every valid JSON object ``o``, every prefix of ``json.dumps(o)`` (any
indentation, so long as no run of whitespace exceeds ``MAX_BLANK_RUN``: a model sampled under the
constraint could otherwise loop on whitespace for ever) is ``OPEN`` to the automaton, and the
whole text is complete exactly at its last character.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from .base import ForcedToolCall


class Verdict(Enum):
    INVALID = "invalid"
    OPEN = "open"
    DONE = "done"


@dataclass(frozen=True)
class Progress:
    verdict: Verdict
    # The shortest text that completes the call from here ("" once DONE). Sampling near the end
    # of its token budget only takes tokens that shorten it, so a forced call always closes in time.
    completion: str = ""
    # The characters that may come next (None: any). A pre-filter for the engine's search of
    # allowed tokens: only tokens whose text starts with one of them can be allowed.
    next_chars: frozenset[str] | None = None


_INVALID = Progress(Verdict.INVALID)


def check(constraint: ForcedToolCall, text: str) -> Progress:
    rest = text
    if constraint.names:
        options = [name + constraint.after_name for name in constraint.names]
        chosen = next((o for o in sorted(options, key=len, reverse=True) if rest.startswith(o)), None)
        if chosen is None:
            open_options = [o for o in options if o.startswith(rest)]
            if not open_options:
                return _INVALID
            shortest = min(open_options, key=len)[len(rest) :]
            tail = "{}" if constraint.json_arguments else ""
            return Progress(Verdict.OPEN, shortest + tail + constraint.closer,
                            frozenset(o[len(rest)] for o in open_options))
        rest = rest[len(chosen) :]
    if constraint.json_arguments:
        automaton = JsonObjectPrefix()
        for i, char in enumerate(rest):
            if not automaton.feed(char):
                return _INVALID
            if automaton.complete:
                rest = rest[i + 1 :]
                break
        else:
            return Progress(Verdict.OPEN, automaton.minimal_completion() + constraint.closer, automaton.next_chars())
    if len(rest) < len(constraint.closer):
        if not constraint.closer.startswith(rest):
            return _INVALID
        remaining = constraint.closer[len(rest) :]
        return Progress(Verdict.OPEN, remaining, frozenset(remaining[0]))
    return Progress(Verdict.DONE) if rest.startswith(constraint.closer) else _INVALID


_WHITESPACE = " \t\n\r"
MAX_BLANK_RUN = 64  # a newline and the indentation of pretty-printed arguments fit well within it
_LITERALS = {"t": "true", "f": "false", "n": "null"}
_HEX = set("0123456789abcdefABCDEF")
_DIGITS = set("0123456789")
_NUMBER_ENDS = ("int0", "int", "frac", "exp")  # where a number may end
_NUMBER_NEXT = {"sign": _DIGITS, "int0": set(".eE"), "int": _DIGITS | set(".eE"), "frac_start": _DIGITS,
                "frac": _DIGITS | set("eE"), "exp_start": _DIGITS | set("+-"), "exp_sign": _DIGITS, "exp": _DIGITS}


class JsonObjectPrefix:
    """Feeds characters of one JSON object (leading whitespace allowed); False on the first one
    that no valid object could have there. ``complete`` once the object's last brace is fed."""

    def __init__(self) -> None:
        self.stack: list[str] = []  # "{" or "[" for each open container
        self.expect = "start"  # start | value | key | key_or_end | colon | comma_or_end | value_or_end
        self.string: str | None = None  # "key" or "value" inside a string
        self.escape = 0  # 1 after a backslash; 2..5 while reading \uXXXX's digits
        self.literal = ""  # the rest of true / false / null being read
        self.number = ""  # the state of a number being read ("" = none)
        self.blank_run = 0  # whitespace characters in a row between tokens of the structure
        self.complete = False

    def feed(self, char: str) -> bool:
        if self.complete:
            return False
        if self.string is not None:
            return self._string(char)
        if self.literal:
            if char != self.literal[0]:
                return False
            self.literal = self.literal[1:]
            if not self.literal:
                self._value_done()
            return True
        if self.number:
            if self._number(char):
                return True
            if self.number not in _NUMBER_ENDS:
                return False  # a number cannot end here ("-", "1.", "1e")
            self.number = ""
            self._value_done()  # the character after the number is read in the new state
        return self._structure(char)

    def next_chars(self) -> frozenset[str] | None:
        """The characters that may come next (None: nearly any, inside a string)."""
        if self.string is not None:
            return None if not self.escape else frozenset('"\\/bfnrtu') if self.escape == 1 else frozenset(_HEX)
        if self.literal:
            return frozenset(self.literal[0])
        if self.number:
            goes_on = _NUMBER_NEXT[self.number]
            return frozenset(goes_on | set(",}]" + _WHITESPACE) if self.number in _NUMBER_ENDS else goes_on)
        follow = {"start": "{", "key": '"', "key_or_end": '"}', "colon": ":", "comma_or_end": ",}]"}
        chars = set(follow.get(self.expect, '"{[tfn-0123456789'))
        if self.blank_run < MAX_BLANK_RUN:
            chars |= set(_WHITESPACE)
        if self.expect == "value_or_end":
            chars.add("]")
        return frozenset(chars)

    def minimal_completion(self) -> str:
        """The shortest text that completes the object from here."""
        out = ""
        expect = self.expect
        if self.string is not None:
            out += ("n" if self.escape == 1 else "0" * (6 - self.escape) if self.escape else "") + '"'
            expect = "colon" if self.string == "key" else "comma_or_end"
        elif self.literal:
            out, expect = self.literal, "comma_or_end"
        elif self.number:
            unfinished = self.number in ("sign", "frac_start", "exp_start", "exp_sign")
            out, expect = ("0" if unfinished else ""), "comma_or_end"
        out += {"start": "{", "key": '"":0', "colon": ":0", "value": "0"}.get(expect, "")
        stack = self.stack if expect != "start" else ["{"]
        return out + "".join("}" if opener == "{" else "]" for opener in reversed(stack))

    def _structure(self, char: str) -> bool:
        if char in _WHITESPACE:
            # JSON allows any amount; a model sampled under the constraint can loop on it for ever.
            self.blank_run += 1
            return self.blank_run <= MAX_BLANK_RUN
        self.blank_run = 0
        expect = self.expect
        if expect == "start":
            if char != "{":
                return False
            self.stack.append("{")
            self.expect = "key_or_end"
            return True
        if expect in ("key", "key_or_end"):
            if char == '"':
                self.string = "key"
                return True
            return expect == "key_or_end" and char == "}" and self._close("{")
        if expect == "colon":
            if char != ":":
                return False
            self.expect = "value"
            return True
        if expect == "comma_or_end":
            if char == ",":
                self.expect = "key" if self.stack[-1] == "{" else "value"
                return True
            return char in "}]" and self._close("{" if char == "}" else "[")
        if expect == "value_or_end" and char == "]":
            return self._close("[")
        return self._value_start(char)  # expect: value or value_or_end

    def _value_start(self, char: str) -> bool:
        if char == '"':
            self.string = "value"
        elif char in "{[":
            self.stack.append(char)
            self.expect = "key_or_end" if char == "{" else "value_or_end"
        elif char in _LITERALS:
            self.literal = _LITERALS[char][1:]
        elif char == "-":
            self.number = "sign"
        elif char == "0":
            self.number = "int0"
        elif char.isdigit() and char.isascii():
            self.number = "int"
        else:
            return False
        return True

    def _string(self, char: str) -> bool:
        if self.escape == 1:
            if char == "u":
                self.escape = 2
                return True
            self.escape = 0
            return char in '"\\/bfnrt'
        if self.escape >= 2:
            if char not in _HEX:
                return False
            self.escape = 0 if self.escape == 5 else self.escape + 1
            return True
        if char == "\\":
            self.escape = 1
        elif char == '"':
            kind, self.string = self.string, None
            if kind == "key":
                self.expect = "colon"
            else:
                self._value_done()
        elif ord(char) < 0x20:
            return False
        return True

    def _number(self, char: str) -> bool:
        """Whether ``char`` continues the number (the state moves on)."""
        state, digit = self.number, char.isdigit() and char.isascii()
        moves = {
            ("sign", True): "int0" if char == "0" else "int",
            ("int", True): "int", ("frac_start", True): "frac", ("frac", True): "frac",
            ("exp_start", True): "exp", ("exp_sign", True): "exp", ("exp", True): "exp",
        }
        if (state, digit) in moves and not (state == "sign" and not digit):
            self.number = moves[(state, digit)]
            return True
        if char == "." and state in ("int0", "int"):
            self.number = "frac_start"
            return True
        if char in "eE" and state in ("int0", "int", "frac"):
            self.number = "exp_start"
            return True
        if char in "+-" and state == "exp_start":
            self.number = "exp_sign"
            return True
        return False

    def _value_done(self) -> None:
        self.expect = "comma_or_end"

    def _close(self, opener: str) -> bool:
        if not self.stack or self.stack[-1] != opener:
            return False
        self.stack.pop()
        if self.stack:
            self._value_done()
        else:
            self.complete = True
        return True
