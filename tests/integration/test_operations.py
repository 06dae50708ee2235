"""Operating a run through the admin API and `arborl ops`: pause and resume training, pause and
drain serving, roll back and promote, set the learning rate and staleness bound at run time, and
the audit log of who did what. A real gateway (tiny model) and a real learner publishing to it."""

from __future__ import annotations

import random
import threading
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import torch
from safetensors.torch import load_file

from arborl.learner.loop import Learner
from arborl.learner.publish import GatewayPublisher
from arborl.learner.settings import LearnerSettings
from arborl.ops.cli import main
from arborl.rollout.store import RunControls, RunLedger
from conftest import serve_live
from learner_fixtures import record_group

ADMIN, OPERATOR = "admin-secret-0123456789", "ops-alice-secret-0123456789"


@pytest.fixture
def live(tiny_model_dir: Path, tmp_path: Path):
    yield from serve_live(tiny_model_dir, tmp_path, admin_token=ADMIN, admin_keys={"alice": OPERATOR})


def admin(live, route: str, body: dict | None = None, *, key: str = ADMIN, method: str = "POST") -> httpx.Response:
    return httpx.request(method, live.url + route, json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)


def trained(live, tiny_model_dir: Path, tiny_model, steps: int) -> Learner:
    ledger = RunLedger(live.store)
    learner = Learner(ledger, live.run_dir, LearnerSettings(lr=1e-3, keep_checkpoints=2), base_model=tiny_model_dir,
                      publisher=GatewayPublisher(live.url, ADMIN), device="cpu")
    rng = random.Random(0)
    for n in range(steps):
        record_group(ledger, tiny_model, f"task-{n}", rng, version=learner.version)
        assert learner.train_once() is not None
    return learner


def served_equals_checkpoint(live, checkpoint: Path) -> bool:
    served = live.engine.model.state_dict()
    return all(torch.equal(served[name], value.to(served[name].dtype))
               for name, value in load_file(checkpoint / "model.safetensors").items())


def test_rollback_serves_the_old_weights_bit_for_bit_and_pins_until_promote(live, tiny_model_dir, tiny_model):
    learner = trained(live, tiny_model_dir, tiny_model, steps=3)
    ledger = learner.ledger
    assert live.engine.stats().policy_version == 3
    v1 = Path(ledger.steps()[0].checkpoint)
    assert not v1.exists()  # pruned: only the newest two are kept
    assert admin(live, "/admin/rollback", {"version": 1}).status_code == 400  # and says why

    reply = admin(live, "/admin/rollback", {"version": 2}, key=OPERATOR)
    assert reply.status_code == 200, reply.text
    assert live.engine.stats().policy_version == 2
    assert served_equals_checkpoint(live, Path(ledger.steps()[1].checkpoint))
    client = openai.OpenAI(base_url=live.url + "/s/after-rollback/v1", api_key="k")
    client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    [call] = live.store.calls("after-rollback")
    assert set(call.completion_versions) == {2}  # responses carry the rolled-back version

    # pinned: the learner trains on, keeps version 2's checkpoint, and does not publish
    record_group(ledger, tiny_model, "task-3", random.Random(1), version=2)
    assert learner.train_once() is not None and learner.version == 4
    assert live.engine.stats().policy_version == 2
    assert Path(ledger.steps()[1].checkpoint).exists()  # a kept version is never pruned
    assert admin(live, "/admin/weights", {"path": ledger.steps()[-1].checkpoint, "version": 5}).status_code == 409

    assert admin(live, "/admin/promote", {}).status_code == 200  # the newest: version 4
    assert live.engine.stats().policy_version == 4
    assert served_equals_checkpoint(live, Path(ledger.steps()[-1].checkpoint))
    assert RunControls(live.store).serving_pin is None

    log = admin(live, "/admin/actions", method="GET").json()["actions"]
    assert [(a["who"], a["action"], a["details"]) for a in log] == [
        ("alice", "rollback", {"version": 2}), ("admin", "promote", {"version": 4})]


def test_pause_training_and_run_time_settings_reach_the_learner(live, tiny_model_dir, tiny_model):
    learner = trained(live, tiny_model_dir, tiny_model, steps=1)
    ledger = learner.ledger
    record_group(ledger, tiny_model, "waiting", random.Random(2), version=1)
    assert admin(live, "/admin/training/pause").status_code == 200
    stop = threading.Event()
    runner = threading.Thread(target=lambda: learner.run(stop=stop))
    runner.start()
    try:
        stop.wait(1.5)
        assert learner.step == 1  # a complete group waits, but training is paused
        assert admin(live, "/admin/learner", {"lr": 5e-4, "max_staleness": 0}).status_code == 200
        assert admin(live, "/admin/training/resume").status_code == 200
        for _ in range(100):
            if learner.step == 2:
                break
            stop.wait(0.1)
    finally:
        stop.set()
        runner.join(30)
    assert learner.step == 2
    assert learner.settings.lr == 5e-4 and learner.settings.max_staleness == 0
    assert all(group["lr"] == pytest.approx(5e-4) for group in learner.trainer.backend.optimizer.param_groups)
    actions = [a.action for a in RunControls(live.store).actions()]
    assert actions == ["pause_training", "set_learner", "resume_training"]


def test_pause_serving_refuses_new_requests_in_each_dialect_then_resumes(live):
    reply = admin(live, "/admin/serving/pause", {"drain": True, "timeout_s": 30})
    assert reply.status_code == 200 and reply.json()["drained"] is True
    client = openai.OpenAI(base_url=live.v1, api_key="k", max_retries=0)
    with pytest.raises(openai.APIStatusError) as refused:
        client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert refused.value.status_code == 503 and "paused by an operator" in str(refused.value)
    claude = anthropic.Anthropic(base_url=live.url, api_key="k", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as overloaded:
        claude.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert overloaded.value.status_code == 529
    assert admin(live, "/admin/serving/resume").status_code == 200
    assert client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4).choices[0].message is not None


def test_bad_operator_requests_get_clear_4xx(live):
    assert admin(live, "/admin/training/pause", key="not-a-key").status_code == 401
    assert admin(live, "/admin/rollback", {"version": 7}).status_code == 404  # no such committed version
    assert admin(live, "/admin/rollback", {}).status_code == 400
    assert admin(live, "/admin/learner", {}).status_code == 400
    assert admin(live, "/admin/learner", {"lr": -1}).status_code == 400
    assert admin(live, "/admin/promote", {}).status_code == 400  # nothing trained yet
    assert RunControls(live.store).actions() == []  # refused requests change and log nothing


def test_arborl_ops_cli(live, capsys, monkeypatch):
    monkeypatch.setenv("ARBORL_ADMIN_TOKEN", OPERATOR)
    main(["ops", "pause-training", "--gateway", live.url])
    main(["ops", "set", "lr=2e-5", "max_staleness=3", "--gateway", live.url])
    main(["ops", "status", "--gateway", live.url])
    out = capsys.readouterr().out
    assert "pause-training: done by alice" in out and "training_paused: True" in out
    assert "learner_overrides: {'lr': 2e-05, 'max_staleness': 3}" in out
    main(["ops", "log", "--gateway", live.url])
    log = capsys.readouterr().out.splitlines()
    assert [line.split()[2:4] for line in log] == [["alice", "pause_training"], ["alice", "set_learner"]]
    with pytest.raises(SystemExit, match="set takes lr=X"):
        main(["ops", "set", "momentum=1", "--gateway", live.url])
    with pytest.raises(SystemExit, match="404"):
        main(["ops", "rollback", "9", "--gateway", live.url])


def test_a_learner_publishes_every_version_to_every_gateway_of_the_run(tiny_model_dir, tiny_model, tmp_path):
    """Several gateways serve one run (a cluster's StatefulSet): `arborl train --gateway A,B`
    tells each of every version; the version served is the lowest of theirs."""
    first, second = serve_live(tiny_model_dir, tmp_path / "a", admin_token=ADMIN), serve_live(
        tiny_model_dir, tmp_path / "b", admin_token=ADMIN)
    a, b = next(first), next(second)
    try:
        publisher = GatewayPublisher([a.url, b.url + "/"], ADMIN)
        ledger = RunLedger(a.store)
        learner = Learner(ledger, a.run_dir, LearnerSettings(lr=1e-3), base_model=tiny_model_dir,
                          publisher=publisher, device="cpu")
        record_group(ledger, tiny_model, "task-0", random.Random(0), version=learner.version)
        assert learner.train_once() is not None
        checkpoint = Path(ledger.steps()[0].checkpoint)
        for live in (a, b):
            assert live.engine.stats().policy_version == 1
            assert served_equals_checkpoint(live, checkpoint)
        assert publisher.served_version() == 1
        GatewayPublisher(a.url, ADMIN).publish(lambda: {}, checkpoint, 2)  # only one of them moves on
        assert publisher.served_version() == 1 and GatewayPublisher(a.url, ADMIN).served_version() == 2
    finally:
        for server in (first, second):
            server.close()
    with pytest.raises(ValueError, match="at least one"):
        GatewayPublisher([], ADMIN)
