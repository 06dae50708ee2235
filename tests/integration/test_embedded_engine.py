"""The embedded engine on the tiny model: exact logprobs, batching, prefix reuse, swaps, limits."""

from __future__ import annotations

import asyncio

import pytest
import torch

from arborl.gateway.engines.base import Finished, FromTensors, PromptTooLong, SampledToken, SamplingParams
from arborl.gateway.engines.embedded import EmbeddedEngine


@pytest.fixture
async def engine(tiny_model_dir):
    engine = EmbeddedEngine(tiny_model_dir, model_name="tiny", prefill_chunk=64)
    await engine.start()
    yield engine
    await engine.shutdown()


async def _run(engine, prompt, params, key=None) -> tuple[list[SampledToken], Finished]:
    tokens, finished = [], None
    async for event in engine.generate(prompt, params, cache_key=key):
        if isinstance(event, Finished):
            finished = event
        else:
            tokens.append(event)
    return tokens, finished


def _prompt(engine, text: str) -> list[int]:
    return engine.tokenizer.encode(f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")


def _reference_logprobs(engine, ids: list[int], start: int, temperature: float) -> list[float]:
    """Logprobs from a plain transformers forward (sdpa attention, no engine cache)."""
    engine.model.config._attn_implementation = "sdpa"
    try:
        with torch.no_grad():
            logits = engine.model(torch.tensor([ids])).logits[0].float()
    finally:
        engine.model.config._attn_implementation = "arborl_kv"
    lp = torch.log_softmax(logits[start - 1 : -1] / temperature, -1)
    return lp.gather(1, torch.tensor(ids[start:])[:, None])[:, 0].tolist()


@pytest.mark.parametrize("temperature", [1.0, 0.6])
async def test_logprobs_are_of_the_sampling_distribution(engine, temperature):
    prompt = _prompt(engine, "hello")
    tokens, _ = await _run(engine, prompt, SamplingParams(max_tokens=24, temperature=temperature, seed=1,
                                                          ignore_eos=True))
    reference = _reference_logprobs(engine, prompt + [t.token_id for t in tokens], len(prompt), temperature)
    assert [t.logprob for t in tokens] == pytest.approx(reference, abs=1e-4)


async def test_concurrent_requests_equal_sequential_ones(engine):
    prompts = [_prompt(engine, f"request {i} " * (i + 1)) for i in range(6)]
    params = [SamplingParams(max_tokens=20, seed=i, ignore_eos=True) for i in range(6)]
    together = await asyncio.gather(*(_run(engine, p, s) for p, s in zip(prompts, params, strict=True)))
    alone = [await _run(engine, p, s) for p, s in zip(prompts, params, strict=True)]
    for (a, _), (b, _) in zip(together, alone, strict=True):
        assert [t.token_id for t in a] == [t.token_id for t in b]
        assert [t.logprob for t in a] == pytest.approx([t.logprob for t in b], abs=1e-4)


async def test_prefix_reuse_gives_the_same_tokens(engine):
    prompt = _prompt(engine, "a long shared context " * 40)  # several prefill chunks
    first, done = await _run(engine, prompt, SamplingParams(max_tokens=10, seed=2, ignore_eos=True), key="s")
    assert done.cached_prompt_tokens == 0
    turn2 = prompt + [t.token_id for t in first] + _prompt(engine, "next")
    warm, warm_done = await _run(engine, turn2, SamplingParams(max_tokens=10, seed=3), key="s")
    assert warm_done.cached_prompt_tokens == len(prompt) + len(first) - 1
    engine.prefix_cache.clear()
    cold, cold_done = await _run(engine, turn2, SamplingParams(max_tokens=10, seed=3), key="s")
    assert cold_done.cached_prompt_tokens == 0
    assert [t.token_id for t in warm] == [t.token_id for t in cold]


async def test_cancelled_generation_frees_its_slot(engine):
    stream = engine.generate(_prompt(engine, "go on forever"), SamplingParams(max_tokens=3000, ignore_eos=True))
    async for event in stream:
        assert isinstance(event, SampledToken)
        break
    await stream.aclose()
    for _ in range(200):
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.01)
    assert engine.stats().running == 0
    _, done = await _run(engine, _prompt(engine, "next"), SamplingParams(max_tokens=3))
    assert done.reason in ("stop", "length")


async def test_prompt_over_the_context_is_refused(engine):
    with pytest.raises(PromptTooLong):
        engine.generate([1] * engine.context_length, SamplingParams(max_tokens=1))
    # max_tokens beyond the context is clamped, not an error
    tokens, done = await _run(engine, [1] * (engine.context_length - 3), SamplingParams(max_tokens=50,
                                                                                          ignore_eos=True))
    assert len(tokens) == 3 and done.reason == "length"


async def test_weight_swap_between_steps_records_versions(engine):
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    stream = engine.generate(_prompt(engine, "swap"), SamplingParams(max_tokens=400, ignore_eos=True))
    versions = []
    async for event in stream:
        if isinstance(event, Finished):
            break
        versions.append(event.version)
        if len(versions) == 5:
            await engine.load_weights(FromTensors(state, version=1))
    assert versions[0] == 0 and versions[-1] == 1
    assert versions == sorted(versions)
    assert engine.stats().policy_version == 1


class _CancelMidPrefill:
    """An observer that cancels the consumer once the engine has run ``steps`` prefill steps."""

    def __init__(self, steps: int):
        self.steps, self.seen = steps, 0
        self.task: asyncio.Task | None = None
        self.loop = asyncio.get_running_loop()

    def observe_step(self, batch_size: int, new_tokens: int, seconds: float) -> None:
        self.seen += 1
        if self.seen == self.steps and self.task is not None:
            self.loop.call_soon_threadsafe(self.task.cancel)

    def observe_prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        pass

    def observe_swap(self, version: int, seconds: float) -> None:
        pass


async def test_a_prefill_aborted_midway_keeps_what_it_computed(engine):
    """A client that gives up during a long prefill retries with the same prompt: the retry
    reuses the KV the aborted request computed (2 of its 5+ chunks of 64) instead of redoing it."""
    prompt = _prompt(engine, "a long first prompt of an agent " * 45)
    assert len(prompt) > 5 * engine.prefill_chunk
    observer = _CancelMidPrefill(steps=2)
    engine.observer = observer
    observer.task = asyncio.ensure_future(_run(engine, prompt, SamplingParams(max_tokens=5), key="retry"))
    with pytest.raises(asyncio.CancelledError):
        await observer.task
    engine.observer = None
    for _ in range(200):  # the scheduler notices the abort at its next step
        if engine.stats().running == 0:
            break
        await asyncio.sleep(0.01)
    _, retry = await _run(engine, prompt, SamplingParams(max_tokens=5), key="retry")
    assert retry.cached_prompt_tokens >= 2 * engine.prefill_chunk, retry
    assert retry.cached_prompt_tokens < len(prompt) - 1  # only what was computed: the prefill had not finished


async def test_a_sequence_that_spans_a_swap_seeds_no_later_prompt(engine):
    """KV partly computed by the old weights must not serve the new version's prompts."""
    state = {k: v.clone() for k, v in engine.model.state_dict().items()}
    prompt = _prompt(engine, "swap in the middle")
    stream = engine.generate(prompt, SamplingParams(max_tokens=20, ignore_eos=True), cache_key="spans")
    tokens = []
    async for event in stream:
        if isinstance(event, Finished):
            break
        tokens.append(event.token_id)
        if len(tokens) == 3:
            await engine.load_weights(FromTensors(state, version=1))
    _, after = await _run(engine, prompt + tokens + _prompt(engine, "next"), SamplingParams(max_tokens=2),
                          key="spans")
    assert after.cached_prompt_tokens == 0
