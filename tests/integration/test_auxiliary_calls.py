"""Auxiliary calls (titles, sub-agents) go to their own tries, out of the main agent's path.

Claude Code's calls are replayed with the official SDK and the headers Claude Code sends: the
main loop, a title call between two main turns, and a sub-agent. The main calls must still
form one unbroken path, and the others sit in ``{session}:title`` / ``{session}:agent-<id>``.
"""

from __future__ import annotations

import anthropic

from arborl.scaffold_adapters.base import TRAINABLE_PURPOSES

SESSION = "5b0c6f9e-1a1f-4c44-9a55-5e1d7f0c2a10"
CLAUDE_HEADERS = {"x-claude-code-session-id": SESSION, "user-agent": "claude-cli/2.1.197 (external, sdk-cli)"}
TOOLS = [{"name": "Bash", "description": "Run a command",
          "input_schema": {"type": "object", "properties": {"command": {"type": "string"}}}}]
TITLE_FORMAT = {"format": {"type": "json_schema",
                           "schema": {"type": "object", "properties": {"title": {"type": "string"}}}}}


def _create(client, messages, headers=None, **extra):
    return client.messages.create(model="tiny", max_tokens=8, messages=messages, extra_headers=headers or {},
                                  extra_body={"temperature": 0, **extra.pop("extra_body", {})}, **extra)


def test_claude_code_title_and_subagent_calls_get_their_own_tries(gateway):
    client = anthropic.Anthropic(base_url=gateway.url, api_key="test", max_retries=0, default_headers=CLAUDE_HEADERS)
    history = [{"role": "user", "content": "list the files"}]
    first = _create(client, history, tools=TOOLS)
    _create(client, [{"role": "user", "content": "<session>list the files</session>"}],
            system=[{"type": "text", "text": "Generate a concise, sentence-case title for this session."}],
            extra_body={"output_config": TITLE_FORMAT})
    history += [{"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
                {"role": "user", "content": "and now the hidden ones"}]
    _create(client, history, tools=TOOLS)
    _create(client, [{"role": "user", "content": "search the repo"}], headers={"x-claude-code-agent-id": "a1b2"},
            tools=TOOLS)

    main = gateway.store.calls("claude-" + SESSION)
    assert [c.purpose for c in main] == ["main", "main"]
    assert main[1].stitched_from == main[0].id and main[1].branch_reason is None
    trie = gateway.store.trie("claude-" + SESSION)
    assert trie.num_tokens == main[1].prompt_len + main[1].completion_len  # one path, no title inside

    (title,) = gateway.store.calls(f"claude-{SESSION}:title")
    (agent,) = gateway.store.calls(f"claude-{SESSION}:agent-a1b2")
    assert (title.purpose, agent.purpose) == ("title", "subagent")
    assert "title" not in TRAINABLE_PURPOSES and "subagent" in TRAINABLE_PURPOSES
    metrics = gateway.metrics()
    assert metrics["arborl_auxiliary_calls_total{purpose=title}"] == 1
    assert metrics["arborl_auxiliary_calls_total{purpose=subagent}"] == 1


def test_calls_without_scaffold_headers_are_main_calls(gateway):
    client = anthropic.Anthropic(base_url=gateway.url + "/s/plain", api_key="test", max_retries=0)
    _create(client, [{"role": "user", "content": "hi"}],
            system=[{"type": "text", "text": "Generate a concise, sentence-case title for this session."}])
    (call,) = gateway.store.calls("plain")
    assert call.purpose == "main"
