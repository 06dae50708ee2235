"""An SGLang server behind the gateway: token ids in, the engine's own token ids and logprobs out.

The prompt's ids go to SGLang's native ``/generate`` (``input_ids``, ``return_logprob``,
streaming); what every server engine shares (the stream, stops, versions, health) is in
``remote_server.py``. Each token comes from ``meta_info.output_token_logprobs``, which carries
both its id and its logprob, so ids and logprobs cannot drift apart. SGLang streams them
cumulatively by default (each chunk repeats the whole output so far) and incrementally with
``--incremental-streaming-output``; a chunk whose list is as long as ``completion_tokens`` is
cumulative, so both are read right without asking the server how it was started.

SGLang reports logprobs after temperature and before top-k/top-p (its sampler's default): equal
to the sampling distribution's, which arborl records, when top_p is 1 and top_k is off (as in RL
rollouts); with either set they are the logprobs of the tempered distribution.

A weight update is ``/update_weights_from_disk`` with the version: SGLang waits for the
requests in flight to finish before it loads (new ones wait on arborl's side, so every token of a
call comes from one version), then ``/flush_cache`` drops KV of the old weights. arborl does not
``/pause_generation`` for it: retracting or pausing requests in place would let one call span
two versions. A checkpoint SGLang refuses (its 400, ``success: false``) leaves the old weights
serving: ``InvalidCheckpoint``. A client that goes away closes the stream and arborl sends
``/abort_request`` for its ``rid`` as well.

Tested for real only on a GPU (``pytest -m gpu``): SGLang has no CPU kernels on PyPI.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx

from .base import EngineError, FinishReason, FromPath, InvalidCheckpoint, SamplingParams
from .event_stream import json_events
from .remote_server import Piece, RemoteServerEngine, WireToken, answer_of


class SglangEngine(RemoteServerEngine):
    """One SGLang server at ``url`` serving the model in ``model_dir`` (see ``RemoteServerEngine``);
    ``max_running`` is its ``--max-running-requests``."""

    server_name = "SGLang server"
    version_label_path = "/get_weight_version"

    async def _connect(self) -> None:
        info = await self._call("GET", "/get_server_info")
        self.context_length = int(info.get("context_length") or self.context_length)

    def _request(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> tuple[str, dict[str, Any]]:
        sampling: dict[str, Any] = {
            "max_new_tokens": max(1, min(params.max_tokens, self.context_length - len(prompt_ids))),
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k or -1,  # SGLang: -1 is no top-k
            "stop": list(params.stop) or None,
            "stop_token_ids": list(params.stop_token_ids) or None,
            "ignore_eos": params.ignore_eos,
            "skip_special_tokens": False,
            "no_stop_trim": True,  # arborl's detokenizer trims the stop string it matches
        }
        if params.seed is not None:
            sampling["sampling_seed"] = params.seed
        return "/generate", {
            "rid": request_id,
            "input_ids": prompt_ids,
            "sampling_params": sampling,
            "return_logprob": True,
            "logprob_start_len": -1,  # the output's logprobs only
            "top_logprobs_num": params.top_logprobs,
            "stream": True,
        }

    async def _pieces(self, response: httpx.Response, params: SamplingParams) -> AsyncIterator[Piece]:
        seen = 0
        async for chunk in json_events(response):
            piece, seen = read_chunk(chunk, seen, params.top_logprobs)
            yield piece
            if piece.finish_reason is not None:
                return

    async def _swap(self, update: FromPath) -> None:
        body = {"model_path": str(update.path), "weight_version": str(update.version), "flush_cache": True,
                "abort_all_requests": False}
        response = await self._send("POST", "/update_weights_from_disk", json=body)
        answer = answer_of(response)
        if response.status_code == 400 or (isinstance(answer, dict) and answer.get("success") is False):
            message = answer.get("message") if isinstance(answer, dict) else answer
            raise InvalidCheckpoint(f"the SGLang server refused {update.path}: {str(message)[:500]}")
        if response.status_code != 200:
            raise EngineError(f"the SGLang server answered the weight update with {response.status_code}: "
                              f"{response.text[:500]}")
        await self._call("POST", "/flush_cache")  # no KV of the old weights serves the new ones

    async def _cancel(self, request_id: str) -> None:
        await self._call("POST", "/abort_request", json={"rid": request_id})


def read_chunk(chunk: Any, seen: int, top: int) -> tuple[Piece, int]:
    """The tokens one ``/generate`` chunk adds after the ``seen`` already read, and how many have
    been read after it. A chunk is cumulative when it lists ``completion_tokens`` tokens."""
    if "error" in chunk:
        error = chunk["error"]
        raise EngineError(f"the SGLang server failed the request: {error.get('message', error)}"
                          if isinstance(error, dict) else f"the SGLang server failed the request: {error}")
    meta = chunk["meta_info"]
    total = int(meta["completion_tokens"])
    listed = meta.get("output_token_logprobs") or []
    alternatives = meta.get("output_top_logprobs") or [None] * len(listed)
    if len(listed) == total and total >= seen:  # cumulative: the whole output so far
        new, new_top = listed[seen:], alternatives[seen:]
    else:  # incremental: what this chunk adds
        new, new_top = listed, alternatives
    if seen + len(new) != total or len(new_top) != len(new):
        raise EngineError(f"the SGLang server listed {len(listed)} token logprobs for {total} tokens "
                          f"({seen} read before)")
    tokens: list[WireToken] = []
    for (logprob, token_id, *_), options in zip(new, new_top, strict=True):
        ranked = sorted(((int(o[1]), float(o[0])) for o in options or ()), key=lambda pair: -pair[1])
        tokens.append((int(token_id), float(logprob), tuple(ranked[:top])))
    piece = Piece(tokens)
    finish = meta.get("finish_reason")
    if finish:
        kind = finish.get("type")
        if kind == "abort":
            raise EngineError(f"the SGLang server aborted the request: {finish.get('message', '')}")
        reason: FinishReason = "length" if kind == "length" else "stop"
        piece.finish_reason = reason
        piece.matched_stop = finish.get("matched") if reason == "stop" else None
        piece.cached_prompt_tokens = int(meta.get("cached_tokens") or 0)
    return piece, total

