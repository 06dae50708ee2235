"""Issue 14 acceptance: kill -9 one gateway and the database connection mid-stream.

Two ``arborl serve`` processes record into one PostgreSQL database. 12 clients, each its own
session (half named by the ``/s/{session}/v1`` path, half by the ``x-arborl-session`` header),
stream chat completions at both gateways without pause. Once several streams are under way on
each gateway:

- gateway A is killed with SIGKILL: its streams in flight are cut (no finish chunk, no ``[DONE]``);
  its clients move to gateway B;
- gateway B's database connections are cut (``pg_terminate_backend`` on the backends whose client
  ports are B's sockets), while B is inside a transaction recording a call: the test holds the
  row lock that transaction needs (``SELECT ... FOR UPDATE`` on the session) until B waits on it,
  so the cut falls inside that transaction, before its COMMIT, every time, not only by luck.

Then, read back with a fresh store from the DSN:
- every response a client received completely (its finish chunk, usage, ``[DONE]``, no error
  event) is in the store, ok, under its session, with the text and token count the client saw,
  one stored call per delivered response;
- a stream that ended with the ``store_unavailable`` error event was not recorded as ok (its
  transaction was the one cut, before its COMMIT; a cut during a COMMIT could leave a call that
  committed though its client saw the error, which is why this holds here and not in general);
- gateway B keeps serving: after the cut, every client (A's too) gets complete responses from B
  (after at most a brief 503 with Retry-After), and they are recorded.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil
import psycopg
import pytest
from gateway_processes import gateway_log as _log
from gateway_processes import serve_gateway as _serve
from gateway_processes import stop_gateway as _stop
from gateway_processes import wait_until_ready as _wait_ready

from arborl.rollout.store import open_store
from conftest import free_port

pytestmark = pytest.mark.slow

CLIENTS = 12
MAX_TOKENS = 32
A, B = 0, 1
SYSTEM = "You are a helpful assistant. Answer at length."
QUESTIONS = ["Tell me about rivers.", "And mountains?", "What about the sea?", "Now the sky.", "Go on."]


@dataclass
class Delivered:
    gateway: int
    messages: list[dict]
    text: str
    completion_tokens: int
    after_cut: bool  # the request was sent after B's connections were cut


@dataclass
class Client:
    index: int
    session: str
    by_path: bool
    gateway: int  # where it sends its next call
    messages: list[dict] = field(default_factory=list)
    delivered: list[Delivered] = field(default_factory=list)
    cut: list[tuple[int, str]] = field(default_factory=list)  # (gateway, text so far): the stream stopped short
    errored: list[tuple[int, str, str]] = field(default_factory=list)  # (gateway, error code, text so far)
    refused: list[tuple[int, int]] = field(default_factory=list)  # (gateway, status)


class Traffic:
    """What the clients are doing right now, for the test to pick its moment."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = [set(), set()]  # sessions whose stream has sent content and not ended, by gateway
        self.delivered = [0, 0]
        self.cut_done = threading.Event()
        self.stop = threading.Event()

    def streaming(self, gateway: int, session: str, on: bool) -> None:
        with self.lock:
            (self.in_flight[gateway].add if on else self.in_flight[gateway].discard)(session)

    def snapshot(self) -> tuple[list[int], list[int]]:
        with self.lock:
            return [len(s) for s in self.in_flight], list(self.delivered)


def _one_stream(http: httpx.Client, url: str, client: Client, traffic: Traffic) -> None:
    """One streaming call; files its outcome in ``client``."""
    gateway = client.gateway
    after_cut = traffic.cut_done.is_set()
    messages = list(client.messages)
    body = {"model": "tiny", "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 1.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    if client.by_path:
        endpoint, headers = f"{url}/s/{client.session}/v1/chat/completions", {}
    else:
        endpoint, headers = f"{url}/v1/chat/completions", {"x-arborl-session": client.session}
    text: list[str] = []
    finish = usage = error = None
    done = False
    try:
        with http.stream("POST", endpoint, json=body, headers=headers) as response:
            if response.status_code != 200:
                response.read()
                client.refused.append((gateway, response.status_code))
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "store_unavailable", response.text
                time.sleep(min(float(response.headers["retry-after"]), 2.0))
                return
            assert response.headers["x-arborl-session"] == client.session
            for line in response.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = event["error"]
                    continue
                for choice in event["choices"]:
                    if choice["delta"].get("content"):
                        text.append(choice["delta"]["content"])
                        traffic.streaming(gateway, client.session, True)
                    if choice.get("finish_reason"):
                        finish = choice["finish_reason"]
                if event.get("usage"):
                    usage = event["usage"]
    except httpx.TransportError:
        pass  # connection refused (A is dead), or the stream was cut mid-way
    finally:
        traffic.streaming(gateway, client.session, False)
    reply = "".join(text)
    if done and finish is not None and error is None and usage is not None:  # fully delivered
        tokens = (usage or {}).get("completion_tokens", 0)
        client.delivered.append(Delivered(gateway, messages, reply, tokens, after_cut))
        with traffic.lock:
            traffic.delivered[gateway] += 1
        client.messages += [{"role": "assistant", "content": reply},
                            {"role": "user", "content": QUESTIONS[len(client.delivered) % len(QUESTIONS)]}]
        return
    if error is not None:
        client.errored.append((gateway, error.get("code"), reply))
    else:
        client.cut.append((gateway, reply))
    if gateway == A and _dead(url):
        client.gateway = B  # A is gone: the session moves to the gateway still serving
    # else: send the same conversation again, as an agent retrying would


def _dead(url: str) -> bool:
    try:
        httpx.get(url + "/healthz", timeout=2)
        return False
    except httpx.TransportError:
        return True


def _drive(client: Client, urls: list[str], traffic: Traffic, deadline: float, errors: list) -> None:
    try:
        with httpx.Client(timeout=httpx.Timeout(60, connect=5)) as http:
            while not traffic.stop.is_set() and time.monotonic() < deadline:
                if traffic.cut_done.is_set() and any(d.after_cut and d.gateway == B for d in client.delivered):
                    return  # served by B after the cut: this client is done
                _one_stream(http, urls[client.gateway], client, traffic)
    except BaseException as exc:  # noqa: BLE001 - reported by the test
        errors.append(exc)


def _wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _ports_to(pid: int, db_port: int) -> set[int]:
    """The local ports of process ``pid``'s TCP connections to the database."""
    return {c.laddr.port for c in psutil.Process(pid).net_connections(kind="tcp")
            if c.raddr and c.raddr.port == db_port}


def test_kill_one_gateway_and_the_other_ones_connection_mid_stream(postgres_dsn, tiny_model_dir, run_root):
    started = time.monotonic()
    run_dirs = [run_root / "gateway-a", run_root / "gateway-b"]
    ports = [free_port(), free_port()]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    processes = [_serve(tiny_model_dir, run_dirs[i], postgres_dsn, ports[i]) for i in range(2)]
    db_port = int(psycopg.conninfo.conninfo_to_dict(postgres_dsn).get("port") or 5432)
    admin = psycopg.connect(postgres_dsn, autocommit=True)
    pin = psycopg.connect(postgres_dsn)  # holds the lock that B's record transaction will wait on
    threads: list[threading.Thread] = []
    traffic = Traffic()
    try:
        _wait_ready(processes, urls, run_dirs)
        ready = time.monotonic()
        clients = [Client(i, f"chaos-{i}-{secrets.token_hex(4)}", i % 4 < 2, i % 2,
                          [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTIONS[0]}])
                   for i in range(CLIENTS)]
        errors: list[BaseException] = []
        deadline = time.monotonic() + 90
        threads = [threading.Thread(target=_drive, args=(c, urls, traffic, deadline, errors), daemon=True)
                   for c in clients]
        for thread in threads:
            thread.start()

        # -- mid-stream: responses delivered by each gateway, and several streams under way on each --
        def busy() -> bool:
            in_flight, delivered = traffic.snapshot()
            return min(delivered) >= 1 and in_flight[A] >= 3 and in_flight[B] >= 2

        _wait_for(busy, 60, f"never busy enough: {traffic.snapshot()} {errors!r}")
        assert not errors, errors
        streaming_on_a = traffic.snapshot()[0][A]

        # (a) kill -9 gateway A
        os.kill(processes[A].pid, signal.SIGKILL)
        processes[A].wait(timeout=10)
        killed_at = time.monotonic()

        # (b) cut gateway B's database connections while it is recording a call: lock the row of a
        # session B is serving (one already in the store), wait until B's transaction waits on it, cut.
        def on_b() -> list[Client]:  # already in the store, and streaming on B now
            with traffic.lock:
                return [c for c in clients if c.gateway == B and c.delivered and c.session in traffic.in_flight[B]]

        _wait_for(on_b, 30, "no session in the store streams on B")
        pinned = on_b()[0]
        assert pin.execute("SELECT 1 FROM sessions WHERE id = %s FOR UPDATE", (pinned.session,)).fetchone()

        def waiting_backends() -> list[int]:
            return [row[0] for row in admin.execute(
                "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock' "
                "AND pid <> pg_backend_pid()").fetchall()]

        _wait_for(lambda: bool(waiting_backends()), 30, "B never waited on the pinned session's lock")
        # B's backends: those whose client ports are B's sockets (over a Unix socket, where there
        # are no ports, every backend of the database but this test's: A is dead).
        b_ports = _ports_to(processes[B].pid, db_port)
        ours = [admin.info.backend_pid, pin.info.backend_pid]
        b_backends = {row[0] for row in admin.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> ALL(%s) "
            "AND (client_port = ANY(%s) OR %s)", (ours, list(b_ports), not b_ports)).fetchall()}
        assert set(waiting_backends()) <= b_backends, (waiting_backends(), b_backends, b_ports)  # B's
        terminated = admin.execute("SELECT pid, pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
                                   (list(b_backends),)).fetchall()
        assert terminated and all(ok for _, ok in terminated), terminated
        pin.rollback()
        traffic.cut_done.set()
        cut_at = time.monotonic()

        for thread in threads:
            thread.join(timeout=max(1.0, deadline - time.monotonic()))
        traffic.stop.set()
        assert not any(t.is_alive() for t in threads), "a client did not finish"
        assert not errors, f"{errors!r}\n{_log(run_dirs[B])}"
        served = time.monotonic()

        # -- what the clients saw -----------------------------------------------------------------
        cut_on_a = [c for c in clients for g, text in c.cut if g == A and text]
        assert len(cut_on_a) >= 1, "the kill cut no stream mid-way"
        unrecorded = [(c, text) for c in clients for g, code, text in c.errored if g == B]
        assert unrecorded, "no stream on B ended with the error event"
        assert all(code == "store_unavailable" for c in clients for _, code, _ in c.errored)
        assert pinned in [c for c, _ in unrecorded]  # the call whose transaction was cut
        assert not [c for c in clients for g, _ in c.cut if g == B], "a stream on B stopped without an ending"
        for client in clients:  # B kept serving, A's sessions too
            assert any(d.after_cut and d.gateway == B for d in client.delivered), (client.session, client)
            assert all(status == 503 for _, status in client.refused)
        assert processes[B].poll() is None

        # -- read back with a fresh store: every delivered response is there ----------------------
        _stop(processes[B])
        store = open_store(postgres_dsn, run_root / "checker")
        try:
            for client in clients:
                calls = store.calls(client.session)
                ok = Counter(c.response_message["content"] for c in calls if c.status == "ok")
                by_text = {c.response_message["content"]: c for c in calls if c.status == "ok"}
                seen = Counter(d.text for d in client.delivered)
                for text, n in seen.items():
                    assert ok[text] >= n, (client.session, text, n, ok[text], [c.status for c in calls])
                for d in client.delivered:
                    call = by_text[d.text]
                    assert call.completion_len == d.completion_tokens == MAX_TOKENS
                    assert call.messages == d.messages  # the request it answered
                for _, _, text in client.errored:  # the cut transaction never committed
                    assert ok[text] == 0, (client.session, text)
        finally:
            store.close()
        print(f"\ngateways ready in {ready - started:.1f} s; killed A {killed_at - ready:.1f} s later "
              f"({streaming_on_a} streams in flight there); cut B {cut_at - killed_at:.1f} s after; "
              f"({len(terminated)} backends); clients done {served - cut_at:.1f} s after; "
              f"{sum(len(c.delivered) for c in clients)} delivered, "
              f"{len(cut_on_a)} cut on A, {len(unrecorded)} error events on B, "
              f"{sum(len(c.refused) for c in clients)} 503s; whole test {time.monotonic() - started:.1f} s")
    finally:
        traffic.stop.set()
        pin.close()  # first: B may be waiting on its lock
        for process in processes:
            _stop(process)
        for thread in threads:
            thread.join(timeout=10)
        admin.close()
