"""The asynchronous learner loop: groups from the ledger, steps, checkpoints, publishing, resume.

- a group sampled through a live gateway (the ``openai`` SDK) is trained on and the new version
  is served, with the served weights equal to the committed checkpoint;
- stale and uninformative groups are dropped and counted, never trained on;
- a call without a prompt is refused and counted, its group trains on the rest; a step whose loss
  is not finite commits and publishes nothing, and its groups are dropped (``non_finite``);
- ``arborl train`` killed with SIGKILL in the middle of steps and resumed twice ends with the
  same weights, bit for bit, as an uninterrupted run on a copy of the same store, and the ledger
  shows every group trained by exactly one step; on the fsdp backend (2 ranks) and the megatron
  backend (tensor parallel 2) the same when one follower rank is killed mid-step and then the
  leader while it writes a checkpoint.
"""

from __future__ import annotations

import importlib.util
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest
import torch
from safetensors.torch import load_file

from arborl.learner.group_data import load_group
from arborl.learner.loop import Learner, LearnerError
from arborl.learner.publish import GatewayPublisher, InProcessPublisher
from arborl.learner.settings import LearnerSettings
from arborl.rollout.records import CallRecord
from arborl.rollout.store import RunLedger, SqliteTrajectoryStore
from conftest import serve_live
from learner_fixtures import record_group

ADMIN = "admin-secret-0123456789"


@pytest.fixture
def live(tiny_model_dir: Path, tmp_path: Path):
    yield from serve_live(tiny_model_dir, tmp_path, admin_token=ADMIN)


def test_a_group_sampled_through_the_gateway_is_trained_on_and_served(live, tiny_model_dir: Path, tmp_path: Path):
    ledger = RunLedger(live.store)
    group = ledger.open_group("count-to-three", 4)
    for r in range(4):
        session = f"rollout-{r}"
        ledger.start_rollout(session, group, scaffold="sdk")
        client = openai.OpenAI(base_url=f"{live.url}/s/{session}/v1", api_key="k", max_retries=0)
        messages = [{"role": "user", "content": "Count to three."}]
        for _ in range(2):  # two turns, the second extending the first
            reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, seed=r)
            messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                         {"role": "user", "content": "Again."}]
        completed = ledger.finish_rollout(session, float(r % 2))
        assert completed == (r == 3)
    assert [g.id for g in ledger.pending_groups()] == [group]

    settings = LearnerSettings(lr=1e-3, groups_per_step=1)
    learner = Learner(ledger, tmp_path, settings, base_model=tiny_model_dir,
                      publisher=GatewayPublisher(live.url, ADMIN), device="cpu")
    report = learner.train_once()
    assert report is not None and (report.step, report.version, report.groups) == (1, 1, [group])
    assert report.metrics["mismatch_abs"] < 1e-3  # sampled by the same weights it trains
    assert ledger.consumed() == {group: 1} and ledger.pending_groups() == []

    checkpoint = Path(ledger.last_step().checkpoint)
    assert live.engine.stats().policy_version == 1
    served = live.engine.model.state_dict()
    for name, value in load_file(checkpoint / "model.safetensors").items():
        assert torch.equal(served[name], value.to(served[name].dtype)), name
    # The checkpoint is a Hugging Face folder: transformers loads it as it is.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(checkpoint)
    AutoTokenizer.from_pretrained(checkpoint)
    # The next call of a session is sampled by version 1.
    reply = openai.OpenAI(base_url=f"{live.url}/s/after/v1", api_key="k").chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert reply.choices[0].message.content is not None
    assert set(live.store.calls("after")[0].completion_versions) == {1}


def test_in_process_learner_publishes_into_the_serving_engine(live, tiny_model, tiny_model_dir: Path, tmp_path):
    """The learner in a thread beside the gateway (as ``arborl up`` runs it), no checkpoint round trip."""
    ledger = RunLedger(live.store)
    record_group(ledger, tiny_model, "in-process", random.Random(2))
    learner = Learner(ledger, tmp_path, LearnerSettings(lr=1e-3), base_model=tiny_model_dir, device="cpu",
                      publisher=InProcessPublisher(live.engine))
    worker = threading.Thread(target=learner.run, kwargs={"max_steps": 1})
    worker.start()
    worker.join(timeout=120)
    assert learner.step == 1 and live.engine.stats().policy_version == 1
    served = live.engine.model.state_dict()
    for name, value in learner.trainer.backend.model.state_dict().items():
        assert torch.equal(served[name], value.to(served[name].dtype)), name


def test_stale_and_uniform_groups_are_dropped_and_counted(tiny_model, tiny_model_dir: Path, tmp_path: Path):
    ledger = RunLedger(SqliteTrajectoryStore(tmp_path / "store.sqlite"))
    rng = random.Random(0)
    first = record_group(ledger, tiny_model, "a", rng)
    uniform = record_group(ledger, tiny_model, "b", rng, rewards=[1.0] * 4, version=1)
    stale = record_group(ledger, tiny_model, "c", rng)  # sampled by version 0, like the first
    fresh = record_group(ledger, tiny_model, "d", rng, version=1)
    learner = Learner(ledger, tmp_path, LearnerSettings(max_staleness=0), base_model=tiny_model_dir, device="cpu")
    assert learner.train_once().groups == [first]  # version 0 -> staleness 0
    assert learner.train_once().groups == [fresh]  # learner at version 1: c is 1 version old
    dropped = {g: r for g, r in ledger.store.query("SELECT id, dropped FROM groups WHERE dropped IS NOT NULL")}
    assert dropped == {uniform: "uniform_reward", stale: "stale"}
    assert learner.metrics.groups_dropped.labels("stale")._value.get() == 1
    assert learner.train_once() is None  # nothing left
    # A second learner on a run with committed steps must be told to resume.
    with pytest.raises(LearnerError, match="resume"):
        Learner(ledger, tmp_path, LearnerSettings(), base_model=tiny_model_dir, device="cpu")
    resumed = Learner(ledger, tmp_path, LearnerSettings(), base_model=tiny_model_dir, device="cpu", resume=True)
    assert (resumed.step, resumed.version) == (2, 2)


class _RecordingPublisher:
    """Serving as the learner sees it: which versions were published."""

    def __init__(self):
        self.versions: list[int] = []

    def publish(self, model, checkpoint: Path, version: int) -> None:
        self.versions.append(version)

    def served_version(self) -> int:
        return self.versions[-1] if self.versions else 0


def test_a_call_without_a_prompt_is_refused_and_counted(tiny_model, tiny_model_dir: Path, tmp_path: Path):
    """A main call with an empty prompt (a completions request with prompt "") is listed by the
    ledger; its first token has no context, so no logprob: trained on, it made every weight NaN."""
    ledger = RunLedger(SqliteTrajectoryStore(tmp_path / "store.sqlite"))
    group = record_group(ledger, tiny_model, "empty", random.Random(3))
    ledger.store.record_call(CallRecord(
        id="no-prompt", session_id="empty-rollout-0", dialect="openai", model="tiny", prompt_ids=[],
        completion_ids=[5, 6, 7], completion_logprobs=[-4.0] * 3, completion_versions=[0] * 3,
    ))
    assert "no-prompt" in {call.id for call in ledger.training_calls("empty-rollout-0")}
    data = load_group(ledger, ledger.group(group))
    assert data.refused == {"empty_prompt": 1} and data.calls == 8
    # entropy-aware rescaling on: a NaN entropy would reach every advantage
    learner = Learner(ledger, tmp_path, LearnerSettings(lr=1e-3, entropy_mu=0.1), base_model=tiny_model_dir,
                      device="cpu")
    report = learner.train_once()
    assert report is not None and not report.skipped and report.groups == [group]
    assert report.metrics["calls_refused"] == 1.0 and report.metrics["skipped"] == 0.0
    assert learner.metrics.calls_refused.labels("empty_prompt")._value.get() == 1
    assert all(torch.isfinite(p).all() for p in learner.trainer.backend.model.parameters())


def test_a_non_finite_step_commits_and_publishes_nothing(tiny_model, tiny_model_dir: Path, tmp_path: Path):
    ledger = RunLedger(SqliteTrajectoryStore(tmp_path / "store.sqlite"))
    rng = random.Random(4)
    # a verifier's infinite reward: the group's mean is infinite, every advantage NaN
    broken = record_group(ledger, tiny_model, "broken", rng, rewards=[float("inf"), 0.0, 1.0, 0.0])
    fine = record_group(ledger, tiny_model, "fine", rng)
    publisher = _RecordingPublisher()
    learner = Learner(ledger, tmp_path, LearnerSettings(lr=1e-3), base_model=tiny_model_dir, device="cpu",
                      publisher=publisher)
    start = {name: p.detach().clone() for name, p in learner.trainer.backend.model.named_parameters()}

    report = learner.train_once()
    assert report is not None and report.skipped and report.groups == [broken]
    assert (report.step, report.version) == (0, 0) == (learner.step, learner.version)
    assert publisher.versions == [] and ledger.steps() == []
    for name, p in learner.trainer.backend.model.named_parameters():
        assert torch.equal(p.detach(), start[name]), name
    # not lost: dropped, with the reason, so no later step trains it twice (or forever)
    assert ledger.group(broken).dropped == "non_finite" and [g.id for g in ledger.pending_groups()] == [fine]
    assert learner.metrics.steps_skipped.labels("non_finite")._value.get() == 1
    assert learner.metrics.groups_dropped.labels("non_finite")._value.get() == 1

    report = learner.train_once()  # the next group is step 1, version 1, published
    assert not report.skipped and (report.step, report.version, report.groups) == (1, 1, [fine])
    assert publisher.versions == [1] and ledger.consumed() == {fine: 1}


def test_a_non_finite_feedback_step_is_skipped_and_its_feedback_used(tiny_model, tiny_model_dir: Path,
                                                                     tmp_path: Path):
    ledger = RunLedger(SqliteTrajectoryStore(tmp_path / "store.sqlite"))
    rng = random.Random(5)
    prompt = [rng.randrange(tiny_model.config.vocab_size) for _ in range(12)]
    completion = [rng.randrange(tiny_model.config.vocab_size) for _ in range(6)]
    ledger.store.record_call(CallRecord(
        id="production-call", session_id="production", dialect="openai", model="tiny", prompt_ids=prompt,
        completion_ids=completion, completion_logprobs=[-4.0] * 6, completion_versions=[0] * 6,
    ))
    ledger.add_feedback("production", who="operator", reward=float("inf"))  # pg advantage inf: loss not finite
    publisher = _RecordingPublisher()
    learner = Learner(ledger, tmp_path, LearnerSettings(lr=1e-3, feedback="pg"), base_model=tiny_model_dir,
                      device="cpu", publisher=publisher)
    report = learner.train_feedback_once()
    assert report is not None and report.skipped and (report.step, report.version) == (0, 0)
    assert publisher.versions == [] and ledger.steps() == [] and ledger.pending_feedback() == []
    assert learner.metrics.steps_skipped.labels("non_finite")._value.get() == 1
    assert all(torch.isfinite(p).all() for p in learner.trainer.backend.model.parameters())


def _train(run: Path, model_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "arborl.ops.cli", "train", "--store", str(run), "--model", str(model_dir),
               "--device", "cpu", "--lr", "1e-3", "--groups-per-step", "2", "--idle-exit", "0", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def _kill_when(process: subprocess.Popen, marker: str, *, rank: int = 0) -> list[str]:
    """Read the learner's progress until ``marker``, then SIGKILL its rank ``rank`` on the spot
    (0: the learner's own process; another: that follower, whose pid the start line gives)."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if marker in line:
            if rank == 0:
                process.send_signal(signal.SIGKILL)
            else:
                started = next(line for line in lines if "ranks (pids " in line)
                pids = started.split("ranks (pids ")[1].split(")")[0].split()
                os.kill(int(pids[rank]), signal.SIGKILL)
            output, _ = process.communicate(timeout=120)
            return lines + [output]
    raise AssertionError(f"the learner ended before {marker!r}:\n{''.join(lines)}")


def _finish(process: subprocess.Popen) -> str:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    return output


BACKENDS = {"torch": (), "fsdp": ("--backend", "fsdp", "--nproc", "2"),
            "megatron": ("--backend", "megatron", "--nproc", "2", "--tensor-parallel", "2")}
_MEGATRON = importlib.util.find_spec("megatron") is not None


@pytest.mark.parametrize("backend", [
    "torch", pytest.param("fsdp", marks=pytest.mark.slow),
    pytest.param("megatron", marks=[pytest.mark.slow, pytest.mark.skipif(not _MEGATRON, reason="no megatron-core")]),
])
def test_kill_9_and_resume_trains_every_group_exactly_once(backend, tiny_model, tiny_model_dir: Path, tmp_path: Path):
    run, reference = tmp_path / "run", tmp_path / "reference"
    ledger = RunLedger(SqliteTrajectoryStore(run / "store.sqlite"))
    rng = random.Random(1)
    groups = [record_group(ledger, tiny_model, f"task-{i}", rng) for i in range(8)]
    ledger.store.close()
    shutil.copytree(run, reference)
    flags = BACKENDS[backend]

    # Killed while training step 2 (fsdp: one follower rank, so the learner fails there and stops),
    # then while writing step 3's checkpoint, then run to the end.
    died = _kill_when(_train(run, tiny_model_dir, *flags), "step 2: training on", rank=1 if flags else 0)
    if flags:
        assert "learner rank 1 exited" in died[-1], died[-1]  # said, not a hang or a bare gloo error
    _kill_when(_train(run, tiny_model_dir, "--resume", *flags), "step 3: saving checkpoint")
    output = _finish(_train(run, tiny_model_dir, "--resume", *flags))
    assert "resumed at step 2" in output
    _finish(_train(reference, tiny_model_dir, *flags))

    ledger = RunLedger(SqliteTrajectoryStore(run / "store.sqlite"))
    steps = ledger.steps()
    assert [s.step for s in steps] == [1, 2, 3, 4] and [s.version for s in steps] == [1, 2, 3, 4]
    trained = [g for s in steps for g in s.metrics["groups"]]
    assert sorted(trained) == sorted(groups)  # each group in exactly one committed step
    assert ledger.consumed() == {g: s.step for s in steps for g in s.metrics["groups"]}
    # Only committed checkpoints remain, the newest three.
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step-00000{k}" for k in (2, 3, 4)]

    ours = load_file(run / "checkpoints" / "step-000004" / "model.safetensors")
    theirs = load_file(reference / "checkpoints" / "step-000004" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), f"{name} differs from the uninterrupted run"
    # And training moved the weights at all.
    assert not torch.equal(ours["model.embed_tokens.weight"], tiny_model.state_dict()["model.embed_tokens.weight"])
