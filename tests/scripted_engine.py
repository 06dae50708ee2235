"""A test-only engine that answers from a script, through the real tokenizer, renderer and parsers.

Agent CLIs need a model that calls their tools on cue; a tiny random model does not. This
engine decodes the prompt it is given, asks a script for the reply text, and streams that
text as real token ids ending with EOS, so everything downstream (parsing, stitching,
recording, the dialect's stream) runs exactly as it does for a real engine. Never used by the
product.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from arborl.gateway.engines.base import Engine, EngineStats, Finished, SampledToken
from arborl.gateway.engines.detokenizer import IncrementalDetokenizer

Script = Callable[[str], str]  # decoded prompt -> reply text


class ScriptedEngine(Engine):
    def __init__(self, tokenizer, script: Script, model_name: str = "tiny", first_token_delay_s: float = 0.0):
        self.tokenizer = tokenizer
        self.script = script
        self.first_token_delay_s = first_token_delay_s  # > 0 plays a long prefill: silence before the first token
        self.model_name = model_name
        self.context_length = 1_000_000
        self.replies: list[str] = []

    def generate(self, prompt_ids, params, *, cache_key=None):
        return self._stream(list(prompt_ids), params)

    async def _stream(self, prompt_ids, params):
        await asyncio.sleep(self.first_token_delay_s)
        reply = self.script(self.tokenizer.decode(prompt_ids))
        self.replies.append(reply)
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.stop)
        for n, token in enumerate(self.tokenizer.encode(reply, add_special_tokens=False)):
            if n >= params.max_tokens:
                yield Finished("length", text=detokenizer.flush(), prompt_tokens=len(prompt_ids))
                return
            await asyncio.sleep(0)
            yield SampledToken(token, -0.1, 0, detokenizer.add(token))
            if detokenizer.matched_stop:
                yield Finished("stop", detokenizer.matched_stop, prompt_tokens=len(prompt_ids))
                return
        yield SampledToken(self.tokenizer.eos_token_id, -0.1, 0, "")
        yield Finished("stop", self.tokenizer.eos_token_id, text=detokenizer.flush(), prompt_tokens=len(prompt_ids))

    def stats(self) -> EngineStats:
        return EngineStats()

    @property
    def healthy(self) -> bool:
        return True
