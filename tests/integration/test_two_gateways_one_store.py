"""Issue 14 acceptance: two gateways on one PostgreSQL store, and a learner beside them.

Two ``arborl serve`` processes (separate OS processes: nothing shared but the database) record
into one PostgreSQL store. 16 agent sessions in 3 rollout groups talk to them at once, each
group's sessions sharing one prompt (system + user message); every third session moves between
the gateways mid-conversation (alternating turn by turn, or switching after turn 2), streaming
and non-streaming calls mixed, each session identified the way orchestrated rollouts are (its
session key, with or without the ``/s/{session}`` path). Then:

- every call a client received is recorded exactly once, under its session, in order, with the
  reply and token counts the client saw; each gateway recorded exactly the calls it served;
- stitching held across the switch: every turn extends the previous one token for token
  (``stitched_from`` the previous call, no ``branch_reason``, each session's trie one line), and
  neither gateway counted a prefix break;
- each group's trie (the one the learner builds from the store) holds each shared prefix once:
  its tokens are exactly the distinct prefixes of its calls' paths, the shared prompt among them once;
- ``arborl train`` as a third process, on the same database from its own folder, commits a step
  that consumed the three groups and trained on every recorded call.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from gateway_processes import gateway_env as _env
from gateway_processes import gateway_log as _log
from gateway_processes import serve_gateway as _serve
from gateway_processes import stop_gateway as _stop
from gateway_processes import wait_until_ready as _wait_ready

from arborl.learner.group_data import load_group
from arborl.rollout.store import RunLedger, open_read_model, open_store
from conftest import free_port

pytestmark = pytest.mark.slow

GROUP_SIZES = (6, 5, 5)  # 16 sessions
PROMPTS = [
    ("You are a careful assistant. Answer briefly.", "List three prime numbers."),
    ("You are a poet who writes short lines.", "Write a line about the sea."),
    ("You are a terse shell expert.", "How do I count lines in a file?"),
]
FOLLOW_UPS = ["Go on.", "Why?", "Say it differently."]
MAX_TOKENS = 8


def _metric(url: str, name: str) -> float:
    """The sum of every sample of ``name`` (over its labels) in the gateway's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    total = 0.0
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == name:
                total += sample.value
    return total


def _recorded_ok(url: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name == "arborl_calls_recorded_total" and sample.labels.get("status") == "ok":
                return sample.value
    return 0.0


@dataclass
class Session:
    index: int  # 0..15, over all groups
    rank: int  # its place in its group
    group: int
    id: str
    key: str
    turns: int
    gateways: list[int]  # which gateway serves each turn
    streams: list[bool]
    by_path: bool  # /s/{session}/v1 and the key (as GatewayTarget), else the key alone
    replies: list[str] = field(default_factory=list)
    usage: list[tuple[int, int]] = field(default_factory=list)  # (prompt, completion) tokens the client saw
    filed_as: list[str] = field(default_factory=list)  # the x-arborl-session header of each response


def _plan(i: int, rank: int, group: int, key_for) -> Session:
    session_id = f"rollout-{group}-{secrets.token_hex(5)}"
    turns = 3 + i % 2
    home = i % 2
    if i % 3 == 0 and i % 2 == 0:
        gateways = [(home + t) % 2 for t in range(turns)]  # alternating: a, b, a, ...
    elif i % 3 == 0:
        gateways = [home if t < 2 else 1 - home for t in range(turns)]  # moved after turn 2
    else:
        gateways = [home] * turns
    streams = [(i + t) % 2 == 1 for t in range(turns)]
    return Session(i, rank, group, session_id, key_for(session_id), turns, gateways, streams, i % 4 < 2)


def _converse(session: Session, urls: list[str], start: threading.Barrier) -> None:
    system, user = PROMPTS[session.group]
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    clients = []
    for url in urls:
        base = f"{url}/s/{session.id}/v1" if session.by_path else f"{url}/v1"
        clients.append(openai.OpenAI(base_url=base, api_key=session.key, max_retries=0, timeout=120))
    start.wait()
    for turn in range(session.turns):
        client = clients[session.gateways[turn]]
        request = dict(model="tiny", messages=messages, max_tokens=MAX_TOKENS, temperature=1.0,
                       seed=1000 * session.index + turn)
        if session.streams[turn]:
            with client.chat.completions.with_streaming_response.create(
                **request, stream=True, stream_options={"include_usage": True}
            ) as response:
                session.filed_as.append(response.headers.get("x-arborl-session", ""))
                text, usage = [], None
                for chunk in response.parse():
                    if chunk.choices and chunk.choices[0].delta.content:
                        text.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        usage = chunk.usage
                reply = "".join(text)
        else:
            raw = client.chat.completions.with_raw_response.create(**request)
            session.filed_as.append(raw.headers.get("x-arborl-session", ""))
            completion = raw.parse()
            reply, usage = completion.choices[0].message.content or "", completion.usage
        assert usage is not None, "no usage in the response"
        session.replies.append(reply)
        session.usage.append((usage.prompt_tokens, usage.completion_tokens))
        messages += [{"role": "assistant", "content": reply},
                     {"role": "user", "content": FOLLOW_UPS[turn % len(FOLLOW_UPS)]}]


def _prefixes(paths: list[list[int]]) -> set[tuple[int, ...]]:
    return {tuple(path[:n]) for path in paths for n in range(1, len(path) + 1)}


def test_two_gateways_share_one_postgres_store_and_a_third_process_trains(
    postgres_dsn, tiny_model_dir, run_root
):
    started = time.monotonic()
    run_dirs = [run_root / "gateway-a", run_root / "gateway-b"]
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    processes = [_serve(tiny_model_dir, run_dirs[i], postgres_dsn, ports[i]) for i in range(2)]
    store = open_store(postgres_dsn, run_root / "orchestrator")
    try:
        # The orchestrator's side, while the gateways start: 3 groups, a session and key per rollout.
        ledger = RunLedger(store)
        groups = [ledger.open_group(f"task-{g}", size) for g, size in enumerate(GROUP_SIZES)]
        sessions: list[Session] = []
        for g, size in enumerate(GROUP_SIZES):
            for rank in range(size):
                session = _plan(len(sessions), rank, g, store.issue_session_key)
                ledger.start_rollout(session.id, groups[g], scaffold="sdk")
                sessions.append(session)
        assert len(sessions) == 16
        assert sum(1 for s in sessions if len(set(s.gateways)) == 2) >= 5  # some sessions switch gateway
        _wait_ready(processes, urls, run_dirs)

        errors: list[BaseException] = []
        start = threading.Barrier(len(sessions))

        def drive(session: Session) -> None:
            try:
                _converse(session, urls, start)
            except BaseException as exc:  # noqa: BLE001 - reported below
                errors.append(exc)
                start.abort()

        threads = [threading.Thread(target=drive, args=(s,), daemon=True) for s in sessions]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "a session did not finish"
        assert not errors, f"{errors!r}\n{_log(run_dirs[0])}\n{_log(run_dirs[1])}"
        conversed = time.monotonic()

        # Rewards: varied within each group, so no group is dropped as uniform.
        completed = [ledger.finish_rollout(s.id, float(s.rank % 2)) for s in sessions]
        assert sum(completed) == len(groups)
        assert sorted(g.id for g in ledger.pending_groups()) == sorted(groups)

        # -- every call a client received is recorded exactly once ------------------------------
        total_turns = sum(s.turns for s in sessions)
        assert total_turns == 56
        assert store.query("SELECT COUNT(*), COUNT(DISTINCT id) FROM calls")[0] == (total_turns, total_turns)
        assert {row[0] for row in store.query("SELECT DISTINCT session_id FROM calls")} == {s.id for s in sessions}
        for session in sessions:
            assert session.filed_as == [session.id] * session.turns  # identified as its rollout by both gateways
            calls = store.calls(session.id)
            assert [c.seq for c in calls] == list(range(session.turns)), session.id
            assert all(c.status == "ok" and c.token_exact and c.purpose == "main" for c in calls)
            assert [c.response_message["content"] for c in calls] == session.replies
            assert [(c.prompt_len, c.completion_len) for c in calls] == session.usage
            assert all(c.completion_versions == [0] * c.completion_len for c in calls)
            assert ledger.call_stats(session.id).calls == session.turns
        served = [sum(s.gateways.count(i) for s in sessions) for i in range(2)]
        assert served == [_recorded_ok(url) for url in urls]  # each gateway recorded what it served, once

        # -- stitching held across the switch: zero breaks --------------------------------------
        for url in urls:
            assert _metric(url, "arborl_prefix_breaks_total") == 0
            assert _metric(url, "arborl_stitched_tokens_total") > 0
        for session in sessions:
            calls = store.calls(session.id)
            paths = [store.call_tokens(c) for c in calls]
            for n in range(1, len(calls)):
                assert calls[n].stitched_from == calls[n - 1].id, (session.id, n, session.gateways)
                assert calls[n].branch_reason is None, (session.id, n, calls[n].branch_reason)
                earlier = paths[n - 1][0] + paths[n - 1][1]
                assert paths[n][0][: len(earlier)] == earlier  # token for token, whoever served it
            last = calls[-1]
            assert store.trie(session.id).num_tokens == last.prompt_len + last.completion_len  # one line

        # -- each group's trie: one copy of each shared prefix ----------------------------------
        for g, group_id in enumerate(groups):
            members = [s for s in sessions if s.group == g]
            data = load_group(ledger, ledger.group(group_id))
            assert len(data.samples) == len(members) and data.calls == sum(s.turns for s in members)
            trie = data.samples[0].trie
            assert all(sample.trie is trie for sample in data.samples)  # the group's rollouts share it
            paths = [sum(store.call_tokens(c), []) for s in members for c in store.calls(s.id)]
            first_prompts = {tuple(store.call_tokens(store.calls(s.id)[0])[0]) for s in members}
            assert len(first_prompts) == 1, "a group's sessions share one prompt"
            (shared,) = first_prompts
            assert trie.match(list(shared)) == len(shared)
            distinct = _prefixes(paths)
            assert trie.num_tokens == len(distinct)  # every token of every prefix, and once
            # the shared prompt once, not once per rollout (each session's own calls are one line):
            lines = sum(len(sum(store.call_tokens(store.calls(s.id)[-1]), [])) for s in members)
            assert trie.num_tokens <= lines - (len(members) - 1) * len(shared)

        # -- the learner trains on those groups from a third process ----------------------------
        learner_dir = run_root / "learner"
        learner = subprocess.run(
            [sys.executable, "-m", "arborl.ops.cli", "train", "--store", postgres_dsn, "--run-dir", str(learner_dir),
             "--model", str(tiny_model_dir), "--device", "cpu", "--lr", "1e-3", "--groups-per-step", "3",
             "--max-steps", "1", "--idle-exit", "0"],
            capture_output=True, text=True, env=_env(), timeout=300,
        )
        output = learner.stdout + learner.stderr
        assert learner.returncode == 0, output
        assert f"step 1: training on groups {sorted(groups)} ({total_turns} calls)" in output, output
        (step,) = ledger.steps()
        assert (step.step, step.version) == (1, 1) and sorted(step.metrics["groups"]) == sorted(groups)
        assert Path(step.checkpoint).is_relative_to(learner_dir) and Path(step.checkpoint).is_dir()
        assert ledger.consumed() == {g: 1 for g in groups} and ledger.pending_groups() == []
        assert all(ledger.group(g).dropped is None for g in groups)
        with open_read_model(run_root / "watcher", store_url=postgres_dsn) as model:
            assert model.latest_trained_version() == 1
        print(f"\ntwo gateways ready and 16 sessions done in {conversed - started:.1f} s; "
              f"whole test {time.monotonic() - started:.1f} s")
    finally:
        for process in processes:
            _stop(process)
        store.close()
