"""Several replicas of one model behind the gateway as one engine: sessions stay where their KV is.

An agent's turn ``n+1`` extends turn ``n``, so it is cheapest on the replica that served turn
``n``: its prefix cache still holds the conversation. The router pins each session (the
gateway's ``cache_key``) to a replica; a new session whose first prompt another session already
sent (a group's members share their task's prompt) goes where that prompt went; any other new
session goes to the least-loaded replica. A pinned replica that has ``spill_after`` more requests
in flight than the least-loaded one gives the session up to it, and so does one out of rotation:
the session's next call re-prefills there.

Invariants:
- every call is served by one replica from its first token to its last, so its tokens carry
  that replica's versions, which never decrease within a call;
- a call whose replica fails before its first token is retried on another replica (the client
  sees nothing); one that fails after ends with the engine's error (the dialect's error event);
- a replica is out of rotation (no new requests) when it fails, while it swaps weights in a
  rolling publish if another can serve, and when a weight update failed on it: it keeps its old
  version, ``ReplicaStats.why_out`` says why, and the health check readmits it once it answers
  and (given the checkpoint folder of the last publish) serves the current version;
- ``policy_version`` is the lowest version a replica in rotation serves; after ``load_weights``
  returns, every replica in rotation serves the new version.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal

from .base import (
    Engine,
    EngineError,
    EngineStats,
    Finished,
    FromPath,
    GenerationEvent,
    InvalidCheckpoint,
    PromptTooLong,
    ReplicaStats,
    SamplingParams,
    WeightUpdate,
    WeightUpdateNotSupported,
)

log = logging.getLogger(__name__)

Routing = Literal["affinity", "round_robin"]
Publish = Literal["rolling", "all"]


@dataclass
class _Replica:
    engine: Engine
    name: str
    why_out: str | None = None  # None: in rotation
    updating: bool = False  # swapping weights in a rolling publish: others take its new requests
    in_flight: int = 0
    failed_probes: int = 0  # health checks failed in a row
    sessions: int = 0
    prompt_tokens: int = 0
    cached_prompt_tokens: int = 0

    @property
    def version(self) -> int:
        return self.engine.stats().policy_version


class ReplicaRouter(Engine):
    """``replicas`` (engines serving the same model, named by ``names``) as one engine.

    ``routing``: "affinity" (above) or "round_robin" (each call to the next replica: the baseline
    the router's benchmark compares with). ``publish``: "rolling" swaps one replica at a time
    while the others serve; "all" swaps every replica at once. ``health_interval_s``: how often
    each replica is probed; ``probe_failures_to_eject``: how many failed probes in a row take
    it out of rotation.
    """

    def __init__(self, replicas: Sequence[Engine], *, names: Sequence[str] | None = None,
                 routing: Routing = "affinity", publish: Publish = "rolling", spill_after: int = 8,
                 health_interval_s: float = 2.0, probe_failures_to_eject: int = 3, max_sessions: int = 100_000):
        if not replicas:
            raise ValueError("a router needs at least one replica")
        first = replicas[0]
        if any(r.model_name != first.model_name or len(r.tokenizer) != len(first.tokenizer) for r in replicas):
            raise ValueError("the replicas of a router must serve the same model")
        names = list(names) if names is not None else [str(i) for i in range(len(replicas))]
        self._replicas = [_Replica(engine, name) for engine, name in zip(replicas, names, strict=True)]
        self.model_name = first.model_name
        self.tokenizer = first.tokenizer
        self.model_family = first.model_family
        self.context_length = min(r.context_length for r in replicas)
        self.weight_updates = tuple(kind for kind in first.weight_updates
                                    if all(kind in r.weight_updates for r in replicas))
        self.routing = routing
        self.publish = publish
        self.spill_after = spill_after
        self.health_interval_s = health_interval_s
        self.probe_failures_to_eject = probe_failures_to_eject
        self.max_sessions = max_sessions
        self.version = 0
        self._last_checkpoint: FromPath | None = None  # what a lagging replica catches up with
        self._pins: OrderedDict[str, _Replica] = OrderedDict()  # session -> replica, least recent first
        self._prompt_pins: OrderedDict[int, _Replica] = OrderedDict()  # a first prompt's hash -> replica
        self._turn = itertools.count()  # round robin
        self._publishing = asyncio.Lock()
        self._health: asyncio.Task | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        for replica in self._replicas:
            replica.engine.observer = self.observer
            try:
                await replica.engine.start()
            except EngineError as exc:
                replica.why_out = f"did not start: {exc}"
                log.warning("replica %s did not start: %s", replica.name, exc)
        if not self.healthy:
            raise EngineError("no replica started: " + "; ".join(f"{r.name}: {r.why_out}" for r in self._replicas))
        self._health = asyncio.get_running_loop().create_task(self._check_health())

    async def shutdown(self) -> None:
        if self._health is not None:
            self._health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._health
            self._health = None
        for replica in self._replicas:
            await replica.engine.shutdown()

    @property
    def healthy(self) -> bool:
        return any(r.why_out is None for r in self._replicas)

    async def probe(self) -> bool:
        await asyncio.gather(*(self._probe(r) for r in self._replicas))
        return self.healthy

    async def _check_health(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            await self.probe()

    async def _probe(self, replica: _Replica) -> None:
        if replica.updating:
            return
        answers = await replica.engine.probe()
        if not answers:
            replica.failed_probes += 1
            # A server busy decoding can be slow to answer once; a request that fails takes it
            # out at once (``_stream``), a health check only when it fails again and again.
            if replica.why_out is None and replica.failed_probes >= self.probe_failures_to_eject:
                self._take_out(replica, f"not answering its health check ({replica.failed_probes} times)")
            return
        replica.failed_probes = 0
        if replica.why_out is None:
            if replica.version == self.version or self._publishing.locked():
                return
            self._take_out(replica, f"it serves version {replica.version}, not {self.version} (restarted?)")
        if replica.version != self.version:  # it missed a publish while it was out, or restarted
            if self._last_checkpoint is None or self._publishing.locked():
                return
            try:
                await replica.engine.load_weights(self._last_checkpoint)
            except EngineError as exc:
                replica.why_out = f"could not catch up with version {self.version}: {exc}"
                return
        log.info("replica %s is back in rotation at version %d", replica.name, replica.version)
        replica.why_out = None

    def _take_out(self, replica: _Replica, why: str) -> None:
        replica.why_out = why
        log.warning("replica %s is out of rotation: %s", replica.name, why)

    # -- routing ----------------------------------------------------------------------------------

    def generate(self, prompt_ids: Sequence[int], params: SamplingParams, *,
                 cache_key: str | None = None) -> AsyncGenerator[GenerationEvent, None]:
        if not 1 <= len(prompt_ids) < self.context_length:
            raise PromptTooLong(len(prompt_ids), self.context_length)
        return self._stream(list(prompt_ids), params, cache_key)

    async def _stream(self, prompt_ids: list[int], params: SamplingParams,
                      cache_key: str | None) -> AsyncGenerator[GenerationEvent, None]:
        tried: set[str] = set()
        while True:
            replica = self._choose(prompt_ids, cache_key, tried)
            tried.add(replica.name)
            started = False
            replica.in_flight += 1
            try:
                tokens = replica.engine.generate(prompt_ids, params, cache_key=cache_key)
                async with contextlib.aclosing(tokens):
                    async for event in tokens:
                        if isinstance(event, Finished):
                            replica.prompt_tokens += event.prompt_tokens
                            replica.cached_prompt_tokens += event.cached_prompt_tokens
                        started = True
                        yield event
                return
            except EngineError as exc:
                down = not replica.engine.healthy
                if down and replica.why_out is None:
                    self._take_out(replica, str(exc))
                if started or not down:  # streamed already, or the replica refused this request itself
                    raise
                log.info("replica %s failed a call before its first token; trying another", replica.name)
            finally:
                replica.in_flight -= 1

    def _choose(self, prompt_ids: list[int], cache_key: str | None, tried: set[str]) -> _Replica:
        candidates = [r for r in self._replicas if r.why_out is None and r.name not in tried]
        if not candidates:
            raise EngineError("no replica can serve: " + "; ".join(
                f"{r.name}: {r.why_out or 'failed this call'}" for r in self._replicas))
        settled = [r for r in candidates if not r.updating] or candidates
        if self.routing == "round_robin":
            return settled[next(self._turn) % len(settled)]
        least = min(settled, key=lambda r: (r.in_flight, r.sessions))
        pinned = self._pins.get(cache_key) if cache_key is not None else None
        if pinned is None and cache_key is not None:
            first_prompt = hash(tuple(prompt_ids))
            pinned = self._prompt_pins.get(first_prompt)
            self._remember(self._prompt_pins, first_prompt, pinned or least)
        if pinned is not None and pinned in settled and pinned.in_flight < least.in_flight + self.spill_after:
            chosen = pinned
        else:
            chosen = least
        if cache_key is not None:
            self._pin(cache_key, chosen)
        return chosen

    def replica_for(self, session: str) -> str | None:
        """The replica ``session``'s next call goes to (if it stays in rotation and not too loaded)."""
        replica = self._pins.get(session)
        return replica.name if replica is not None else None

    def _pin(self, session: str, replica: _Replica) -> None:
        old = self._pins.pop(session, None)
        if old is not None:
            old.sessions -= 1
        self._pins[session] = replica
        replica.sessions += 1
        if len(self._pins) > self.max_sessions:
            _, evicted = self._pins.popitem(last=False)
            evicted.sessions -= 1

    def _remember(self, pins: OrderedDict[int, _Replica], key: int, replica: _Replica) -> None:
        pins[key] = replica
        pins.move_to_end(key)
        if len(pins) > self.max_sessions:
            pins.popitem(last=False)

    # -- publishing -------------------------------------------------------------------------------

    async def load_weights(self, update: WeightUpdate) -> None:
        """Serve ``update`` from every replica that can. A replica whose update fails (other than
        for a checkpoint that no replica can load) leaves rotation at its old version; the call
        fails only when no replica took the update."""
        if type(update) not in self.weight_updates:
            raise WeightUpdateNotSupported(f"these replicas do not take {type(update).__name__} updates")
        async with self._publishing:
            targets = [r for r in self._replicas if r.why_out is None or r.version != update.version]
            if self.publish == "all":
                results = await asyncio.gather(*(self._update(r, update) for r in targets), return_exceptions=True)
            else:
                results = []
                for replica in targets:
                    results.append(await self._update(replica, update, rolling=True))
                    if isinstance(results[-1], InvalidCheckpoint):
                        break  # the checkpoint is bad: the rest would refuse it too
            took = [r for r, result in zip(targets, results, strict=False) if result is None]
            if not took:
                errors = [e for e in results if isinstance(e, BaseException)]
                if errors and all(isinstance(e, InvalidCheckpoint) for e in errors):
                    raise errors[0]
                raise EngineError(f"no replica took version {update.version}: "
                                  + "; ".join(str(e) for e in errors))
            self.version = update.version
            self._last_checkpoint = update if isinstance(update, FromPath) else None
            for replica, result in zip(targets, results, strict=False):
                if result is None:
                    continue
                self._take_out(replica, f"the update to version {update.version} failed; it serves version "
                                        f"{replica.version}: {result}")

    async def _update(self, replica: _Replica, update: WeightUpdate, *, rolling: bool = False) -> BaseException | None:
        # In a rolling publish the others take the new requests while this one swaps, if any can.
        replica.updating = rolling and any(r.why_out is None and r is not replica for r in self._replicas)
        try:
            await replica.engine.load_weights(update)
        except InvalidCheckpoint as exc:
            return exc  # it still serves its old weights, like the others: no reason to take it out
        except EngineError as exc:
            return exc
        finally:
            replica.updating = False
        if replica.why_out is not None and await replica.engine.probe():
            replica.why_out = None  # it was out only for lagging behind
        return None

    # -- figures ----------------------------------------------------------------------------------

    def stats(self) -> EngineStats:
        each = [(r, r.engine.stats()) for r in self._replicas]
        serving = [s for r, s in each if r.why_out is None]
        return EngineStats(
            waiting=sum(s.waiting for s in serving), running=sum(s.running for s in serving),
            cached_tokens=sum(s.cached_tokens for s in serving),
            cache_capacity_tokens=sum(s.cache_capacity_tokens for s in serving),
            policy_version=min((s.policy_version for s in serving), default=self.version),
            replicas=tuple(ReplicaStats(r.name, r.why_out is None, r.why_out, s.policy_version, s.waiting, s.running,
                                        r.sessions, r.prompt_tokens, r.cached_prompt_tokens) for r, s in each),
        )
