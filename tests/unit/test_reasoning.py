"""Reasoning split: whole-text rules, and streaming that agrees with them under any fragmentation."""

from __future__ import annotations

import itertools
import random

import pytest

from arborl.gateway.reasoning import ReasoningStreamer, SplitText, split_reasoning


def test_think_block_at_start_is_reasoning():
    assert split_reasoning("<think>\nLet me see.\n</think>\n\nThe answer is 4.") == SplitText(
        reasoning="\nLet me see.\n", content="The answer is 4."
    )


def test_leading_whitespace_before_think_is_allowed():
    assert split_reasoning("\n  <think>hmm</think>ok") == SplitText(reasoning="hmm", content="ok")


def test_no_think_block():
    assert split_reasoning("Just an answer.\n") == SplitText(reasoning=None, content="Just an answer.\n")


def test_think_later_in_text_is_content():
    text = "Use the <think> tag like <think>this</think>."
    assert split_reasoning(text) == SplitText(reasoning=None, content=text)


def test_unclosed_reasoning_is_all_reasoning():
    assert split_reasoning("<think>still thinking") == SplitText(reasoning="still thinking", content="")


def test_empty_reasoning_block():
    assert split_reasoning("<think></think>\n\nHi") == SplitText(reasoning="", content="Hi")


def test_starts_in_reasoning():
    assert split_reasoning("thinking...\n</think>\n\nAnswer", starts_in_reasoning=True) == SplitText(
        reasoning="thinking...\n", content="Answer"
    )
    assert split_reasoning("never closed", starts_in_reasoning=True) == SplitText("never closed", "")
    assert split_reasoning("", starts_in_reasoning=True) == SplitText("", "")


def test_starts_in_reasoning_ignores_open_tag_search():
    # The prompt opened the block, so a <think> in the output is just reasoning text.
    assert split_reasoning("a <think> b</think>c", starts_in_reasoning=True) == SplitText("a <think> b", "c")


def test_content_after_close_keeps_later_tags():
    assert split_reasoning("<think>r</think> x </think> y") == SplitText("r", "x </think> y")


def test_streaming_emits_early_and_holds_partial_tags():
    s = ReasoningStreamer()
    assert s.feed("<thi") == []
    assert s.feed("nk>abc</th") == [("reasoning", "abc")]
    assert s.feed("ink>") == []
    assert s.feed("\n\n") == []
    assert s.feed("Answer") == [("content", "Answer")]
    assert s.feed(" more") == [("content", " more")]
    assert s.finish() == []


def test_streaming_partial_open_tag_that_is_not_a_tag():
    s = ReasoningStreamer()
    assert s.feed("<th") == []
    assert s.feed("ere") == [("content", "<there")]


def test_streaming_held_close_prefix_released_when_not_a_tag():
    s = ReasoningStreamer(starts_in_reasoning=True)
    assert s.feed("a </") == [("reasoning", "a ")]
    assert s.feed("b>") == [("reasoning", "</b>")]
    assert s.feed("</think") == []
    assert s.finish() == [("reasoning", "</think")]


EXAMPLES = [
    "",
    " ",
    "\n\n",
    "plain answer",
    "<",
    "<think",
    "<think>",
    "  <thin",
    "<think>r",
    "<think>r</",
    "<think>r</think",
    "<think>r</think>",
    "<think>r</think>   ",
    "<think>\nreason\n</think>\n\ncontent",
    "\n<think>a</think>b</think>c",
    "x<think>a</think>b",
    "<thinking>not a tag</thinking>",
    "<think><think>nested?</think></think>",
    "<think>a <th </thi </think> ok",
    "<<think>>",
    "</think>only close",
    "reason</think>\n answer",
    "reason</think",
    "reason <think> x </think>answer <think>",
    "émoji 🤔 <think>ü</think>ß",
]


def _random_example(rng: random.Random) -> str:
    parts = ["<think>", "</think>", "<th", "</th", "<", ">", "/", " ", "\n", "a", "bc", "think", "ü"]
    return "".join(rng.choice(parts) for _ in range(rng.randint(0, 12)))


def _random_split(rng: random.Random, text: str) -> list[str]:
    if len(text) < 2:
        return [text]
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(0, len(text) - 1)))
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def _stream(fragments: list[str], starts_in_reasoning: bool) -> tuple[str, str, bool]:
    s = ReasoningStreamer(starts_in_reasoning=starts_in_reasoning)
    pieces = [p for f in fragments for p in s.feed(f)] + s.finish()
    assert all(text for _, text in pieces), "empty pieces must not be emitted"
    reasoning = "".join(t for kind, t in pieces if kind == "reasoning")
    content = "".join(t for kind, t in pieces if kind == "content")
    # Reasoning always comes before content.
    kinds = [kind for kind, _ in pieces]
    assert kinds == sorted(kinds, key=lambda k: k == "content")
    return reasoning, content, any(kind == "reasoning" for kind in kinds)


@pytest.mark.parametrize("starts_in_reasoning", [False, True])
def test_streaming_matches_split_under_random_fragmentation(starts_in_reasoning: bool):
    rng = random.Random(1234 + starts_in_reasoning)
    texts = EXAMPLES + [_random_example(rng) for _ in range(300)]
    for text in texts:
        expected = split_reasoning(text, starts_in_reasoning=starts_in_reasoning)
        splits = [list(text), [text]] + [_random_split(rng, text) for _ in range(20)]
        for fragments in splits:
            reasoning, content, _ = _stream(fragments, starts_in_reasoning)
            assert reasoning == (expected.reasoning or ""), (text, fragments)
            assert content == expected.content, (text, fragments)


def test_streaming_with_empty_deltas():
    s = ReasoningStreamer()
    out = s.feed("") + s.feed("<think>") + s.feed("") + s.feed("x</think>") + s.feed("") + s.feed("y")
    assert out + s.finish() == [("reasoning", "x"), ("content", "y")]


def test_feed_after_finish_is_an_error():
    s = ReasoningStreamer()
    s.finish()
    with pytest.raises(RuntimeError):
        s.feed("x")


def test_reasoning_token_count_stops_at_the_token_that_closes_the_block(tiny_model_dir):
    from transformers import AutoTokenizer

    from arborl.gateway.reasoning import reasoning_token_count

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    thinking = tokenizer.encode("<think>\nTwo plus two.\n</think>", add_special_tokens=False)
    answer = tokenizer.encode("\n\nThe answer is 4.", add_special_tokens=False)
    assert reasoning_token_count(tokenizer.decode, thinking + answer) == len(thinking)
    assert reasoning_token_count(tokenizer.decode, thinking[:-2]) == len(thinking) - 2  # never closed
