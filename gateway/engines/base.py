"""The engine interface every backend implements (DESIGN section 3).

An engine turns prompt token ids into a stream of sampled tokens. Each token carries the
logprob under the distribution it was sampled from and the policy version whose weights
produced it, so the gateway can record exactly what the policy did.

The gateway never asks what type its engine is: what differs between engines is declared here
as data. ``model_family`` chooses the tool-call and reasoning syntax, ``weight_updates`` says
which typed weight updates an engine takes (``FromPath``: a checkpoint folder it reads itself;
``FromTensors``: weights in this process's memory), and ``observer`` receives its per-step
figures (the gateway's metrics) when it has any.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

FinishReason = Literal["stop", "length", "abort"]


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer the gateway relies on."""

    eos_token_id: int | None

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = ...) -> str: ...
    def convert_ids_to_tokens(self, ids: int) -> str: ...
    def __len__(self) -> int: ...  # the vocabulary, added tokens included


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion.

    ``temperature == 0`` (in practice, below 1e-4) is greedy decoding. Otherwise tokens are drawn from
    ``softmax(logits / temperature)`` restricted to the ``top_k`` most likely tokens and then
    to the smallest set whose mass reaches ``top_p`` (renormalised). The reported logprob of
    every sampled token is its log-probability under exactly that distribution; for greedy
    decoding, where the sampling distribution is a point mass, it is the logprob under the
    untempered (temperature 1) distribution, as vLLM and SGLang report it.
    """

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int = 0
    # tool_choice "required" or a named tool: the completion must begin with a well-formed call
    # of a declared tool (an engine constrains its sampling; see ForcedToolCall).
    forced_call: ForcedToolCall | None = None


@dataclass(frozen=True)
class ForcedToolCall:
    """What a completion must begin with when the request forces a tool call.

    The prompt already ends with the call's opening (``<tool_call>\n{"name": "`` for Hermes, say);
    the completion must then be one of ``names`` (none when the prompt named the tool already),
    ``after_name``, a JSON object (the arguments) when ``json_arguments``, and ``closer``; after that,
    anything. Tokens sampled under it record their logprob under the constrained distribution
    (the one they were drawn from). An engine that cannot constrain sampling must say so.
    """

    names: tuple[str, ...]
    after_name: str
    json_arguments: bool
    closer: str


@dataclass(frozen=True)
class SampledToken:
    """One generated token, as the engine produced it."""

    token_id: int
    logprob: float
    version: int
    # The text this token adds to the visible output. It can be "" while a multi-byte
    # character or a possible stop string is still incomplete.
    text: str
    top_logprobs: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class Finished:
    """The end of a generation. ``matched_stop`` is the stop string or token id that ended it."""

    reason: FinishReason
    matched_stop: str | int | None = None
    # Text held back while it could have been the start of a stop string, released at the end.
    text: str = ""
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0


GenerationEvent = SampledToken | Finished


@dataclass(frozen=True)
class ReplicaStats:
    """One replica behind a router (``replica_router.py``), for /metrics and /readyz."""

    name: str  # its URL, or its index
    in_rotation: bool
    why_out: str | None  # why it gets no new requests, when it does not
    policy_version: int
    waiting: int
    running: int
    sessions: int  # sessions whose calls go to it (their prefix is in its cache)
    prompt_tokens: int  # of the requests it finished, and how many of those its prefix cache served
    cached_prompt_tokens: int


@dataclass
class EngineStats:
    """A snapshot for /metrics and /readyz."""

    waiting: int = 0
    running: int = 0
    cached_tokens: int = 0
    cache_capacity_tokens: int = 0
    policy_version: int = 0
    extra: dict[str, float] = field(default_factory=dict)
    replicas: tuple[ReplicaStats, ...] = ()  # an engine of several replicas: each of them


class EngineObserver(Protocol):
    """Receives an engine's per-step figures (implemented by the gateway's metrics)."""

    def observe_step(self, batch_size: int, new_tokens: int, seconds: float) -> None: ...
    def observe_prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None: ...
    def observe_swap(self, version: int, seconds: float) -> None: ...


@dataclass(frozen=True)
class FromPath:
    """Serve the checkpoint folder ``path`` (``save_pretrained`` layout) as ``version``; the
    engine reads it itself (a gateway in another process than the learner, a remote server)."""

    path: Path
    version: int


@dataclass(frozen=True)
class FromTensors:
    """Serve the weights ``state_dict`` (parameter name -> tensor, in this process) as ``version``:
    the learner of an embedded loop hands its parameters over without writing them to disk. The
    engine copies them before the call returns; the caller may change them afterwards."""

    state_dict: Mapping[str, Any]
    version: int


WeightUpdate = FromPath | FromTensors


class EngineError(Exception):
    """The engine cannot serve a request for a reason that is not the client's fault."""


class InvalidCheckpoint(EngineError):
    """Weights given to ``load_weights`` cannot be served: not a checkpoint, or not of this model.

    The engine keeps serving what it served before; the caller (an operator, the learner) is told why.
    """


class WeightUpdateNotSupported(EngineError):
    """The engine does not take this kind of weight update (see ``Engine.weight_updates``)."""


class PromptTooLong(ValueError):
    """The prompt does not fit in the model's context window."""

    def __init__(self, prompt_tokens: int, context_length: int):
        super().__init__(
            f"This model's maximum context length is {context_length} tokens, but the prompt has "
            f"{prompt_tokens} tokens. Shorten the conversation."
        )
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length


class Engine(abc.ABC):
    """A backend that samples tokens for prompt ids."""

    model_name: str
    tokenizer: TokenizerLike
    context_length: int
    serves: Literal["token_ids"] = "token_ids"  # see ServingEngine
    model_family: str = ""  # the model's architecture family (``config.model_type``: "llama", "qwen3")
    weight_updates: tuple[type[WeightUpdate], ...] = ()  # the updates ``load_weights`` takes
    observer: EngineObserver | None = None  # set by the gateway; engines without figures ignore it

    @abc.abstractmethod
    def generate(
        self, prompt_ids: Sequence[int], params: SamplingParams, *, cache_key: str | None = None
    ) -> AsyncGenerator[GenerationEvent, None]:
        """Stream sampled tokens, then one ``Finished``.

        ``cache_key`` names the session so its KV cache can be kept for the next call.
        Closing the iterator early cancels the generation and frees its slot.
        Raises ``PromptTooLong`` before generating if the prompt does not fit.
        """

    async def load_weights(self, update: WeightUpdate) -> None:
        """Swap in new weights between two decode steps; later tokens carry ``update.version``.

        An update of a kind not in ``weight_updates`` raises ``WeightUpdateNotSupported``;
        weights that do not fit the model raise ``InvalidCheckpoint`` (the old ones keep serving)."""
        raise WeightUpdateNotSupported(f"{self.model_name} takes no weight updates")

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @property
    @abc.abstractmethod
    def healthy(self) -> bool: ...

    async def probe(self) -> bool:
        """Check that the engine serves (a server engine asks its server); ``healthy`` follows."""
        return self.healthy

    async def start(self) -> None:  # noqa: B027 (an optional hook: a no-op unless overridden)
        """Start background work (the scheduler); called once by the app on startup."""

    async def shutdown(self) -> None:  # noqa: B027 (an optional hook)
        """Stop background work; in-flight generations finish with reason ``abort``."""


class ServingEngine(Protocol):
    """What the gateway holds: an ``Engine`` (``serves == "token_ids"``: the gateway renders and
    stitches prompts and records the engine's own tokens), or an engine that takes the
    conversation as messages and answers in text (``serves == "messages"``: the ``upstream``
    engine, recorded as text, with token ids only where it has a tokenizer)."""

    serves: Literal["token_ids", "messages"]
    model_name: str
    model_family: str
    weight_updates: tuple[type[WeightUpdate], ...]
    observer: EngineObserver | None

    @property
    def tokenizer(self) -> TokenizerLike | None: ...
    @property
    def context_length(self) -> float: ...
    @property
    def healthy(self) -> bool: ...

    async def load_weights(self, update: WeightUpdate) -> None: ...
    def stats(self) -> EngineStats: ...
    async def start(self) -> None: ...
    async def shutdown(self) -> None: ...
