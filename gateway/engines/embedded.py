"""The ``embedded`` engine: a transformers model served from the gateway process.

The model's own transformers code runs every forward pass; only attention is swapped, through
``AttentionInterface``, for a function that reads and writes this engine's KV buffers. That
lets one forward pass carry a *flattened batch*: the new tokens of every scheduled sequence
laid end to end as ``[1, total_tokens]``, each with its own positions and its own KV. A
scheduler thread builds those batches continuously:

    every step = one decode token for each running sequence
               + a chunk of prompt tokens for sequences still prefilling (chunked prefill,
                 so a long prompt never stalls the others' decoding)

Weight-heavy matmuls are shared by the whole batch; attention is computed per sequence
against its own cache. Weight swaps run between two steps.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import logging
import queue
import secrets
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from .base import (
    Engine,
    EngineError,
    EngineObserver,
    EngineStats,
    Finished,
    FromPath,
    FromTensors,
    GenerationEvent,
    InvalidCheckpoint,
    PromptTooLong,
    SampledToken,
    SamplingParams,
    TokenizerLike,
    WeightUpdate,
    WeightUpdateNotSupported,
)
from .constraints import Verdict, check
from .detokenizer import IncrementalDetokenizer
from .kv_cache import KVLayout, PrefixCache, SequenceKV
from .sampling import NoAllowedToken, sample_token

log = logging.getLogger(__name__)

ATTENTION_NAME = "arborl_kv"


@dataclass
class _Segment:
    """The tokens one sequence contributes to a flattened forward pass."""

    kv: SequenceKV
    start: int  # position of the first new token (= tokens already in the cache)
    length: int


def _flattened_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Attention over a flattened batch; ``kwargs['arborl_segments']`` says whose tokens are where.

    query: [1, heads, T, dim]; key/value: [1, kv_heads, T, dim] for the T new tokens.
    Each segment's keys/values are written into its sequence's buffers, then its queries
    attend causally to everything that sequence has cached.
    """
    segments: list[_Segment] = kwargs["arborl_segments"]
    layer = module.layer_idx
    outputs = []
    offset = 0
    for seg in segments:
        q = query[:, :, offset : offset + seg.length]
        span = slice(offset, offset + seg.length)
        seg.kv.write(layer, seg.start, key[:, :, span], value[:, :, span])
        total = seg.start + seg.length
        k, v = seg.kv.view(layer, total)
        if seg.length == 1:
            out = F.scaled_dot_product_attention(q, k, v, scale=scaling, enable_gqa=True)
        elif seg.start == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scaling, enable_gqa=True)
        else:
            mask = torch.ones(seg.length, total, dtype=torch.bool, device=q.device).tril(seg.start)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling, enable_gqa=True)
        outputs.append(out)
        offset += seg.length
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, _flattened_attention)
    # Masks are built per segment inside the attention function; skip the model's mask.
    AttentionMaskInterface.register(ATTENTION_NAME, lambda *args, **kwargs: None)


def _read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file, or every safetensors file of a folder (Hugging Face layout)."""
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise InvalidCheckpoint(f"{path} holds no .safetensors files")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # safetensors' own error, OSError, ...: whatever it is, not a checkpoint
            raise InvalidCheckpoint(f"{file} is not a readable safetensors file ({type(exc).__name__}: {exc})") from exc
    return state


def _seed_bits(seed: int) -> int:
    digest = hashlib.blake2b(str(seed).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    cache_key: str | None
    emit: Callable[[GenerationEvent | BaseException], object]  # an exception: the engine failed the request
    max_new_tokens: int
    generator: torch.Generator
    detokenizer: IncrementalDetokenizer
    kv: SequenceKV | None = None
    cached_prompt_tokens: int = 0
    kv_version: int = 0  # the policy version that computes this sequence's KV (set when it starts)
    forced_call_done: bool = False  # the forced tool call (params.forced_call) is complete: sample freely
    output_ids: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False

    @property
    def prefilling(self) -> bool:
        return self.kv is not None and self.kv.length < len(self.prompt_ids)

    def next_input(self, budget: int) -> list[int]:
        """The tokens to feed next: a prompt chunk, or the last sampled token."""
        assert self.kv is not None
        if self.prefilling:
            return self.prompt_ids[self.kv.length : self.kv.length + budget]
        return self.output_ids[-1:]


class _TokensByLead:
    """Token ids by how their text begins, to find the few tokens that can continue a forced call.

    Where the call's syntax allows whitespace next, a token " foo" can only be allowed if "f" can
    follow the whitespace: so tokens are indexed by their first character and by their first
    character that is not whitespace (all-whitespace tokens under " ").
    """

    _BLANKS = " \t\n\r"
    _WHITESPACE = frozenset(_BLANKS)

    def __init__(self, texts: list[str]):
        self.by_first: dict[str, list[int]] = {}
        self.by_lead: dict[str, list[int]] = {}
        for token, text in enumerate(texts):
            if not text:
                continue
            self.by_first.setdefault(text[0], []).append(token)
            lead = text.lstrip(self._BLANKS)
            self.by_lead.setdefault(lead[0] if lead else " ", []).append(token)

    def could_start_with(self, chars: frozenset[str]) -> list[int]:
        if not chars & self._WHITESPACE:
            return [token for char in chars for token in self.by_first.get(char, ())]
        leads = (chars - self._WHITESPACE) | {" "}
        return [token for char in leads for token in self.by_lead.get(char, ())]


@dataclass
class _Command:
    """Work run on the scheduler thread between steps (weight swaps, scoring)."""

    run: Callable[[], object]
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)


class EmbeddedEngine(Engine):
    """Serve a transformers causal LM on the CPU or one CUDA device."""

    weight_updates = (FromPath, FromTensors)

    def __init__(
        self,
        model_dir: str | Path,
        *,
        model_name: str | None = None,
        device: str | None = None,
        dtype: torch.dtype | None = None,
        max_running: int = 16,
        prefill_chunk: int = 512,
        cache_capacity_tokens: int | None = None,
        cache_memory_bytes: int = 2 << 30,
        observer: EngineObserver | None = None,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        _register_attention()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        model_dir = Path(model_dir)
        self.model_name = model_name or model_dir.name
        # cast: transformers types decode and convert_ids_to_tokens as str | list[str] whatever they are given
        self.tokenizer = cast(TokenizerLike, AutoTokenizer.from_pretrained(model_dir))
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
        # ignore: transformers types PreTrainedModel.to as a _Wrapped that takes the model as its first argument
        self.model = model.to(self.device).eval()  # type: ignore[arg-type]
        self.model.config._attn_implementation = ATTENTION_NAME
        config = self.model.config
        self.context_length = int(getattr(config, "max_position_embeddings", 4096))
        self.model_family = str(getattr(config, "model_type", "") or "")
        self.layout = KVLayout(
            num_layers=config.num_hidden_layers,
            num_kv_heads=getattr(config, "num_key_value_heads", config.num_attention_heads),
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
            dtype=dtype,
            device=self.device,
        )
        self.eos_token_ids = self._eos_ids()
        capacity = cache_capacity_tokens or max(cache_memory_bytes // self.layout.bytes_per_token, 1)
        self.prefix_cache = PrefixCache(capacity)
        self.max_running = max_running
        self.prefill_chunk = prefill_chunk
        self.observer = observer
        self.version = 0
        self._inbox: queue.Queue[_Request | _Command | None] = queue.Queue()
        self._waiting: list[_Request] = []
        self._running: list[_Request] = []
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None
        self._tokens_by_lead: _TokensByLead | None = None  # for forced tool calls (_forced_call_filter)

    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        for source in (self.model.config, getattr(self.model, "generation_config", None)):
            eos = getattr(source, "eos_token_id", None)
            ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return frozenset(ids)

    # -- public interface -------------------------------------------------------------------

    async def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="arborl-engine", daemon=True)
            self._thread.start()

    async def shutdown(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            await asyncio.to_thread(self._thread.join, 30)
            self._thread = None

    @property
    def healthy(self) -> bool:
        return self._failed is None and (self._thread is None or self._thread.is_alive())

    def stats(self) -> EngineStats:
        return EngineStats(
            waiting=len(self._waiting) + self._inbox.qsize(),
            running=len(self._running),
            cached_tokens=self.prefix_cache.cached_tokens,
            cache_capacity_tokens=self.prefix_cache.capacity_tokens,
            policy_version=self.version,
        )

    def check_prompt(self, prompt_tokens: int) -> None:
        if prompt_tokens < 1 or prompt_tokens >= self.context_length:
            raise PromptTooLong(prompt_tokens, self.context_length)

    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, cache_key: str | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        self.check_prompt(len(prompt_ids))
        if not self.healthy:
            raise EngineError(f"engine stopped: {self._failed!r}")
        return self._stream(list(prompt_ids), params, cache_key)

    async def _stream(
        self, prompt_ids: list[int], params: SamplingParams, cache_key: str | None
    ) -> AsyncGenerator[GenerationEvent, None]:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        # torch's CPU generator keeps 32 bits of its seed: hash any client integer onto them,
        # so seeds that differ only in their high bits still give different samples.
        seed = _seed_bits(params.seed) if params.seed is not None else secrets.randbits(32)
        request = _Request(
            prompt_ids=prompt_ids,
            params=params,
            cache_key=cache_key,
            emit=lambda event: loop.call_soon_threadsafe(events.put_nowait, event),
            max_new_tokens=max(0, min(params.max_tokens, self.context_length - len(prompt_ids))),
            generator=torch.Generator(device="cpu").manual_seed(seed),
            detokenizer=IncrementalDetokenizer(self.tokenizer, params.stop),
        )
        self._inbox.put(request)
        try:
            while True:
                event = await events.get()
                if isinstance(event, BaseException):
                    raise EngineError(str(event)) from event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            request.cancelled = True  # the scheduler frees the slot at its next step

    async def load_weights(self, update: WeightUpdate) -> None:
        if isinstance(update, FromPath):
            # Reading a checkpoint takes a while for a real model: not on the event loop.
            state = await asyncio.to_thread(_read_checkpoint, Path(update.path))
        elif isinstance(update, FromTensors):
            state = dict(update.state_dict)
        else:
            raise WeightUpdateNotSupported(f"the embedded engine cannot take {type(update).__name__}")
        await self._run_command(lambda: self._swap(state, update.version))

    async def _run_command(self, fn: Callable[[], object]):
        command = _Command(fn)
        if self._thread is None:  # not started (tests, offline scoring): run inline
            return fn()
        self._inbox.put(command)
        return await asyncio.wrap_future(command.future)

    # -- scheduler thread ---------------------------------------------------------------------

    def _loop(self) -> None:
        try:
            with torch.inference_mode():
                while self._admit(block=not (self._running or self._waiting)):
                    self._step()
        except BaseException as exc:
            log.exception("engine scheduler failed")
            self._failed = exc
            for request in self._running + self._waiting:
                request.emit(exc)

    def _admit(self, block: bool) -> bool:
        """Move new requests and commands off the inbox. False when asked to stop."""
        while True:
            try:
                item = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                for request in self._running + self._waiting:
                    self._finish(request, Finished("abort"))
                return False
            if isinstance(item, _Command):
                try:
                    item.future.set_result(item.run())
                except Exception as exc:  # noqa: BLE001 - delivered to the caller
                    item.future.set_exception(exc)
            else:
                self._waiting.append(item)

    def _start_sequence(self, request: _Request) -> None:
        """Give a waiting request its KV, reusing the longest cached prefix."""
        request.kv = SequenceKV(self.layout, capacity=len(request.prompt_ids) + min(request.max_new_tokens, 256))
        request.kv_version = self.version
        entry, hit = self.prefix_cache.lookup(request.prompt_ids, request.cache_key)
        if entry is not None:
            request.kv.copy_prefix_from(entry.kv, hit)
            request.cached_prompt_tokens = hit
        if self.observer:
            self.observer.observe_prefix_lookup(len(request.prompt_ids), hit)

    def _step(self) -> None:
        for request in [r for r in self._running + self._waiting if r.cancelled and not r.done]:
            self._finish(request, Finished("abort"))
        self._running = [r for r in self._running if not r.done]
        self._waiting = [r for r in self._waiting if not r.done]
        while self._waiting and len(self._running) < self.max_running:
            request = self._waiting.pop(0)
            self._start_sequence(request)
            self._running.append(request)
        if not self._running:
            return

        batch: list[tuple[_Request, list[int]]] = []
        prefill_budget = self.prefill_chunk
        for request in self._running:
            if request.prefilling:
                if prefill_budget <= 0:
                    continue
                tokens = request.next_input(prefill_budget)
                prefill_budget -= len(tokens)
            else:
                tokens = request.next_input(1)
            batch.append((request, tokens))

        started = time.perf_counter()
        try:
            logits = self._forward(batch)
        except Exception as exc:  # fail this batch's requests, keep serving the others
            log.exception("engine forward failed for a batch of %d", len(batch))
            for request, _ in batch:
                self._fail(request, exc)
            self._running = [r for r in self._running if not r.done]
            return
        for (request, _), row in zip(batch, logits, strict=True):
            if request.prefilling:
                continue  # the prompt is not finished: nothing to sample yet
            try:
                self._sample(request, row)
            except Exception as exc:  # one request's failure is its own
                log.exception("sampling failed for one request")
                self._fail(request, exc)
        if self.observer:
            new_tokens = sum(len(tokens) for _, tokens in batch)
            self.observer.observe_step(len(batch), new_tokens, time.perf_counter() - started)
        # Drop finished sequences now: when the engine goes idle there is no next step to do it.
        self._running = [r for r in self._running if not r.done]

    def _forward(self, batch: list[tuple[_Request, list[int]]]) -> torch.Tensor:
        """One forward pass over the flattened batch; the logits at each sequence's last new token."""
        segments: list[_Segment] = []
        ids: list[int] = []
        positions: list[int] = []
        last: list[int] = []
        for request, tokens in batch:
            kv = request.kv
            assert kv is not None
            kv.reserve(len(tokens))
            segments.append(_Segment(kv, kv.length, len(tokens)))
            ids.extend(tokens)
            positions.extend(range(kv.length, kv.length + len(tokens)))
            last.append(len(ids) - 1)
        out = self.model(
            input_ids=torch.tensor([ids], device=self.device),
            position_ids=torch.tensor([positions], device=self.device),
            logits_to_keep=torch.tensor(last, device=self.device),
            use_cache=False,
            arborl_segments=segments,
        )
        for segment in segments:
            segment.kv.length += segment.length
        return out.logits[0].float()

    def _sample(self, request: _Request, logits: torch.Tensor) -> None:
        params = request.params
        if request.max_new_tokens == 0:
            self._finish(request, Finished("length"))
            return
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        forced = self._forced_call_filter(request, stop_ids)
        try:
            token, logprob, top = sample_token(logits, params, request.generator, *(forced or (None, None)))
        except NoAllowedToken:  # the model cannot go on under the constraint: it goes on free
            request.forced_call_done = True
            token, logprob, top = sample_token(logits, params, request.generator)
        request.output_ids.append(token)
        if token in stop_ids:
            request.emit(SampledToken(token, logprob, self.version, "", top))
            self._finish(request, Finished("stop", matched_stop=token, text=request.detokenizer.flush()))
            return
        text = request.detokenizer.add(token)
        request.emit(SampledToken(token, logprob, self.version, text, top))
        if request.detokenizer.matched_stop is not None:
            self._finish(request, Finished("stop", matched_stop=request.detokenizer.matched_stop))
        elif len(request.output_ids) >= request.max_new_tokens:
            self._finish(request, Finished("length", text=request.detokenizer.flush()))

    def _forced_call_filter(
        self, request: _Request, stop_ids: set[int]
    ) -> tuple[Callable[[int], bool], list[int] | None] | None:
        """Which next tokens keep a forced tool call well-formed, and the only ones that can be
        (None: no constraint, or it is met). Once the token budget left is only just enough for
        the call's shortest ending, that ending is written token by token (each then has
        probability 1 under the constraint), so the call is complete before the budget is."""
        constraint = request.params.forced_call
        if constraint is None or request.forced_call_done:
            return None
        decode, ids = self.tokenizer.decode, request.output_ids
        # An incomplete UTF-8 character decodes as U+FFFD: a character a JSON string may hold, and
        # nothing else may, so a token that starts one outside a string is refused.
        now = check(constraint, decode(ids))
        if now.verdict is Verdict.DONE:  # the last token completed the call: free from here on
            request.forced_call_done = True
            return None
        left = request.max_new_tokens - len(ids)
        closing = False
        if left <= len(now.completion) + 2:  # a token holds at least one character: the end may be near
            ending = self.tokenizer.encode(now.completion, add_special_tokens=False)
            closing = left <= len(ending) + 1
            # Tokenizers that prefix a space to what they encode (SentencePiece) would change the
            # text: then each token must only bring the end nearer instead.
            if closing and check(constraint, decode([*ids, *ending])).verdict is Verdict.DONE:
                return (lambda token: token == ending[0]), [ending[0]]

        def allowed(token: int) -> bool:
            if token in stop_ids:
                return False  # the call is not complete yet
            after = check(constraint, decode([*ids, token]))
            if after.verdict is Verdict.INVALID:
                return False
            return not closing or after.verdict is Verdict.DONE or len(after.completion) < len(now.completion)

        shortlist = None
        if now.next_chars is not None:
            shortlist = self._token_index().could_start_with(now.next_chars)
        return allowed, shortlist

    def _token_index(self) -> _TokensByLead:
        if self._tokens_by_lead is None:  # built once, on the first forced call (~0.2 s for 50k tokens)
            self._tokens_by_lead = _TokensByLead([self.tokenizer.decode([t]) for t in range(len(self.tokenizer))])
        return self._tokens_by_lead

    def _fail(self, request: _Request, exc: Exception) -> None:
        request.done = True
        request.emit(exc)

    def _finish(self, request: _Request, event: Finished) -> None:
        if request.done:
            return
        request.done = True
        if self._worth_caching(request):
            assert request.cache_key is not None and request.kv is not None  # _worth_caching checks both
            self.prefix_cache.store(request.cache_key, request.prompt_ids + request.output_ids, request.kv)
        request.emit(
            Finished(
                event.reason,
                matched_stop=event.matched_stop,
                text=event.text,
                prompt_tokens=len(request.prompt_ids),
                cached_prompt_tokens=request.cached_prompt_tokens,
            )
        )

    def _worth_caching(self, request: _Request) -> bool:
        """Whether a sequence's KV should seed later prompts of its session.

        An aborted request's KV is kept too: whatever happened after it, a prefill's KV is valid,
        and the client that gave up during a long prefill retries with the same prompt (then it
        pays only for what was not computed yet). Not when the abort came before anything past its
        cache hit was computed (it would replace a longer entry with a copy of part of it), and
        never when a weight swap happened since the sequence started: part of its KV is then the
        old policy's, which must not serve the new one.
        """
        kv = request.kv
        if kv is None or not request.cache_key or request.kv_version != self.version:
            return False
        return kv.length > request.cached_prompt_tokens

    def _swap(self, state: dict[str, torch.Tensor], version: int) -> None:
        started = time.perf_counter()
        # Check everything before copying anything: a half-loaded model would serve a policy
        # that never existed.
        current = self.model.state_dict()
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        missing = sorted(set(current) - set(state) - tied)
        unexpected = sorted(set(state) - set(current))
        wrong_shape = sorted(k for k in state.keys() & current.keys() if state[k].shape != current[k].shape)
        if missing or unexpected or wrong_shape:
            raise InvalidCheckpoint(f"weights do not fit the model: missing {missing[:5]}, "
                                    f"unexpected {unexpected[:5]}, wrong shape {wrong_shape[:5]}")
        self.model.load_state_dict(state, strict=False)
        # KV computed by the old weights must not seed prompts of the new policy.
        self.prefix_cache.clear()
        self.version = version
        if self.observer:
            self.observer.observe_swap(version, time.perf_counter() - started)

