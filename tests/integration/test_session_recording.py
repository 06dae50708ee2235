"""Sessions recorded as tries: token-exact stitching, branch reasons, session identification."""

from __future__ import annotations

import itertools

import httpx
import openai

from tool_caller import TOOL_RESULT, WEATHER_TOOL


def _run_tool_conversation(client: openai.OpenAI, turns: int, **extra) -> list:
    messages: list[dict] = [{"role": "user", "content": "What is the weather in Paris?"}]
    responses = []
    for _ in range(turns):
        response = client.chat.completions.create(
            model="tiny", messages=messages, tools=[WEATHER_TOOL], temperature=0, max_tokens=60, **extra
        )
        responses.append(response)
        message = response.choices[0].message
        # Send the reply back exactly as the SDK parsed it, the way agents do.
        messages.append(message.model_dump(exclude_none=True, exclude={"refusal", "annotations", "audio"}))
        for call in message.tool_calls or ():
            messages.append({"role": "tool", "tool_call_id": call.id, "content": TOOL_RESULT})
        if not message.tool_calls:
            messages.append({"role": "user", "content": "And tomorrow?"})
    return responses


def _chain(store, session_id: str) -> list[int]:
    """The node ids of the session's trie as one root-to-leaf chain (fails if it branches)."""
    trie = store.trie(session_id)
    assert len(trie.roots) == 1, "more than one root"
    chain, node = [], trie.nodes[next(iter(trie.roots.values()))]
    while True:
        chain.append(node.id)
        assert len(node.children) <= 1, f"node {node.id} branches"
        if not node.children:
            return chain
        node = trie.nodes[next(iter(node.children.values()))]


def test_ten_turn_tool_conversation_is_one_path(tool_gateway):
    client = openai.OpenAI(base_url=tool_gateway.url + "/s/weather-1/v1", api_key="test")
    responses = _run_tool_conversation(client, 10)
    assert all(r.choices[0].finish_reason == "tool_calls" for r in responses)

    store = tool_gateway.store
    calls = store.calls("weather-1")
    assert len(calls) == 10
    chain = _chain(store, "weather-1")
    trie = store.trie("weather-1")
    final_path = trie.path(chain[-1])
    for call in calls:
        prompt, completion = store.call_tokens(call)
        # every call is a root-to-node path, and a prefix of the final one
        assert call.node_id in chain
        assert final_path[: len(prompt) + len(completion)] == prompt + completion
        assert call.branch_reason is None
    assert all(c.stitched_from == p.id for p, c in itertools.pairwise(calls))
    # stored once: the trie holds the final path, not the sum of the calls
    assert trie.num_tokens == len(final_path)
    assert sum(c.prompt_len + c.completion_len for c in calls) > 5 * trie.num_tokens
    metrics = tool_gateway.metrics()
    assert not any(k.startswith("arborl_prefix_breaks_total") for k in metrics if metrics[k] > 0)
    # prefix reuse: later turns got their earlier turns' KV from the cache
    assert metrics["arborl_prefix_cache_hit_tokens_total"] > 0.8 * sum(c.prompt_len for c in calls[1:])
    assert responses[-1].usage.prompt_tokens_details.cached_tokens > 0


def test_sampled_ids_are_reused_not_retokenised(gateway):
    """Random text rarely survives decode -> encode; stitching must keep the sampled ids anyway."""
    client = openai.OpenAI(base_url=gateway.url + "/s/chat-1/v1", api_key="test")
    messages = [{"role": "user", "content": "Tell me a story."}]
    for turn in range(4):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=24, seed=turn)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": f"Go on ({turn})."}]
    calls = gateway.store.calls("chat-1")
    for earlier, later in itertools.pairwise(calls):
        prompt_a, completion_a = gateway.store.call_tokens(earlier)
        prompt_b, _ = gateway.store.call_tokens(later)
        assert prompt_b[: len(prompt_a) + len(completion_a)] == prompt_a + completion_a
    assert _chain(gateway.store, "chat-1")


def test_edited_history_and_new_root_branch_with_reasons(gateway):
    client = openai.OpenAI(base_url=gateway.url + "/s/edit-1/v1", api_key="test")
    first = [{"role": "user", "content": "Write a haiku."}]
    reply = client.chat.completions.create(model="tiny", messages=first, max_tokens=10, seed=1)
    content = reply.choices[0].message.content
    # the scaffold rewrote the assistant turn from its start (compaction-style edit); an edit that
    # only appends after the sampled tokens would still extend them, and is rightly no break
    edited = first + [{"role": "assistant", "content": "Summary: " + content}, {"role": "user", "content": "More."}]
    client.chat.completions.create(model="tiny", messages=edited, max_tokens=5, seed=2)
    # a side call with another system prompt shares nothing but the template's start
    client.chat.completions.create(
        model="tiny", messages=[{"role": "system", "content": "Title generator."}, {"role": "user", "content": "x"}],
        max_tokens=5,
    )
    reasons = [c.branch_reason for c in gateway.store.calls("edit-1")]
    assert reasons[0] is None
    assert reasons[1] == "history_edited"
    assert reasons[2] in ("history_edited", "new_root")
    metrics = gateway.metrics()
    assert metrics["arborl_prefix_breaks_total{reason=history_edited}"] >= 1


def test_session_identification_order(gateway):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    url = gateway.v1 + "/chat/completions"
    by_header = httpx.post(url, json=body, headers={"x-arborl-session": "from-header"})
    assert by_header.headers["x-arborl-session"] == "from-header"
    by_path = httpx.post(gateway.url + "/s/from-path/v1/chat/completions", json=body,
                         headers={"x-arborl-session": "ignored"})
    assert by_path.headers["x-arborl-session"] == "from-path"
    tools = [{"type": "function", "function": {"name": "Bash", "parameters": {"type": "object"}}}]
    claude = httpx.post(url, json={**body, "tools": tools}, headers={"X-Claude-Code-Session-Id": "abc-123"})
    assert claude.headers["x-arborl-session"] == "claude-abc-123"
    side = httpx.post(url, json=body, headers={"X-Claude-Code-Session-Id": "abc-123"})  # no tools: a side call
    assert side.headers["x-arborl-session"] == "claude-abc-123:side"
    opencode = httpx.post(url, json=body, headers={"X-Session-Id": "ses_1"})
    assert opencode.headers["x-arborl-session"] == "ses_1"
    child = httpx.post(url, json=body, headers={"X-Session-Id": "ses_2", "x-parent-session-id": "ses_1",
                                                "user-agent": "opencode/1.18.33"})
    assert child.headers["x-arborl-session"] == "ses_1:agent-ses_2"  # a sub-agent, in its own trie
    key = gateway.store.issue_session_key("rollout-7")
    keyed = httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"})
    assert keyed.headers["x-arborl-session"] == "rollout-7"
    anon_a = httpx.post(url, json=body, headers={"Authorization": "Bearer key-a"}).headers["x-arborl-session"]
    anon_b = httpx.post(url, json=body, headers={"Authorization": "Bearer key-b"}).headers["x-arborl-session"]
    assert anon_a.startswith("anon-") and anon_a != anon_b
    bad = httpx.post(gateway.url + "/s/bad%20id/v1/chat/completions", json=body)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "session"


def test_an_edit_behind_a_later_turn_is_a_break_even_when_an_earlier_turn_stitches(gateway):
    """OpenCode rewrites a call to an unknown tool before sending it back: the turns before it
    still stitch, but the rewritten turn leaves the path the policy sampled, and that is a break."""
    client = openai.OpenAI(base_url=gateway.url + "/s/edit-2/v1", api_key="test")
    messages = [{"role": "user", "content": "Write a haiku."}]
    for turn in range(2):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=turn)
        messages += [
            {"role": "assistant", "content": reply.choices[0].message.content},
            {"role": "user", "content": f"Another ({turn})."},
        ]
    messages[3] = {"role": "assistant", "content": "Rewritten: " + messages[3]["content"]}
    client.chat.completions.create(model="tiny", messages=messages, max_tokens=4, seed=9)
    calls = gateway.store.calls("edit-2")
    assert [c.stitched_from for c in calls] == [None, calls[0].id, calls[0].id]
    assert [c.branch_reason for c in calls] == [None, None, "history_edited"]


def test_any_model_name_is_served_as_the_policy_and_recorded_as_asked(tiny_model_dir, tmp_path):
    """An agent pointed at the URL alone asks for its vendor's model names: with any_model_name the
    policy answers them all (each call records the name asked for); /v1/models lists what is served."""
    from conftest import serve_live

    for live in serve_live(tiny_model_dir, tmp_path, any_model_name=True):
        user = [{"role": "user", "content": "hi"}]
        chat = httpx.post(live.url + "/s/any/v1/chat/completions", timeout=60,
                          json={"model": "gpt-5-codex", "messages": user, "max_tokens": 2})
        claude = httpx.post(live.url + "/s/any/v1/messages", timeout=60,
                            json={"model": "claude-opus-4-1-20250805", "messages": user, "max_tokens": 2})
        assert chat.status_code == 200 and chat.json()["model"] == "gpt-5-codex", chat.text
        assert claude.status_code == 200 and claude.json()["model"] == "claude-opus-4-1-20250805", claude.text
        recorded = live.store.query("SELECT model FROM calls WHERE session_id = 'any' ORDER BY seq")
        assert recorded == [("gpt-5-codex",), ("claude-opus-4-1-20250805",)]
        assert [m["id"] for m in httpx.get(live.v1 + "/models").json()["data"]] == ["tiny"]


def test_serve_and_up_answer_any_model_name_unless_told_otherwise(tmp_path):
    from arborl.ops.config import SERVE_DEFAULTS, UP_DEFAULTS, load_config

    assert load_config(environ={}, defaults=SERVE_DEFAULTS).gateway.any_model_name
    assert load_config(environ={}, defaults=UP_DEFAULTS).gateway.any_model_name
    assert not load_config(environ={}).gateway.any_model_name  # a gateway built as a library is strict
    strict = load_config(environ={"ARBORL_GATEWAY__ANY_MODEL_NAME": "false"}, defaults=SERVE_DEFAULTS)
    assert not strict.gateway.any_model_name
