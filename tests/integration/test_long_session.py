"""A 300-turn session through the gateway: linear storage, exact export, no break in stitching.

An agent resends the whole conversation on every call; the gateway stores each call as a delta
against the call it extends (rollout/store/call_deltas.py) and stitches from memory
(gateway/stitching.py), so what a turn costs in bytes does not grow with the turns before it.
"""

from __future__ import annotations

import json
import random
import shutil

import httpx
import pytest

from conftest import serve_live

TURNS = 300
WORDS = "read the file then run the tests and fix what fails in the parser module".split()


@pytest.fixture
def long_context_model(tiny_model_dir, tmp_path):
    """The tiny model with room for 300 turns (its positions are rotary: any length works)."""
    folder = tmp_path / "tiny-long"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = 32768
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.slow
def test_a_300_turn_session_grows_linearly_and_exports_exactly(long_context_model, tmp_path):
    rng = random.Random(0)
    messages: list[dict] = [{"role": "system", "content": "You are a coding agent."}]
    sent: list[str] = []
    stored_bytes: dict[int, int] = {}
    for live in serve_live(long_context_model, tmp_path):
        with httpx.Client(base_url=live.url, timeout=60) as client:
            for turn in range(1, TURNS + 1):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=12))})
                raw = json.dumps({"model": "tiny", "messages": messages, "max_tokens": 2, "temperature": 0})
                response = client.post("/s/long/v1/chat/completions", content=raw,
                                       headers={"content-type": "application/json"})
                assert response.status_code == 200, response.text
                messages.append({"role": "assistant", "content": response.json()["choices"][0]["message"]["content"]})
                sent.append(raw)
                if turn in (10, 20, 100, 290, 300):
                    stored_bytes[turn] = live.store.session_bytes("long")
        calls = live.store.calls("long")
        assert len(calls) == TURNS and all(c.status == "ok" for c in calls)
        # Stitching held for every turn: each call extends the one before it, token for token.
        assert [c.branch_reason for c in calls] == [None] * TURNS
        assert [c.stitched_from for c in calls[1:]] == [c.id for c in calls[:-1]]
        assert live.store.call_bodies(calls[-1].id)["request_body"] == sent[-1]
        assert live.store.call_bodies(calls[99].id)["request_body"] == sent[99]
        assert [c.messages for c in calls[-2:]] == [json.loads(raw)["messages"] for raw in sent[-2:]]

    per_turn = {turn: stored_bytes[turn] / turn for turn in (10, 100, 300)}
    print(f"\nstored bytes per turn at turns 10/100/300: {per_turn}")
    early = (stored_bytes[20] - stored_bytes[10]) / 10
    late = (stored_bytes[300] - stored_bytes[290]) / 10
    assert late < 1.5 * early, (early, late)  # whole requests: turn 300 would add ~20x turn 10's bytes
