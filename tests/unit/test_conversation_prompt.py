"""The prompt rendered no further than needed (gateway/rendering.py, ``ConversationPrompt``).

Invariant: what ``after(k)`` says follows an earlier reply is exactly what the whole
conversation's render writes after it, whichever way it is computed. A template that composes
message by message (ChatML) renders only the messages after the reply; one that does not
(Qwen3-style: an earlier turn's reasoning is dropped once a user speaks again; or a template
that treats the last message specially) is detected by the probe and rendered whole.
"""

from __future__ import annotations

import copy
import random

import pytest

from arborl.gateway.rendering import ChatRenderer, ConversationPrompt
from arborl.gateway.tool_parsers import get_parser

PARAMETERS = {"type": "object", "properties": {"cmd": {"type": "string"}}}
TOOLS = [{"type": "function", "function": {"name": "bash", "description": "Run a command", "parameters": PARAMETERS}}]

# Qwen3's habit, in a few lines: an assistant turn's reasoning is written only after the last user message.
DROPS_EARLIER_REASONING = """{%- set ns = namespace(last_user=0) -%}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor -%}
{%- if tools %}<|im_start|>system
{% for t in tools %}{{ t | tojson }}
{% endfor %}<|im_end|>
{% endif -%}
{%- for m in messages -%}
<|im_start|>{{ m.role }}
{% if m.role == 'assistant' and m.reasoning_content and loop.index0 > ns.last_user %}<think>
{{ m.reasoning_content }}
</think>
{% endif %}{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""

# The last message written apart: what follows a reply depends on what comes after it.
MARKS_THE_LAST = """{%- for m in messages -%}
<|im_start|>{{ m.role }}{% if loop.last %} (latest){% endif %}
{{ m.content }}<|im_end|>
{% endfor -%}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif -%}"""


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _renderer(tokenizer, template: str | None = None) -> ChatRenderer:
    tokenizer = copy.copy(tokenizer)
    if template is not None:
        tokenizer.chat_template = template
    return ChatRenderer(tokenizer, get_parser("hermes"))


def _conversation(rng: random.Random, turns: int) -> list[dict]:
    messages: list[dict] = [{"role": "system", "content": "You are a coding agent."}]
    for turn in range(turns):
        messages.append({"role": "user", "content": f"step {turn}: " + " ".join(rng.choices("abcdef", k=6))})
        if rng.random() < 0.5:
            call = {"id": f"c{turn}", "name": "bash", "arguments": '{"cmd": "ls"}'}
            messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
            messages.append({"role": "tool", "content": "a.py\nb.py", "tool_call_id": f"c{turn}"})
        messages.append({"role": "assistant", "content": f"done {turn}", "reasoning": f"because {turn}"})
    messages.append({"role": "user", "content": "next"})
    return messages


def _cut_from_whole(renderer: ChatRenderer, messages: list[dict], k: int, tools) -> str | None:
    """What ``after(k)`` must be: the whole render's text after the render through the reply."""
    whole = renderer.render(messages, tools).text
    through = renderer.render(messages[: k + 1], tools, add_generation_prompt=False).text
    if not whole.startswith(through) or not through.endswith(renderer.turn_suffix):
        return None
    return whole[len(through):]


@pytest.mark.parametrize("tools", [None, TOOLS])
def test_a_chatml_template_composes_and_renders_only_what_follows_the_reply(tokenizer, tools):
    renderer = _renderer(tokenizer)
    assert renderer.composes
    rng = random.Random(0)
    for _ in range(5):
        messages = _conversation(rng, 6)
        for k, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            prompt = ConversationPrompt(renderer, messages, tools)
            assert prompt.after(k) == _cut_from_whole(renderer, messages, k, tools), k
            assert "whole" not in prompt.__dict__  # the conversation was never rendered whole
            assert prompt.ending.text == prompt.after(k) and not prompt.ending.starts_in_reasoning


def test_the_ending_knows_a_forced_tool_call(tokenizer):
    renderer = _renderer(tokenizer)
    messages = _conversation(random.Random(1), 3)
    prompt = ConversationPrompt(renderer, messages, TOOLS, tool_choice="required")
    k = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    assert prompt.after(k) is not None
    whole = renderer.render(messages, TOOLS, tool_choice="required")
    assert prompt.ending.forced_prefix == whole.forced_prefix != ""
    assert prompt.ending.forced_call == whole.forced_call and whole.text.endswith(prompt.ending.text)


@pytest.mark.parametrize("template", [DROPS_EARLIER_REASONING, MARKS_THE_LAST], ids=["qwen3-reasoning", "loop-last"])
def test_a_template_that_does_not_compose_is_rendered_whole(tokenizer, template):
    renderer = _renderer(tokenizer, template)
    assert not renderer.composes
    messages = _conversation(random.Random(2), 4)
    tools = TOOLS if "tools" in template else None
    unstable = 0
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        expected = _cut_from_whole(renderer, messages, k, tools)
        unstable += expected is None
        assert ConversationPrompt(renderer, messages, tools).after(k) == expected
    assert unstable  # these templates do rewrite earlier turns: stitching must see it
