"""A vLLM server behind the gateway: token ids in, the engine's own token ids and logprobs out.

The prompt's ids go to vLLM's OpenAI-compatible ``/v1/completions`` (``prompt`` as a list of
ids, streaming, with ``return_token_ids`` and ``logprobs``); what every server engine shares (the
stream, stops, versions, health) is in ``remote_server.py``. The server must be started with
``--logprobs-mode processed_logprobs``: arborl records each token's logprob under the
distribution it was drawn from (after temperature, top-k and top-p), as the embedded engine
does; ``--enable-prompt-tokens-details`` makes it say how much of each prompt its prefix cache
served (``Finished.cached_prompt_tokens``; 0 without it).

A weight update pauses the server until the requests in flight finish (``/pause?mode=wait``),
reloads the checkpoint in place (``collective_rpc reload_weights``), drops the prefix cache
(``/reset_prefix_cache``), labels the server with the version (``/update_weight_version``; read
back by ``/weight_info`` when arborl checks the server) and resumes. A client that goes away
closes the HTTP stream, and vLLM aborts the request.

A request forcing a tool call (``SamplingParams.forced_call``) is sampled without the constraint:
the prompt already ends with the call's opening, and a malformed call comes back as text.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from .base import EngineError, FinishReason, FromPath, SamplingParams
from .event_stream import json_events
from .remote_server import Piece, RemoteServerEngine, WireToken

_FINISH_REASONS: dict[str, FinishReason] = {"stop": "stop", "length": "length", "abort": "abort"}


class VllmEngine(RemoteServerEngine):
    """One vLLM server at ``url`` serving the model in ``model_dir`` (see ``RemoteServerEngine``);
    ``max_running`` is its ``--max-num-seqs``."""

    server_name = "vLLM server"

    _served_model = ""  # the model name the server knows (from /v1/models)

    async def _connect(self) -> None:
        models = (await self._call("GET", "/v1/models"))["data"]
        self._served_model = models[0]["id"]
        self.context_length = int(models[0].get("max_model_len") or self.context_length)

    def _request(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> tuple[str, dict[str, Any]]:
        return "/v1/completions", {
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
            "stream_options": {"include_usage": True},  # the last chunk says what the prefix cache served
        }

    async def _pieces(self, response: httpx.Response, params: SamplingParams) -> AsyncIterator[Piece]:
        finished: Piece | None = None
        async for chunk in json_events(response):
            if "error" in chunk:
                raise EngineError(f"the vLLM server failed the request: {chunk['error']}")
            usage = chunk.get("usage")
            if finished is not None and usage:  # after the finishing chunk: the usage one
                finished.cached_prompt_tokens = int((usage.get("prompt_tokens_details") or {})
                                                    .get("cached_tokens") or 0)
                break
            if not chunk.get("choices"):
                continue
            choice = chunk["choices"][0]
            piece = Piece(_sampled(choice, params.top_logprobs))
            if choice.get("finish_reason"):
                piece.finish_reason = _FINISH_REASONS.get(choice["finish_reason"], "stop")
                piece.matched_stop = choice.get("stop_reason")
                finished = piece  # held until the usage chunk (or the end of the stream)
                continue
            yield piece
        if finished is not None:
            yield finished

    async def _swap(self, update: FromPath) -> None:
        await self._call("POST", "/pause", params={"mode": "wait"})
        try:
            await self._call("POST", "/collective_rpc",
                             json={"method": "reload_weights", "kwargs": {"weights_path": str(update.path)}})
            await self._call("POST", "/reset_prefix_cache")
            await self._call("POST", "/update_weight_version", json={"new_version": str(update.version)})
        finally:
            await self._call("POST", "/resume")


def _sampled(choice: dict[str, Any], top: int) -> list[WireToken]:
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
