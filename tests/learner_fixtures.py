"""Groups of rollouts written the way the gateway and the orchestrator write them, for learner tests."""

from __future__ import annotations

import random

import pytest
import torch

from arborl.rollout.records import CallRecord
from arborl.rollout.store import RunLedger


@torch.no_grad()
def _logprobs(model, context: list[int], completion: list[int]) -> list[float]:
    """What a serving engine with the same weights records for ``completion`` after ``context``."""
    ids = torch.tensor([context + completion])
    logp = torch.log_softmax(model(input_ids=ids).logits[0, len(context) - 1 : -1].float(), dim=-1)
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0].tolist()


def record_group(ledger: RunLedger, model, task: str, rng: random.Random, *, rollouts: int = 4, turns: int = 2,
                 version: int = 0, rewards: list[float] | None = None) -> int:
    """A complete group of agent-shaped rollouts written the way the gateway and orchestrator write them."""
    vocab = model.config.vocab_size
    group = ledger.open_group(task, rollouts)
    prompt = [rng.randrange(vocab) for _ in range(24)]
    for r in range(rollouts):
        session = f"{task}-rollout-{r}"
        ledger.start_rollout(session, group, scaffold="synthetic")
        context = list(prompt)
        for turn in range(turns):
            completion = [rng.randrange(vocab) for _ in range(6)]
            ledger.store.record_call(CallRecord(
                id=f"{session}-call-{turn}", session_id=session, dialect="openai", model="tiny",
                prompt_ids=list(context), completion_ids=completion,
                completion_logprobs=_logprobs(model, context, completion), completion_versions=[version] * 6,
            ))
            context += completion + [rng.randrange(vocab) for _ in range(5)]  # the tool's output
        ledger.finish_rollout(session, rewards[r] if rewards else float(r % 2))
    return group


@pytest.fixture
def one_torch_thread():
    """Run a tiny-model test on one intra-op thread (restored after it).

    Its ops are far too small to gain from a second thread, and on a busy machine (the suite beside
    other work on two cores) every parallel region waits for a descheduled thread: with both cores
    busy, test_mcla's variance test took 19.6 s on two threads and 5.2 s on one. Use it with
    ``pytestmark = pytest.mark.usefixtures("one_torch_thread")`` after importing it.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
