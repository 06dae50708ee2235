"""What every engine that is an inference server over HTTP shares (vLLM, SGLang).

The gateway renders and stitches prompts as for the embedded engine and sends the server the
prompt's token ids; the server streams back the ids it sampled with their logprobs, so what is
recorded is what the server sampled, never text tokenised again. A subclass says how to ask its
server (``_request``), how to read the answer (``_pieces``), how to connect (``_connect``) and how
to swap weights (``_swap``); this class keeps the rest, the same for every server:

- every ``SampledToken`` is one id the server returned, with the logprob it returned for it;
- the stream ends with one ``Finished``; closing it early closes the HTTP stream (``_cancel``
  runs too), so the server aborts the request;
- ``version`` is the version the server serves. A weight update (``load_weights``) runs under a
  lock that new requests wait for, and the subclass's ``_swap`` lets the requests in flight finish
  first, so every token of a request comes from one version; it also drops the server's prefix
  cache, so no KV computed by the old weights serves the new ones;
- stop strings are matched by arborl's detokenizer on the ids (as for the embedded engine) and
  also passed to the server, so it stops as soon as they match;
- a server that does not answer, or answers garbage, is an ``EngineError`` (the gateway's
  503/529), and ``healthy`` is false until it answers again (a request or ``probe``).
"""

from __future__ import annotations

import abc
import asyncio
import logging
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass, field
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
from .event_stream import UnreadableEvent

log = logging.getLogger(__name__)

# A connection the server drops while httpcore opens it can surface from anyio as an
# AttributeError ('NoneType' object has no attribute 'getpeername'), not an httpx error: seen with
# a vLLM server under load while another was killed. It is the server's failure, not arborl's.
_TRANSPORT_BUG = AttributeError

# (token id, logprob, the top alternatives as (id, logprob), most likely first)
WireToken = tuple[int, float, tuple[tuple[int, float], ...]]


@dataclass
class Piece:
    """What one streamed chunk of a server's answer adds: tokens, and at the end why it finished."""

    tokens: list[WireToken] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    matched_stop: str | int | None = None
    cached_prompt_tokens: int = 0  # the prompt tokens the server's prefix cache served (at the end)


class RemoteServerEngine(Engine):
    """An inference server at ``url`` (``http://host:port``) serving the model in ``model_dir``.

    ``model_dir`` gives the tokenizer the gateway renders with and the model's family; it must be
    the folder the server loaded (same tokenizer). ``max_running``: how many requests the server
    decodes at once; beyond it requests count as waiting.
    """

    server_name = "server"  # for messages: "the vLLM server answered ..."
    health_path = "/health"  # answers 200 while the server serves
    # answers {"weight_version": LABEL}: the number ``_swap`` set, or the server's "default"
    version_label_path = "/weight_info"
    weight_updates: tuple[type[WeightUpdate], ...] = (FromPath,)

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
        self._timeout = httpx.Timeout(timeout_s, connect=connect_timeout_s)
        self._client: httpx.AsyncClient | None = None
        self._in_flight = 0
        self._prompt_tokens = 0  # the prompt tokens of finished requests, and those its prefix cache served
        self._cached_tokens = 0
        self._failure: str | None = None  # why the server is not usable now, if it is not
        self._swap_lock = asyncio.Lock()
        self._swaps = 0  # weight updates begun: a version label read across one is stale
        self._cancels: set[asyncio.Task] = set()  # aborts sent for requests whose client went away

    # -- what a subclass says about its server ----------------------------------------------------

    @abc.abstractmethod
    async def _connect(self) -> None:
        """Learn what the server serves (its model name, context length) once it answers."""

    @abc.abstractmethod
    def _request(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> tuple[str, dict[str, Any]]:
        """The path and JSON body of a streamed generation request."""

    @abc.abstractmethod
    def _pieces(self, response: httpx.Response, params: SamplingParams) -> AsyncIterator[Piece]:
        """What each chunk of the streamed answer adds; the last one has a ``finish_reason``."""

    @abc.abstractmethod
    async def _swap(self, update: FromPath) -> None:
        """Serve ``update``'s checkpoint: let requests in flight finish, load it, drop the prefix cache."""

    async def _cancel(self, request_id: str) -> None:  # noqa: B027 (optional: closing the stream is enough for vLLM)
        """Tell the server a request's client went away (after its stream was closed)."""


    # -- the engine -------------------------------------------------------------------------------

    async def start(self) -> None:
        self._client = httpx.AsyncClient(base_url=self.url, timeout=self._timeout,
                                         limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))
        try:
            await self._connect()
            self._follow_label(await self._served_label(), connecting=True)
        except EngineError as exc:
            self._failure = str(exc)
            raise
        except (KeyError, IndexError, TypeError, ValueError) as exc:
            self._failure = f"unreadable answer: {exc!r}"
            raise EngineError(f"the {self.server_name} at {self.url} gave an unreadable answer: {exc!r}") from None
        self._failure = None

    async def shutdown(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    @property
    def healthy(self) -> bool:
        return self._client is not None and self._failure is None

    async def probe(self) -> bool:
        """Ask the server whether it serves, and which version; ``healthy`` follows the answer.

        A server restarted behind arborl's back serves its base weights again: its version label
        says so ("default", not the number ``_swap`` set), and ``version`` follows it, so tokens
        are never recorded under a version the server no longer serves (a router then brings the
        replica up to date before it gets requests again)."""
        try:
            await self._call("GET", self.health_path)
            swaps = self._swaps
            label = None if self._swap_lock.locked() else await self._served_label()
        except EngineError as exc:
            self._failure = str(exc)
            return False
        if swaps == self._swaps:  # no swap began while the label was on its way (it may be the old one)
            self._follow_label(label)
        self._failure = None
        return self.healthy

    def stats(self) -> EngineStats:
        return EngineStats(waiting=max(0, self._in_flight - self.max_running),
                           running=min(self._in_flight, self.max_running), policy_version=self.version,
                           extra={"prompt_tokens": float(self._prompt_tokens),
                                  "cached_prompt_tokens": float(self._cached_tokens)})

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 cache_key: str | None = None) -> AsyncGenerator[GenerationEvent, None]:
        if not 1 <= len(prompt_ids) < self.context_length:
            raise PromptTooLong(len(prompt_ids), self.context_length)
        if self._client is None:
            raise EngineError(f"the {self.server_name} at {self.url} is not connected (the engine is not started)")
        return self._stream(list(prompt_ids), params)

    async def _stream(self, prompt_ids: list[int], params: SamplingParams) -> AsyncGenerator[GenerationEvent, None]:
        assert self._client is not None
        async with self._swap_lock:  # a weight update in progress: wait for it, then sample the new version
            version = self.version
            self._in_flight += 1
        request_id = f"arborl-{uuid.uuid4().hex}"
        path, body = self._request(prompt_ids, params, request_id)
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        finish: Finished | None = None
        server_finished = False
        try:
            async with self._client.stream("POST", path, json=body) as response:
                if response.status_code != 200:
                    detail = (await response.aread()).decode("utf-8", "replace")[:500]
                    raise EngineError(f"the {self.server_name} answered {response.status_code}: {detail}")
                self._failure = None  # it answers (again)
                async for piece in self._pieces(response, params):
                    for token_id, logprob, top in piece.tokens:
                        yield SampledToken(token_id, logprob, version, detokenizer.add(token_id), top)
                        if detokenizer.matched_stop is not None:  # arborl's stop matched first
                            finish = Finished("stop", detokenizer.matched_stop, prompt_tokens=len(prompt_ids))
                            break
                    if finish is None and piece.finish_reason is not None:
                        server_finished = True
                        finish = Finished(piece.finish_reason, piece.matched_stop, text=detokenizer.flush(),
                                          prompt_tokens=len(prompt_ids),
                                          cached_prompt_tokens=piece.cached_prompt_tokens)
                    if finish is not None:
                        break
                if finish is None:
                    raise EngineError(f"the {self.server_name} ended the stream without finishing the request")
            self._prompt_tokens += finish.prompt_tokens
            self._cached_tokens += finish.cached_prompt_tokens
            if self.observer is not None:
                self.observer.observe_prefix_lookup(finish.prompt_tokens, finish.cached_prompt_tokens)
            yield finish
        except UnreadableEvent as exc:
            raise EngineError(f"the {self.server_name} sent {exc}") from None
        except (KeyError, IndexError, TypeError, ValueError) as exc:  # a chunk not of the server's format
            raise EngineError(f"the {self.server_name} sent an unreadable chunk: {exc!r}") from None
        except (httpx.HTTPError, _TRANSPORT_BUG) as exc:
            self._failure = f"{type(exc).__name__}: {exc}"
            raise EngineError(f"the {self.server_name} at {self.url} failed: {self._failure}") from exc
        finally:
            self._in_flight -= 1
            if not server_finished:  # cancelled, failed, or stopped by arborl first: it may still decode
                task = asyncio.get_running_loop().create_task(self._cancel_quietly(request_id))
                self._cancels.add(task)
                task.add_done_callback(self._cancels.discard)

    async def _cancel_quietly(self, request_id: str) -> None:
        try:
            await self._cancel(request_id)
        except EngineError as exc:
            log.debug("cancelling %s on the %s: %s", request_id, self.server_name, exc)

    async def load_weights(self, update: WeightUpdate) -> None:
        if not isinstance(update, FromPath):
            raise WeightUpdateNotSupported(
                f"a {self.server_name} reads checkpoint folders, not {type(update).__name__}")
        if not (Path(update.path) / "config.json").is_file():
            raise InvalidCheckpoint(f"{update.path} is not a checkpoint folder (no config.json)")
        async with self._swap_lock:  # new requests wait here; the server finishes the ones in flight
            self._swaps += 1
            await self._swap(update)
            self.version = update.version

    async def _served_label(self) -> str | None:
        """The weight version the server says it serves; None if it cannot say (an older server)."""
        response = await self._send("GET", self.version_label_path)
        try:
            answer = response.json() if response.status_code == 200 else None
        except ValueError:
            return None
        return str(answer["weight_version"]) if isinstance(answer, dict) and "weight_version" in answer else None

    def _follow_label(self, label: str | None, *, connecting: bool = False) -> None:
        if label is None or self._swap_lock.locked():
            return
        served = int(label) if label.isdigit() else 0
        if served != self.version:
            if connecting:  # a server that kept running since an earlier gateway published into it
                log.info("the %s at %s serves version %d", self.server_name, self.url, served)
            else:
                log.warning("the %s at %s serves version %d, not %d (restarted?)", self.server_name, self.url,
                            served, self.version)
            self.version = served

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request to the server, whatever its status; not answered: ``EngineError``."""
        try:
            if self._client is not None:
                return await self._client.request(method, path, **kwargs)
            # before start: a gateway restarting on a trained run serves its last version first
            async with httpx.AsyncClient(base_url=self.url, timeout=self._timeout) as client:
                return await client.request(method, path, **kwargs)
        except (httpx.HTTPError, _TRANSPORT_BUG) as exc:
            raise EngineError(f"the {self.server_name} at {self.url} did not answer {method} {path}: "
                              f"{type(exc).__name__}: {exc}") from exc

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """One request to the server; its JSON answer (its text when not JSON, None when empty).
        Not answered, or not 200: ``EngineError``."""
        response = await self._send(method, path, **kwargs)
        if response.status_code != 200:
            raise EngineError(f"the {self.server_name} answered {method} {path} with {response.status_code}: "
                              f"{response.text[:500]}")
        return answer_of(response)


def answer_of(response: httpx.Response) -> Any:
    """A server's answer: its JSON, its text when it is not JSON, None when it is empty."""
    if not response.content:
        return None
    try:
        return response.json()
    except ValueError:
        return response.text
