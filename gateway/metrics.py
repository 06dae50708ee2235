"""Prometheus metrics of the gateway (DESIGN section 9: prefix ``arborl_``, ``_seconds``, ``_total``).

Each app owns its own registry, so several gateways (or tests) in one process do not collide.
Gauges that mirror engine or store state are read at scrape time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .engines.base import ReplicaStats

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "arborl_requests_total", "API requests by route and status", ["route", "status"], registry=r
        )
        self.request_duration = Histogram(
            "arborl_request_duration_seconds", "Time from request to last byte", ["route"],
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.ttft = Histogram(
            "arborl_time_to_first_token_seconds", "Time to first sampled token", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "arborl_inter_token_latency_seconds", "Time between sampled tokens of one request",
            buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.prompt_tokens = Counter("arborl_prompt_tokens_total", "Prompt tokens of served calls", registry=r)
        self.completion_tokens = Counter("arborl_completion_tokens_total", "Sampled completion tokens", registry=r)
        self.prefix_cache_query_tokens = Counter(
            "arborl_prefix_cache_query_tokens_total", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.prefix_cache_hit_tokens = Counter(
            "arborl_prefix_cache_hit_tokens_total", "Prompt tokens whose KV came from the prefix cache", registry=r
        )
        self.batch_size = Histogram(
            "arborl_engine_batch_size", "Sequences in one engine step", buckets=_BATCH_BUCKETS, registry=r
        )
        self.engine_step = Histogram(
            "arborl_engine_step_seconds", "Duration of one engine forward step", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.prefix_breaks = Counter(
            "arborl_prefix_breaks_total", "Calls whose prompt branched from the session's trie", ["reason"], registry=r
        )
        self.stitched_tokens = Counter(
            "arborl_stitched_tokens_total", "Prompt tokens reused token-exactly from earlier turns", registry=r
        )
        self.tool_call_parse_failures = Counter(
            "arborl_tool_call_parse_failures_total", "Malformed tool calls returned as text", ["parser"], registry=r
        )
        self.calls_recorded = Counter(
            "arborl_calls_recorded_total", "Calls written to the store", ["status"], registry=r
        )
        self.calls_unrecorded = Counter(
            "arborl_calls_unrecorded_total", "Calls sampled but not recorded: the store was unreachable, so "
            "their clients got an error instead of the answer", registry=r,
        )
        self.auxiliary_calls = Counter(
            "arborl_auxiliary_calls_total", "Calls recorded in their own trie, out of the main agent's path",
            ["purpose"], registry=r,
        )
        self.record_duration = Histogram(
            "arborl_record_duration_seconds", "Trie insert plus durable commit of one call",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1), registry=r,
        )
        self.swap_duration = Histogram(
            "arborl_weight_swap_seconds", "Time to swap new weights into the engine", buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "arborl_requests_rejected_total", "Requests refused because the engine queue was full", registry=r
        )
        self.queue_depth = Gauge("arborl_engine_queue_depth", "Requests waiting for an engine slot", registry=r)
        self.running = Gauge("arborl_engine_running_requests", "Requests being generated", registry=r)
        self.policy_version = Gauge("arborl_policy_version", "Policy version being served", registry=r)
        self.active_sessions = Gauge(
            "arborl_active_sessions", "Sessions with a call in the last 5 minutes", registry=r
        )
        self.trie_nodes = Gauge("arborl_trie_nodes", "Trie nodes in the store", registry=r)
        self.trie_tokens = Gauge("arborl_trie_tokens", "Tokens stored in tries (shared prefixes once)", registry=r)
        # An engine of several replicas (gateway/engines/replica_router.py): one series per replica.
        self.replica_in_rotation = Gauge(
            "arborl_replica_in_rotation", "1 while the replica gets new requests, 0 while it is out", ["replica"],
            registry=r)
        self.replica_version = Gauge("arborl_replica_policy_version", "Policy version the replica serves",
                                     ["replica"], registry=r)
        self.replica_running = Gauge("arborl_replica_running_requests", "Requests the replica generates",
                                     ["replica"], registry=r)
        self.replica_waiting = Gauge("arborl_replica_queue_depth", "Requests waiting for a slot on the replica",
                                     ["replica"], registry=r)
        self.replica_sessions = Gauge("arborl_replica_sessions", "Sessions whose calls go to the replica",
                                      ["replica"], registry=r)
        self.replica_prompt_tokens = Gauge(
            "arborl_replica_prompt_tokens", "Prompt tokens of the requests the replica finished", ["replica"],
            registry=r)
        self.replica_cached_tokens = Gauge(
            "arborl_replica_cached_prompt_tokens", "Of those, the tokens its prefix cache served", ["replica"],
            registry=r)
        self.replica_cache_hit_rate = Gauge(
            "arborl_replica_prefix_cache_hit_rate", "Cached over prompt tokens on the replica", ["replica"],
            registry=r)
        self._session_seen: dict[str, float] = {}
        # Known label values start at 0, so dashboards and alerts see the series before the
        # first event (Prometheus' advice for labelled counters).
        for reason in ("reasoning_dropped", "history_edited", "template_unstable", "new_root"):
            self.prefix_breaks.labels(reason)
        for purpose in ("subagent", "title", "side"):
            self.auxiliary_calls.labels(purpose)

    # EngineObserver
    def observe_step(self, batch_size: int, new_tokens: int, seconds: float) -> None:
        self.batch_size.observe(batch_size)
        self.engine_step.observe(seconds)

    def observe_prefix_lookup(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.prefix_cache_query_tokens.inc(prompt_tokens)
        self.prefix_cache_hit_tokens.inc(hit_tokens)

    def observe_swap(self, version: int, seconds: float) -> None:
        self.swap_duration.observe(seconds)

    def observe_replicas(self, replicas: Sequence[ReplicaStats]) -> None:
        for replica in replicas:
            name = replica.name
            self.replica_in_rotation.labels(name).set(1 if replica.in_rotation else 0)
            self.replica_version.labels(name).set(replica.policy_version)
            self.replica_running.labels(name).set(replica.running)
            self.replica_waiting.labels(name).set(replica.waiting)
            self.replica_sessions.labels(name).set(replica.sessions)
            self.replica_prompt_tokens.labels(name).set(replica.prompt_tokens)
            self.replica_cached_tokens.labels(name).set(replica.cached_prompt_tokens)
            self.replica_cache_hit_rate.labels(name).set(
                replica.cached_prompt_tokens / replica.prompt_tokens if replica.prompt_tokens else 0.0)

    def touch_session(self, session_id: str) -> None:
        self._session_seen[session_id] = time.monotonic()

    def render(self, refresh: Callable[[], None]) -> bytes:
        refresh()
        horizon = time.monotonic() - 300
        self._session_seen = {k: t for k, t in self._session_seen.items() if t >= horizon}
        self.active_sessions.set(len(self._session_seen))
        return generate_latest(self.registry)
