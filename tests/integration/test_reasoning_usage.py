"""Reasoning tokens are counted apart in every dialect's usage (the scripted engine thinks first)."""

from __future__ import annotations

from pathlib import Path

import anthropic
import openai
import pytest

from arborl.gateway.app import create_app
from arborl.gateway.settings import GatewaySettings
from arborl.rollout.store import SqliteTrajectoryStore
from conftest import ServerThread
from scripted_engine import ScriptedEngine

THINKING = "<think>\nTwo plus two is four.\n</think>"
REPLY = THINKING + "\n\nThe answer is 4."


@pytest.fixture
def thinking_gateway(tiny_model_dir: Path, tmp_path: Path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    with ServerThread(create_app(ScriptedEngine(tokenizer, lambda prompt: REPLY), store, GatewaySettings())) as url:
        yield url, len(tokenizer.encode(THINKING, add_special_tokens=False))
    store.close()


def test_reasoning_tokens_in_chat_and_responses_usage(thinking_gateway):
    url, thinking_tokens = thinking_gateway
    client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "2+2?"}])
    assert chat.choices[0].message.content == "The answer is 4."
    assert chat.usage.completion_tokens_details.reasoning_tokens == thinking_tokens
    assert chat.usage.completion_tokens > thinking_tokens

    response = client.responses.create(model="tiny", input="2+2?")
    assert response.output_text == "The answer is 4."
    assert response.usage.output_tokens_details.reasoning_tokens == thinking_tokens

    message = anthropic.Anthropic(base_url=url, api_key="k", max_retries=0).messages.create(
        model="tiny", max_tokens=100, messages=[{"role": "user", "content": "2+2?"}])
    assert [b.type for b in message.content] == ["thinking", "text"]
