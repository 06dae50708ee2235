"""Two vLLM replicas behind the router: prefix-cache hit rate by routing, and publish-to-served time.

Two vLLM servers (the CPU build from its own venv, tests/vllm_server.py) serve the same model
(the default, SmolLM2-135M-Instruct, or ``--model``); a gateway in this process puts a
``ReplicaRouter`` in front of them.

  hit rate  8 agent sessions of 10 turns each (every turn resends the conversation and adds a
            user message), run concurrently, once with ``routing: affinity`` and once with
            ``round_robin`` (the baseline), with both servers' prefix caches emptied before each.
            The rate is the prompt tokens vLLM's prefix cache served over all prompt tokens, as
            vLLM reports them per request.
  publish   the time of ``POST /admin/weights`` (pause, reload, cache reset, resume, version
            label) until the call returns, when every replica serves the new version: one
            replica alone, then two replicas rolling (one at a time) and all at once. Median of
            ``--publishes`` publishes each, after one uncounted.

    python tests/bench/bench_replicas.py [--model M] [--publishes 5]   # table to stdout
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the vLLM test server

import vllm_server  # noqa: E402

ADMIN = "bench-admin-token-0123456789"
SESSIONS, TURNS = 8, 10


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _gateway(engine, work: Path):
    from arborl.gateway.app import create_app
    from arborl.gateway.settings import GatewaySettings
    from arborl.ops.local_gateway import ServerThread
    from arborl.rollout.store import SqliteTrajectoryStore

    work.mkdir(parents=True, exist_ok=True)
    settings = GatewaySettings(admin_token=ADMIN, any_model_name=True)
    return ServerThread(create_app(engine, SqliteTrajectoryStore(work / "store.sqlite"), settings), settings=settings)


def _session(url: str, name: str) -> None:
    messages = [{"role": "system", "content": "You are a coding agent. Use the tools to fix the repository."},
                {"role": "user", "content": f"Task {name}: the test suite fails in module {name}; find out why."}]
    with httpx.Client(base_url=url, timeout=300) as client:
        for turn in range(TURNS):
            reply = client.post(f"/s/{name}/v1/chat/completions", json={
                "model": "policy", "messages": messages, "max_tokens": 16, "temperature": 0})
            reply.raise_for_status()
            messages += [{"role": "assistant", "content": reply.json()["choices"][0]["message"]["content"] or ""},
                         {"role": "user", "content": f"Observation {turn}: 3 tests failed in {name}.py. Go on."}]


def _hit_rate(servers, model: Path, routing: str, work: Path) -> tuple[float, float]:
    from arborl.gateway.engines.replica_router import ReplicaRouter
    from arborl.gateway.engines.vllm_server import VllmEngine

    for server in servers:
        httpx.post(server.url + "/reset_prefix_cache", timeout=30).raise_for_status()
    router = ReplicaRouter([VllmEngine(s.url, model, model_name="policy") for s in servers],
                           names=[f"r{i}" for i in range(len(servers))], routing=routing)  # type: ignore[arg-type]
    with _gateway(router, work / routing) as url:
        started = time.perf_counter()
        threads = [threading.Thread(target=_session, args=(url, f"{routing}-{s}")) for s in range(SESSIONS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - started
        replicas = router.stats().replicas
    prompt = sum(r.prompt_tokens for r in replicas)
    return sum(r.cached_prompt_tokens for r in replicas) / prompt, wall


def _publish_seconds(engine, model: Path, work: Path, publishes: int) -> float:
    seconds = []
    with _gateway(engine, work) as url:
        for n in range(publishes + 1):  # the first publish warms up, uncounted
            started = time.perf_counter()
            reply = httpx.post(url + "/admin/weights", headers={"authorization": f"Bearer {ADMIN}"},
                               json={"path": str(model), "version": engine.stats().policy_version + 1}, timeout=300)
            reply.raise_for_status()
            if n:
                seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="SmolLM2-135M-Instruct", help="a model folder or the default's name")
    parser.add_argument("--publishes", type=int, default=5)
    parser.add_argument("--dtype", default="float32", help="the servers' --dtype (auto on a GPU)")
    args = parser.parse_args()
    python = vllm_server.vllm_python()
    if python is None:
        raise SystemExit(f"vLLM is not installed (ARBORL_VLLM_PYTHON); install it with: {vllm_server.INSTALL}")
    from arborl.gateway.engines.model_source import resolve_model
    from arborl.gateway.engines.replica_router import ReplicaRouter
    from arborl.gateway.engines.vllm_server import VllmEngine
    from arborl.ops.engine_servers import VllmServer, start_together
    from arborl.ops.local_gateway import free_loopback_port

    model = resolve_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="arborl-bench-replicas-"))
    servers = [VllmServer(python, model, free_loopback_port(), work / f"vllm-{i}.log", max_num_seqs=8,
                          dtype=args.dtype, max_model_len=2048) for i in range(2)]
    _log(f"starting two vLLM servers on {model.name} (minutes on a CPU: they compile the model)")
    start_together(servers)
    try:
        rates = {}
        for routing in ("round_robin", "affinity"):
            _log(f"{SESSIONS} sessions x {TURNS} turns, {routing}")
            rates[routing] = _hit_rate(servers, model, routing, work)
        publish = {}
        _log("publishing into one replica")
        publish["1 replica"] = _publish_seconds(VllmEngine(servers[0].url, model, model_name="policy"), model,
                                                work / "one", args.publishes)
        for mode in ("rolling", "all"):
            _log(f"publishing into two replicas, {mode}")
            router = ReplicaRouter([VllmEngine(s.url, model, model_name="policy") for s in servers],
                                   names=["r0", "r1"], publish=mode)  # type: ignore[arg-type]
            publish[f"2 replicas, {mode}"] = _publish_seconds(router, model, work / mode, args.publishes)
    finally:
        for server in servers:
            server.stop()
    print(f"\n{model.name} on two vLLM servers ({'CPU build' if args.dtype == 'float32' else args.dtype})")
    print(f"\n{SESSIONS} sessions x {TURNS} turns | prefix cache hit rate | wall s")
    print("|---|---|---|")
    for routing, (rate, wall) in rates.items():
        print(f"| {routing} | {rate:.1%} | {wall:.1f} |")
    base = rates["round_robin"][0]
    print(f"| affinity / round robin | {rates['affinity'][0] / base:.2f}x | |" if base else "")
    print(f"\npublish-to-served (median of {args.publishes}) | seconds | / 1 replica")
    print("|---|---|---|")
    for name, seconds in publish.items():
        print(f"| {name} | {seconds:.2f} | {seconds / publish['1 replica']:.2f}x |")


if __name__ == "__main__":
    main()
