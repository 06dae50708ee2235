"""The official openai SDK against a live gateway on loopback: sync, async, streaming, tools."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tool_caller import CALL_ARGUMENTS, WEATHER_TOOL, conversation

HELLO = [{"role": "user", "content": "Say hello."}]


def test_sync_non_streaming_with_logprobs(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key="test")
    response = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=12, seed=7, logprobs=True, top_logprobs=3
    )
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert choice.finish_reason in ("stop", "length")
    assert response.usage.completion_tokens == len(choice.logprobs.content) > 0
    for item in choice.logprobs.content:
        assert item.logprob <= 0
        assert len(item.top_logprobs) == 3
        # The sampled token's logprob can't exceed the best alternative's.
        assert item.logprob <= item.top_logprobs[0].logprob + 1e-6
    # The recorded call holds exactly those tokens and logprobs.
    (session,) = gateway.store.sessions()
    (call,) = gateway.store.calls(session["id"])
    assert call.completion_len == response.usage.completion_tokens
    assert call.completion_logprobs == pytest.approx([i.logprob for i in choice.logprobs.content], abs=1e-5)
    assert call.versions == [0]


def test_same_seed_same_output(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key="test")
    first, second = (
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, seed=123, temperature=1.0)
        for _ in range(2)
    )
    other = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=16, seed=124, temperature=1.0)
    assert first.choices[0].message.content == second.choices[0].message.content
    assert other.choices[0].message.content != first.choices[0].message.content


def test_streaming_with_usage_matches_non_streaming(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key="test")
    kwargs = {"model": "tiny", "messages": HELLO, "max_tokens": 20, "seed": 5}
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]


def test_n_choices_and_stop(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key="test")
    response = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=8, n=3, seed=1)
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert response.usage.completion_tokens == sum(
        len(gateway.store.call_tokens(c)[1]) for c in gateway.store.calls(gateway.store.sessions()[0]["id"])
    )
    # A stop string cuts the text before it; the finish reason says stop.
    base = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30, seed=9)
    text = base.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), "need a non-blank stop string"
    cut = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=30, seed=9, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert stop not in cut.choices[0].message.content
    assert text.startswith(cut.choices[0].message.content)


def test_tool_call_non_streaming_and_streaming(tool_gateway):
    client = openai.OpenAI(base_url=tool_gateway.v1, api_key="test")
    messages = conversation(0)
    response = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=60
    )
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == CALL_ARGUMENTS
    assert call.id.startswith("call_")

    stream = client.chat.completions.create(
        model="tiny", messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=60, stream=True
    )
    deltas = [c.choices[0].delta for c in stream if c.choices]
    tool_deltas = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert tool_deltas[0].id and tool_deltas[0].function.name == "get_weather"
    assert all(d.index == 0 for d in tool_deltas)
    assert all(d.id is None and d.function.name is None for d in tool_deltas[1:])
    arguments = "".join(d.function.arguments or "" for d in tool_deltas)
    assert json.loads(arguments) == CALL_ARGUMENTS
    assert "".join(d.content or "" for d in deltas) == ""


def test_tool_choice_none_hides_tools(tool_gateway):
    client = openai.OpenAI(base_url=tool_gateway.v1, api_key="test")
    response = client.chat.completions.create(
        model="tiny", messages=conversation(0), tools=[WEATHER_TOOL], tool_choice="none", temperature=0, max_tokens=30
    )
    assert response.choices[0].message.tool_calls is None


async def test_async_client_concurrent_streams(gateway):
    import asyncio

    client = openai.AsyncOpenAI(base_url=gateway.v1, api_key="test")

    async def one(i: int) -> str:
        stream = await client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"count to {i}"}], max_tokens=16, seed=i, stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(one(i) for i in range(6)))
    assert len(texts) == 6
    # Batching is exercised: some engine step ran more than one sequence.
    metrics = gateway.metrics()
    multi = metrics["arborl_engine_batch_size_count"] - metrics["arborl_engine_batch_size_bucket{le=1.0}"]
    assert multi > 0
    await client.close()


def test_models_health_and_metrics(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key="test")
    assert [m.id for m in client.models.list()] == ["tiny"]
    import httpx

    assert httpx.get(gateway.url + "/healthz").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=4)
    metrics = gateway.metrics()
    assert metrics["arborl_requests_total{route=/v1/chat/completions,status=200}"] == 1
    assert metrics["arborl_completion_tokens_total"] >= 1
    assert metrics["arborl_policy_version"] == 0
    assert metrics["arborl_trie_nodes"] >= 1
    assert metrics["arborl_time_to_first_token_seconds_count"] == 1


def test_malformed_tool_call_comes_back_as_text_and_is_counted(tiny_model_dir, tmp_path):
    """A model that writes a call it cannot finish (unforced: tool_choice auto): text, not a 500, and counted.
    (A forced call cannot come out malformed: the engine constrains it, test_forced_tool_choice.)"""
    from transformers import AutoTokenizer

    from arborl.gateway.app import create_app
    from arborl.gateway.settings import GatewaySettings
    from arborl.ops.local_gateway import ServerThread
    from arborl.rollout.store import SqliteTrajectoryStore
    from scripted_engine import ScriptedEngine

    broken = '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris'
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(tiny_model_dir), lambda prompt: broken)
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    app = create_app(engine, store, GatewaySettings(tool_parser="hermes"))
    with ServerThread(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="test")
        response = client.chat.completions.create(model="tiny", messages=conversation(0), tools=[WEATHER_TOOL],
                                                  tool_choice="auto", max_tokens=60)
        message = response.choices[0].message
        assert message.tool_calls is None
        assert message.content.startswith('<tool_call>\n{"name": "get_weather", "arguments": ')
        assert "arborl_tool_call_parse_failures_total{parser=\"hermes\"} 1.0" in httpx.get(url + "/metrics").text
    store.close()


def test_streamed_logprobs_arrive_with_the_content(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key="test")
    kwargs = {"model": "tiny", "messages": HELLO, "max_tokens": 16, "seed": 11, "logprobs": True}
    whole = client.chat.completions.create(**kwargs)
    chunks = [c for c in client.chat.completions.create(**kwargs, stream=True) if c.choices]
    streamed = [item.logprob for c in chunks if c.choices[0].logprobs for item in c.choices[0].logprobs.content]
    assert streamed == pytest.approx([i.logprob for i in whole.choices[0].logprobs.content], abs=1e-6)
    with_content = [c for c in chunks if c.choices[0].delta.content]
    assert with_content and all(c.choices[0].logprobs.content for c in with_content)


@pytest.mark.parametrize(
    "extra",
    [{"seed": 2**80}, {"seed": -5}, {"temperature": 1e-300}, {"temperature": 1e-300, "stream": True},
     {"top_p": 1e-300}],
    ids=["huge-seed", "negative-seed", "tiny-temperature", "tiny-temperature-stream", "tiny-top-p"],
)
def test_extreme_sampling_parameters_are_served(gateway, extra):
    import httpx

    body = {"model": "tiny", "messages": HELLO, "max_tokens": 3, **extra}
    response = httpx.post(gateway.v1 + "/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert "error" not in response.text
    assert gateway.engine.healthy


def test_top_logprobs_wider_than_top_k(gateway):
    client = openai.OpenAI(base_url=gateway.v1, api_key="test")
    response = client.chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=2, logprobs=True, top_logprobs=2, extra_body={"top_k": 1}
    )
    items = response.choices[0].logprobs.content
    assert all(len(i.top_logprobs) == 2 and i.top_logprobs[1].logprob == -9999.0 for i in items)


def test_stream_chunk_order_conforms(tool_gateway):
    """Role chunk, tool-call deltas (id, type and name first, then argument pieces), the finish
    chunk, the usage chunk with no choices, then [DONE]: one id and one shape throughout."""
    body = {"model": "tiny", "max_tokens": 60, "temperature": 0, "tools": [WEATHER_TOOL], "stream": True,
            "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}]}
    with httpx.stream("POST", tool_gateway.v1 + "/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]} and {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert all(set(c) >= {"id", "object", "created", "model", "choices", "usage"} for c in chunks)
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    *deltas, finish, usage = chunks[1:]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] > 0
    assert finish["choices"][0]["finish_reason"] == "tool_calls" and finish["choices"][0]["delta"] == {}
    calls = [d["choices"][0]["delta"]["tool_calls"][0] for d in deltas if d["choices"][0]["delta"].get("tool_calls")]
    assert calls[0]["id"] and calls[0]["type"] == "function" and calls[0]["function"]["name"] == "get_weather"
    assert all("id" not in c and set(c["function"]) == {"arguments"} for c in calls[1:])
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == CALL_ARGUMENTS
    assert all(d["choices"][0]["finish_reason"] is None and d["usage"] is None for d in deltas)
