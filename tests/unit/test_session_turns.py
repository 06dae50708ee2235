"""A session's canonical forms are made once per message: each call reuses the latest
conversation's forms for the messages it repeats, and the result is what computing them all
afresh gives, whatever the next conversation does to the last one."""

from __future__ import annotations

import json
import random

import pytest

from arborl.gateway.stitching import SessionTurns, _canonical_message, _prefix_hashes


def _message(rng: random.Random, n: int) -> dict:
    role = rng.choice(["user", "assistant", "tool"])
    message = {"role": role, "content": f" turn {n} {rng.randrange(3)} "}
    if role == "assistant" and rng.random() < 0.5:
        arguments = json.dumps({"cmd": "ls", "n": n})
        message["tool_calls"] = [{"id": f"c{n}", "name": "bash", "arguments": arguments}]
    if role == "tool":
        message["tool_call_id"] = f"c{n}"
    return message


@pytest.mark.parametrize("seed", range(10))
def test_forms_reused_from_the_latest_conversation_equal_forms_made_afresh(seed):
    rng = random.Random(seed)
    session = SessionTurns()
    conversation = [{"role": "system", "content": "you are an agent"}]
    for n in range(60):
        action = rng.random()
        if action < 0.6:  # the next turn: everything before, and what it added
            conversation = conversation + [_message(rng, n) for _ in range(rng.randint(1, 3))]
        elif action < 0.75 and len(conversation) > 2:  # an edit in the middle (compaction)
            at = rng.randrange(1, len(conversation))
            conversation = conversation[:at] + [{**conversation[at], "content": "compacted"}] + conversation[at + 1 :]
        elif action < 0.85:  # a shorter conversation (a sub-agent, a retry of an earlier turn)
            conversation = conversation[: rng.randint(1, len(conversation))]
        elif action < 0.9:  # another conversation altogether
            conversation = [{"role": "system", "content": f"title generator {n}"}]
        messages = [dict(m) for m in conversation]  # a new request: equal messages, new objects
        canonical, hashes = session.forms(messages)
        afresh = [_canonical_message(m) for m in messages]
        assert canonical == afresh and hashes == _prefix_hashes(afresh)
