"""A vLLM server behind the gateway: token ids in, the engine's own token ids and logprobs out.

The gateway renders and stitches prompts as for the embedded engine and sends the ids to
vLLM's OpenAI-compatible ``/v1/completions`` (``prompt`` as a list of ids, streaming, with
``return_token_ids`` and ``logprobs``), so what is recorded is what vLLM sampled, never text
tokenised again. The server must be started with ``--logprobs-mode processed_logprobs``:
arborl records each token's logprob under the distribution it was drawn from (after
temperature, top-k and top-p), as the embedded engine does.

Invariants:
- every ``SampledToken`` is one id vLLM returned, with the logprob vLLM returned for it;
- the stream ends with one ``Finished``; closing it early closes the HTTP stream, and vLLM aborts
  the request when its client goes;
- ``version`` is the version the server serves: a weight update pauses the server until the
  requests in flight finish (``/pause?mode=wait``), reloads the checkpoint in place
  (``collective_rpc reload_weights``), drops the prefix cache (no KV of the old weights serves
  the new ones) and resumes, so every token of a request comes from one version;
- stop strings are matched by arborl's detokenizer on the ids (as for the embedded engine) and
  also passed to vLLM, so it stops as soon as they match.

A request forcing a tool call (``SamplingParams.forced_call``) is sampled without the constraint:
the prompt already ends with the call's opening, and a malformed call comes back as text.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any, cast

import httpx

from .base import (
    Engine,
    EngineError,
    EngineStats,
    Finished,
    FinishReason,
    FromPath,
    GenerationEvent,
    InvalidCheckpoint,
    PromptTooLong,
    SampledToken,
    SamplingParams,
    TokenizerLike,
    WeightUpdate,
    WeightUpdateNotSupported,
)
from .detokenizer import IncrementalDetokenizer
from .event_stream import UnreadableEvent, json_events

log = logging.getLogger(__name__)

_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


class VllmEngine(Engine):
    """One vLLM server at ``url`` (``http://host:port``) serving the model in ``model_dir``.

    ``model_dir`` gives the tokenizer the gateway renders with and the model's family; it must be
    the folder the server loaded (same tokenizer). ``max_running``: how many requests the
    server decodes at once (its ``--max-num-seqs``); beyond it requests count as waiting.
    """

    weight_updates = (FromPath,)

    def __init__(self, url: str, model_dir: str | Path, *, model_name: str | None = None,
                 max_running: int = 16, timeout_s: float = 600.0, connect_timeout_s: float = 10.0):
        from transformers import AutoConfig, AutoTokenizer

        self.url = url.rstrip("/")
        model_dir = Path(model_dir)
        self.model_name = model_name or model_dir.name
        # cast: transformers types decode and convert_ids_to_tokens as str | list[str] whatever they are given
        self.tokenizer = cast(TokenizerLike, AutoTokenizer.from_pretrained(model_dir))
        config = AutoConfig.from_pretrained(model_dir)
        self.model_family = str(getattr(config, "model_type", "") or "")
        self.context_length = int(getattr(config, "max_position_embeddings", 4096))  # until the server says
        self.max_running = max_running
        self.version = 0
        self._served_model = ""  # the model name the server knows (from /v1/models)
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._client: httpx.AsyncClient | None = None
        self._in_flight = 0
        self._failure: str | None = None  # why the server is not usable now, if it is not
        self._swap = asyncio.Lock()

    async def start(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.url, timeout=self._timeout,
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        try:
            models = (await self._call("GET", "/v1/models"))["data"]
        except EngineError as exc:
            self._failure = str(exc)
            raise
        self._served_model = models[0]["id"]
        self.context_length = int(models[0].get("max_model_len") or self.context_length)
        self._failure = None

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def healthy(self) -> bool:
        return self._client is not None and self._failure is None

    def stats(self) -> EngineStats:
        return EngineStats(waiting=max(0, self._in_flight - self.max_running),
                           running=min(self._in_flight, self.max_running), policy_version=self.version)

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 cache_key: str | None = None) -> AsyncGenerator[GenerationEvent, None]:
        if not 1 <= len(prompt_ids) < self.context_length:
            raise PromptTooLong(len(prompt_ids), self.context_length)
        if self._client is None:
            raise EngineError(f"the vLLM server at {self.url} is not connected (the engine is not started)")
        return self._stream(list(prompt_ids), params)

    async def _stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[GenerationEvent, None]:
        assert self._client is not None
        async with self._swap:  # a weight update in progress: wait for it, then sample the new version
            version = self.version
            self._in_flight += 1
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        try:
            async with self._client.stream("POST", "/v1/completions", json=self._body(prompt_ids, params)) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode("utf-8", "replace")[:500]
                    raise EngineError(f"the vLLM server answered {response.status_code}: {detail}")
                self._failure = None  # it answers (again)
                finish: Finished | None = None
                async for chunk in json_events(response):
                    if "error" in chunk:
                        raise EngineError(f"the vLLM server failed the request: {chunk['error']}")
                    choice = chunk["choices"][0]
                    for token_id, logprob, top in _sampled(choice, params.top_logprobs):
                        yield SampledToken(token_id, logprob, version, detokenizer.add(token_id), top)
                        if detokenizer.matched_stop is not None:  # arborl's stop matched first
                            finish = Finished("stop", detokenizer.matched_stop, prompt_tokens=len(prompt_ids))
                            break
                    if finish is None and choice.get("finish_reason"):
                        reason = _FINISH_REASONS.get(choice["finish_reason"], "stop")
                        finish = Finished(reason, choice.get("stop_reason"), text=detokenizer.flush(),
                                          prompt_tokens=len(prompt_ids))
                    if finish is not None:
                        break
                if finish is None:
                    raise EngineError("the vLLM server ended the stream without finishing the request")
                yield finish
        except UnreadableEvent as exc:
            raise EngineError(f"the vLLM server sent {exc}") from None
        except httpx.HTTPError as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            raise EngineError(f"the vLLM server at {self.url} failed: {self._failure}") from exc
        finally:
            self._in_flight -= 1

    def _body(self, prompt_ids: list[int], params: SamplingParams) -> dict[str, Any]:
        return {
            "model": self._served_model,
            "prompt": prompt_ids,
            "max_tokens": max(1, min(params.max_tokens, self.context_length - len(prompt_ids))),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k or -1,  # vLLM: -1 is no top-k
            "seed": params.seed,
            "stop": list(params.stop) or None,
            "stop_token_ids": list(params.stop_token_ids) or None,
            "ignore_eos": params.ignore_eos,
            "logprobs": max(1, params.top_logprobs),
            "return_token_ids": True,
            "return_tokens_as_token_ids": True,
            "skip_special_tokens": False,
            "stream": True,
        }

    async def load_weights(self, update: WeightUpdate) -> None:
        if not isinstance(update, FromPath):
            raise WeightUpdateNotSupported(f"a vLLM server reads checkpoint folders, not {type(update).__name__}")
        if not (Path(update.path) / "config.json").is_file():
            raise InvalidCheckpoint(f"{update.path} is not a checkpoint folder (no config.json)")
        async with self._swap:  # new requests wait here; the server finishes the ones in flight
            await self._call("POST", "/pause", params={"mode": "wait"})
            try:
                await self._call("POST", "/collective_rpc",
                                 json={"method": "reload_weights", "kwargs": {"weights_path": str(update.path)}})
                await self._call("POST", "/reset_prefix_cache")
                self.version = update.version
            finally:
                await self._call("POST", "/resume")

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            if self._client is not None:
                response = await self._client.request(method, path, **kwargs)
            else:  # before start: a gateway restarting on a trained run serves its last version first
                async with httpx.AsyncClient(base_url=self.url, timeout=self._timeout) as client:
                    response = await client.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise EngineError(f"the vLLM server at {self.url} did not answer {method} {path}: {exc}") from exc
        if response.status_code != 200:
            raise EngineError(f"the vLLM server answered {method} {path} with {response.status_code}: "
                              f"{response.text[:500]}")
        return response.json() if response.content else None


def _sampled(choice: dict[str, Any], top: int) -> list[tuple[int, float, tuple[tuple[int, float], ...]]]:
    """(token id, logprob, the ``top`` most likely (id, logprob)) of each token a streamed choice adds.

    With ``return_tokens_as_token_ids`` vLLM names each alternative ``token_id:ID``."""
    ids = choice.get("token_ids") or []
    logprobs = choice.get("logprobs") or {}
    sampled = logprobs.get("token_logprobs") or []
    alternatives = logprobs.get("top_logprobs") or [{}] * len(ids)
    if not len(sampled) == len(alternatives) == len(ids):
        raise EngineError(f"the vLLM server returned {len(ids)} token ids with {len(sampled)} logprobs")
    out = []
    for token_id, logprob, options in zip(ids, sampled, alternatives, strict=True):
        ranked = sorted(((int(name.rsplit(":", 1)[1]), float(lp)) for name, lp in (options or {}).items()),
                        key=lambda pair: -pair[1])
        out.append((int(token_id), float(logprob), tuple(ranked[:top])))
    return out
