"""The store as a service: recording cost on SQLite and PostgreSQL, and gateways' throughput on them.

Two figures (issue 14), each against a baseline measured in the same run:

1. Recording cost of an 8k-token call (``record_call``: trie insert, the call row, a durable
   commit), p50 / p99, against a plain one-row insert committed on the same database. Two kinds
   of call: the first call of a session (8,192 new tokens, a whole request) and a later turn of
   an 8k-token conversation (about 300 new tokens, the request stored as a delta). Then the
   same later turns from 16 threads at once, where group commit shares transactions.
2. Requests per second through two gateways (``arborl serve --engine upstream``, two processes)
   on one PostgreSQL database against one gateway on SQLite, in front of the instant upstream
   (``instant_upstream.py``), 64 streaming clients (split between the two gateways), every call
   recorded (the bench checks the rows).

PostgreSQL is a throwaway server of the bench's own (tests/postgres_server.py: fsync on, a
real commit to disk), SQLite a file in WAL mode with ``synchronous=NORMAL`` (the default store).

    python tests/bench/bench_store.py            # tables to stdout, JSON to tests/bench/results/store.json
    python tests/bench/bench_store.py --quick    # fewer samples: checks the script
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the PostgreSQL test server

import postgres_server  # noqa: E402
from bench_proxy_overhead import MODEL, Server, _free_port, load  # noqa: E402

from arborl.rollout.records import CallRecord  # noqa: E402
from arborl.rollout.store import PostgresTrajectoryStore, SqliteTrajectoryStore, TrajectoryStore  # noqa: E402

CONTEXT = 8192
TURN_TOKENS = 300  # what one agent turn adds (a tool result and a reply)


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _quantiles(seconds: list[float]) -> dict[str, float]:
    cuts = statistics.quantiles(seconds, n=100, method="inclusive")
    return {"p50_ms": cuts[49] * 1e3, "p99_ms": cuts[98] * 1e3, "n": len(seconds)}


# --- 1. recording cost ---------------------------------------------------------------------------


class Conversation:
    """One agent session: each call resends the whole conversation, and adds a turn to it."""

    def __init__(self, session: str, rng: random.Random):
        self.session, self.rng = session, rng
        self.path = [rng.randrange(50_000) for _ in range(CONTEXT - 200)]
        self.messages = [{"role": "system", "content": "you are a coding agent " * 50},
                         {"role": "user", "content": "fix the failing test " * 400}]
        self.turn = 0

    def call(self) -> CallRecord:
        completion = [self.rng.randrange(50_000) for _ in range(200)]
        request = json.dumps({"model": MODEL, "messages": self.messages})
        call = CallRecord(
            id=f"{self.session}-{self.turn}", session_id=self.session, dialect="openai_chat", model=MODEL,
            prompt_ids=list(self.path), completion_ids=completion, completion_logprobs=[-0.5] * 200,
            completion_versions=[1] * 200, messages=list(self.messages), request_body=request,
            response_message={"role": "assistant", "content": "ran the tests " * 20},
            response_body="{}", finish_reason="stop")
        # the next call: this one's reply and a tool result appended
        self.path = self.path + completion + [self.rng.randrange(50_000) for _ in range(TURN_TOKENS - 200)]
        self.messages = [*self.messages, call.response_message,
                         {"role": "user", "content": f"tool result {self.turn}: " + "ok " * 100}]
        self.turn += 1
        return call


def _plain_insert(store: TrajectoryStore, n: int) -> list[float]:
    seconds = []
    for i in range(n):
        started = time.perf_counter()
        with store.transaction() as db:
            db.execute("INSERT INTO refused_requests(session_id, at, reason) VALUES (?, ?, ?)",
                       ("bench-plain", float(i), "bench"))
        seconds.append(time.perf_counter() - started)
    return seconds


def _timed(store: TrajectoryStore, call: CallRecord) -> float:
    started = time.perf_counter()
    store.record_call(call)
    return time.perf_counter() - started


def _later_turn(store: TrajectoryStore, session: str, rng: random.Random) -> float:
    """The second call of an 8k-token conversation (the first recorded untimed): ~8.5k tokens,
    of which ~300 are new."""
    talk = Conversation(session, rng)
    store.record_call(talk.call())
    return _timed(store, talk.call())


def _concurrent(store: TrajectoryStore, n: int, tag: str) -> dict:
    """16 agents recording at once: with group commit their calls share transactions."""
    batches, items = store.record_transactions
    together: list[float] = []
    lock = threading.Lock()

    def run(agent: int) -> None:
        agent_rng = random.Random(agent)
        for i in range(max(2, n // 16)):
            took = _later_turn(store, f"agent-{tag}-{agent}-{i}", agent_rng)
            with lock:
                together.append(took)

    started = time.perf_counter()
    threads = [threading.Thread(target=run, args=(agent,)) for agent in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    batches, items = (b - a for a, b in zip((batches, items), store.record_transactions, strict=True))
    return {**_quantiles(together), "calls_per_s": 2 * len(together) / wall, "calls_per_transaction": items / batches}


def _recording(store: TrajectoryStore, one_by_one: TrajectoryStore, n: int, rng: random.Random) -> dict:
    plain = _plain_insert(store, n)
    first = [_timed(store, Conversation(f"first-{i}", rng).call()) for i in range(n)]
    later = [_later_turn(store, f"later-{i}", rng) for i in range(n)]
    return {"plain_insert": _quantiles(plain), "first_call": _quantiles(first), "later_turn": _quantiles(later),
            "later_turn_16_threads": _concurrent(store, n, "grouped"),
            "later_turn_16_threads_commit_per_call": _concurrent(one_by_one, n, "single")}


def recording_cost(pg_dsn: str, work: Path, n: int) -> dict:
    """Each store twice on one database: group commit on (the default), and one commit per call."""
    results = {}
    # (SQLite: one file per store, as a store file has one writing process)
    for name, open_store in (("sqlite", lambda batch: SqliteTrajectoryStore(work / f"bench-{batch}.sqlite",
                                                                            commit_batch=batch)),
                             ("postgres", lambda batch: PostgresTrajectoryStore(pg_dsn, commit_batch=batch))):
        _log(f"recording cost on {name}: {n} samples of each kind")
        store, one_by_one = open_store(64), open_store(1)
        try:
            results[name] = _recording(store, one_by_one, n, random.Random(0))
        finally:
            store.close()
            one_by_one.close()
    return results


# --- 2. throughput through gateways --------------------------------------------------------------


def _gateway(upstream: str, work: Path, name: str, store_url: str | None) -> Server:
    port = _free_port()
    cmd = [sys.executable, "-m", "arborl.ops.cli", "serve", "--engine", "upstream", "--upstream-url", upstream,
           "--upstream-model", MODEL, "--served-name", MODEL, "--run-dir", str(work / name), "--port", str(port)]
    server = Server(name, cmd + (["--store", store_url] if store_url else []), port, work)
    server.ready("/readyz")
    return server


def _rows(store: TrajectoryStore) -> int:
    return store.query("SELECT COUNT(*) FROM calls")[0][0]


def throughput(pg_dsn: str, work: Path, requests: int, concurrency: int) -> dict:
    port = _free_port()
    upstream = Server("upstream", [sys.executable, str(HERE / "instant_upstream.py"), "--port", str(port)], port,
                      work)
    upstream.ready("/v1/models")
    url = f"http://127.0.0.1:{port}/v1"
    results = {}
    try:
        with ProcessPoolExecutor(2) as pool:
            for name, stores in (("one gateway on SQLite", [None]), ("two gateways on PostgreSQL", [pg_dsn, pg_dsn])):
                servers = [_gateway(url, work, f"{name.split()[0]}-{i}", dsn) for i, dsn in enumerate(stores)]
                try:
                    _log(f"{name}: {requests} streaming requests, {concurrency} clients")
                    share = concurrency // len(servers)
                    for server in servers:  # warm-up
                        pool.submit(load, server.port, 50, share).result()
                    started = time.perf_counter()
                    runs = [pool.submit(load, s.port, requests // len(servers), share) for s in servers]
                    done = [run.result() for run in runs]
                    wall = time.perf_counter() - started
                    latencies = sorted(x for run in done for x in run["latencies"])
                    errors = sum(len(run["errors"]) for run in done)
                finally:
                    for server in servers:
                        server.stop()
                store = (SqliteTrajectoryStore(work / f"{name.split()[0]}-0" / "store.sqlite") if stores[0] is None
                         else PostgresTrajectoryStore(pg_dsn))
                try:
                    recorded = _rows(store)
                finally:
                    store.close()
                results[name] = {"ok": len(latencies), "errors": errors, "rps": len(latencies) / wall,
                                 **_quantiles(latencies), "recorded": recorded,
                                 "sent": len(latencies) + errors + 50 * len(servers)}
    finally:
        upstream.stop()
    return results


def _database(server: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return server.rsplit("/", 1)[0] + "/" + name


# --- report --------------------------------------------------------------------------------------


def report(recording: dict, gateways: dict) -> None:
    print("\n### Recording cost of an 8k-token call (ms), against a plain one-row insert on the same database\n")
    print("| store | plain insert p50 / p99 | first call p50 / p99 | later turn p50 / p99 | later turn / plain "
          "(p50) |")
    print("|---|---|---|---|---|")
    for name, r in recording.items():
        plain, first, later = r["plain_insert"], r["first_call"], r["later_turn"]
        print(f"| {name} | {plain['p50_ms']:.2f} / {plain['p99_ms']:.2f} | {first['p50_ms']:.2f} / "
              f"{first['p99_ms']:.2f} | {later['p50_ms']:.2f} / {later['p99_ms']:.2f} | "
              f"{later['p50_ms'] / plain['p50_ms']:.1f}x |")
    print("\n### 16 agents recording later turns at once: group commit against one commit per call\n")
    print("| store | commits | p50 / p99 ms | calls/s | calls per commit | calls/s vs one commit per call |")
    print("|---|---|---|---|---|---|")
    for name, r in recording.items():
        grouped, single = r["later_turn_16_threads"], r["later_turn_16_threads_commit_per_call"]
        for label, row in (("grouped", grouped), ("one per call", single)):
            ratio = f"{row['calls_per_s'] / single['calls_per_s']:.2f}x"
            print(f"| {name} | {label} | {row['p50_ms']:.2f} / {row['p99_ms']:.2f} | {row['calls_per_s']:.0f} | "
                  f"{row['calls_per_transaction']:.1f} | {ratio} |")
    print("\n### Streaming requests through gateways (upstream engine, instant upstream)\n")
    print("| setup | ok | errors | req/s | p50 ms | p99 ms | rows recorded / requests sent | req/s vs SQLite |")
    print("|---|---|---|---|---|---|---|---|")
    base = gateways.get("one gateway on SQLite", {}).get("rps")
    for name, r in gateways.items():
        ratio = f"{r['rps'] / base:.2f}x" if base else "-"
        print(f"| {name} | {r['ok']} | {r['errors']} | {r['rps']:.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | "
              f"{r['recorded']} / {r['sent']} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=300, help="recording samples of each kind per store")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per gateway setup")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--quick", action="store_true", help="few samples: checks the script")
    parser.add_argument("--out", type=Path, help="JSON results (default results/store.json)")
    args = parser.parse_args()
    if args.quick:
        args.samples, args.requests = 40, 200
    out = args.out or HERE / "results" / f"store{'.quick' if args.quick else ''}.json"
    with tempfile.TemporaryDirectory(prefix="arborl-bench-store-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        _log("starting a PostgreSQL server for the bench")
        folder = work / "pg"
        server = postgres_server.start(folder)
        try:
            recording = recording_cost(_database(server, "recording"), work, args.samples)
            gateways = throughput(_database(server, "gateways"), work, args.requests, args.concurrency)
        finally:
            postgres_server.stop(folder)
    report(recording, gateways)
    out.write_text(json.dumps({"recording": recording, "gateways": gateways, "cpus": os.cpu_count(),
                               "samples": args.samples, "requests": args.requests,
                               "concurrency": args.concurrency}, indent=2))
    _log(f"results in {out}")


if __name__ == "__main__":
    main()
