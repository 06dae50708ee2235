"""Production traffic as training data: `POST /v1/feedback` on sessions served by a live gateway,
and the learner training on them (error-masked SFT on accepted sessions, or policy gradient
against a running baseline); sessions without feedback are never trained on."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
import torch

from arborl.learner.feedback_data import failed_calls
from arborl.learner.loop import Learner
from arborl.learner.settings import LearnerSettings
from arborl.rollout.store import RunLedger
from conftest import serve_live

ADMIN = "admin-secret-0123456789"


@pytest.fixture
def live(tiny_model_dir: Path, tmp_path: Path):
    yield from serve_live(tiny_model_dir, tmp_path, admin_token=ADMIN)


def production_session(live, session: str, turns: int = 2) -> None:
    client = openai.OpenAI(base_url=f"{live.url}/s/{session}/v1", api_key="user-key")
    messages = [{"role": "user", "content": f"Tell me about {session}."}]
    for turn in range(turns):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=turn)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "Go on."}]


def feedback(live, body: dict, key: str = ADMIN) -> httpx.Response:
    return httpx.post(live.url + "/v1/feedback", json=body, headers={"authorization": f"Bearer {key}"}, timeout=30)


@torch.no_grad()
def session_logprob(model_dir, live, session: str) -> float:
    """Mean logprob the weights in ``model_dir`` give the session's sampled tokens."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    total, count = 0.0, 0
    for call in live.store.calls(session):
        prompt, completion = live.store.call_tokens(call)
        ids = torch.tensor([prompt + completion])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1:-1], dim=-1)
        total += float(logp.gather(1, torch.tensor(completion)[:, None]).sum())
        count += len(completion)
    return total / count


def test_an_accepted_session_is_trained_by_sft_and_one_without_feedback_is_not(live, tiny_model_dir, tmp_path):
    production_session(live, "accepted")
    production_session(live, "no-feedback")
    assert feedback(live, {"session_id": "accepted", "accept": True}).status_code == 200
    ledger = RunLedger(live.store)
    learner = Learner(ledger, tmp_path / "learner", LearnerSettings(lr=1e-3, feedback="sft"),
                      base_model=tiny_model_dir, device="cpu")
    assert learner.train_once() is None  # no groups: rollouts are not the only data
    report = learner.train_feedback_once()
    assert report is not None and report.step == 1
    step = ledger.last_step()
    assert step.metrics["kind"] == "feedback-sft" and step.metrics["sessions"] == ["accepted"]
    assert [f.consumed_step for f in ledger.pending_feedback()] == []
    assert learner.train_feedback_once() is None  # consumed: never trained twice
    # SFT made the accepted completions more likely
    assert session_logprob(step.checkpoint, live, "accepted") > session_logprob(tiny_model_dir, live, "accepted")


def test_policy_gradient_against_a_running_baseline(live, tiny_model_dir, tmp_path):
    production_session(live, "good")
    production_session(live, "bad")
    key = live.store.issue_session_key("good")  # the session's own key may grade it
    assert feedback(live, {"reward": 1.0}, key=key).status_code == 200
    assert feedback(live, {"session_id": "bad", "reward": 0.0}).status_code == 200
    ledger = RunLedger(live.store)
    learner = Learner(ledger, tmp_path / "learner", LearnerSettings(lr=1e-3, feedback="pg"),
                      base_model=tiny_model_dir, device="cpu")
    assert learner.train_feedback_once() is not None
    metrics = ledger.last_step().metrics
    # baseline 0.5 -> 0.9 * 0.5 + 0.1 * 1.0 = 0.55 -> 0.9 * 0.55 + 0.1 * 0.0 = 0.495
    assert metrics["kind"] == "feedback-pg" and metrics["feedback_baseline"] == pytest.approx(0.495)
    assert sorted(metrics["sessions"]) == ["bad", "good"]


def test_rejections_under_sft_and_feedback_when_off_are_not_trained(live, tiny_model_dir, tmp_path):
    production_session(live, "rejected")
    assert feedback(live, {"session_id": "rejected", "accept": False}).status_code == 200
    ledger = RunLedger(live.store)
    off = Learner(ledger, tmp_path / "off", LearnerSettings(feedback="off"), base_model=tiny_model_dir, device="cpu")
    assert off.train_feedback_once() is None and len(ledger.pending_feedback()) == 1
    sft = Learner(ledger, tmp_path / "sft", LearnerSettings(feedback="sft"), base_model=tiny_model_dir, device="cpu")
    assert sft.train_feedback_once() is None and ledger.pending_feedback() == []  # skipped, not trained
    assert ledger.last_step() is None


def test_bad_feedback_gets_a_clear_4xx(live):
    production_session(live, "mine", turns=1)
    production_session(live, "theirs", turns=1)
    mine = live.store.issue_session_key("mine")
    assert feedback(live, {"session_id": "mine", "accept": True}, key="nobody").status_code == 401
    assert feedback(live, {"session_id": "theirs", "accept": True}, key=mine).status_code == 403
    assert feedback(live, {"session_id": "mine"}).status_code == 400  # neither reward nor accept
    assert feedback(live, {"accept": True}).status_code == 400  # an admin must name the session
    assert feedback(live, {"session_id": "mine", "reward": "lots"}).status_code == 400
    infinite = httpx.post(live.url + "/v1/feedback", content='{"session_id": "mine", "reward": Infinity}',
                          headers={"authorization": f"Bearer {ADMIN}", "content-type": "application/json"})
    assert infinite.status_code == 400
    assert feedback(live, {"session_id": "nobody-here", "accept": True}).status_code == 404
    assert feedback(live, {"session_id": "mine", "call_id": "call-nope", "accept": True}).status_code == 404
    ledger = RunLedger(live.store)
    group = ledger.open_group("task", 1)
    ledger.start_rollout("a-rollout", group, scaffold="builtin")
    production_session(live, "a-rollout", turns=1)
    conflict = feedback(live, {"session_id": "a-rollout", "reward": 1.0})
    assert conflict.status_code == 409 and "verifier" in conflict.json()["error"]["message"]
    assert ledger.pending_feedback() == []  # nothing refused was recorded


def test_failed_tool_calls_are_masked_out_of_sft(live):
    client = openai.OpenAI(base_url=f"{live.url}/s/tools/v1", api_key="k")
    messages: list[dict] = [{"role": "user", "content": "list files"}]
    for result in ("Error: no such command", "a.py b.py", "done"):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=4)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": result}]
    calls = RunLedger(live.store).training_calls("tools")
    assert failed_calls(calls) == {calls[0].id}  # the first call's command came back as an error
