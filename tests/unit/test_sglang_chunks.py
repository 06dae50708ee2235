"""How the ``sglang`` engine reads SGLang's ``/generate`` stream (gateway/engines/sglang_server.py).

The chunks are written from SGLang's own source (``tokenizer_manager`` builds ``meta_info``;
``schedule_batch`` the ``finish_reason`` objects), not recorded from a server: SGLang has no CPU
kernels, so none runs here. The engine against a real server is tests/gpu/test_sglang_engine.py.
"""

from __future__ import annotations

import pytest

from arborl.gateway.engines.base import EngineError
from arborl.gateway.engines.sglang_server import read_chunk

# A reply of four tokens (ids 11, 12, 13 then EOS 2), as SGLang streams it by default: each chunk
# repeats the whole output so far.
LOGPROBS = [[-0.5, 11, None], [-1.25, 12, None], [-0.125, 13, None], [-0.75, 2, None]]
TOP = [[[-0.5, 11, None], [-1.5, 40, None]], [[-1.0, 41, None], [-1.25, 12, None]],
       [[-0.125, 13, None], [-3.0, 42, None]], [[-0.75, 2, None], [-0.9, 43, None]]]


def _chunk(upto: int, *, start: int = 0, finish=None, cached: int = 0, top: bool = False) -> dict:
    meta = {"id": "arborl-1", "prompt_tokens": 9, "completion_tokens": upto, "cached_tokens": cached,
            "weight_version": "default", "finish_reason": finish,
            "output_token_logprobs": LOGPROBS[start:upto]}
    if top:
        meta["output_top_logprobs"] = TOP[start:upto]
    return {"text": "…", "output_ids": [t[1] for t in LOGPROBS[start:upto]], "meta_info": meta}


def _read(chunks: list[dict], top: int = 0):
    seen, pieces = 0, []
    for chunk in chunks:
        piece, seen = read_chunk(chunk, seen, top)
        pieces.append(piece)
    return pieces


def test_cumulative_chunks_give_each_token_once():
    pieces = _read([_chunk(1), _chunk(3), _chunk(4, finish={"type": "stop", "matched": 2}, cached=6)])
    assert [[t[0] for t in p.tokens] for p in pieces] == [[11], [12, 13], [2]]
    assert [t[1] for p in pieces for t in p.tokens] == [-0.5, -1.25, -0.125, -0.75]
    last = pieces[-1]
    assert (last.finish_reason, last.matched_stop, last.cached_prompt_tokens) == ("stop", 2, 6)
    assert all(p.finish_reason is None for p in pieces[:-1])


def test_incremental_chunks_read_the_same():
    # --incremental-streaming-output: each chunk lists only what it adds
    pieces = _read([_chunk(1), _chunk(3, start=1), _chunk(4, start=3, finish={"type": "length", "length": 4})])
    assert [t[0] for p in pieces for t in p.tokens] == [11, 12, 13, 2]
    assert pieces[-1].finish_reason == "length" and pieces[-1].matched_stop is None


def test_top_logprobs_are_ranked_and_cut():
    pieces = _read([_chunk(2, top=True)], top=1)
    assert [t[2] for t in pieces[0].tokens] == [((11, -0.5),), ((41, -1.0),)]  # the most likely, not the sampled


def test_a_stop_string_is_what_matched():
    piece, _ = read_chunk(_chunk(2, finish={"type": "stop", "matched": "</tool_call>"}), 0, 0)
    assert piece.matched_stop == "</tool_call>"


@pytest.mark.parametrize("chunk, message", [
    ({"error": {"message": "prompt too long"}}, "prompt too long"),
    (_chunk(2, finish={"type": "abort", "message": "Abort by pause", "status_code": 503}), "aborted"),
    # three tokens counted, one listed, none read before: ids and logprobs out of step
    ({"meta_info": {"completion_tokens": 3, "output_token_logprobs": [[-0.5, 11, None]]}}, "listed 1 token"),
])
def test_an_error_or_a_broken_chunk_is_an_engine_error(chunk, message):
    with pytest.raises(EngineError, match=message):
        read_chunk(chunk, 0, 0)


def test_a_chunk_without_meta_info_is_refused():
    with pytest.raises(KeyError):  # the engine's stream turns it into an EngineError (remote_server.py)
        read_chunk({"text": "hi"}, 0, 0)
