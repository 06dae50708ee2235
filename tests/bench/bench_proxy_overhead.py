"""Gateway overhead: arborl (``upstream`` engine, recording every call) against LiteLLM's proxy.

Both proxies stand in front of the same instant OpenAI-compatible upstream on loopback
(``instant_upstream.py``: 8 small content deltas, a final chunk with usage, ``[DONE]``). One load
generator (its own process: raw asyncio sockets, 64 keep-alive connections) sends 2,000 streaming
chat completions to each target after 100 uncounted warm-up requests, and times each one from the
first byte sent to the last byte received (``data: [DONE]``). The requests go in 4 rounds, the targets
taking turns within each, so drift in the machine's load hits all of them alike. Targets:

  direct   the upstream itself: the baseline
  litellm  LiteLLM's proxy (``litellm --config ...``, its default single uvicorn worker, no database)
  arborl   ``arborl serve --engine upstream`` (one process), recording into a fresh run folder

Added latency is a proxy's p50 / p99 minus the direct p50 / p99; throughput is the proxy's
completed requests per second. arborl must beat LiteLLM on all three; the aim is half LiteLLM's
added latency and twice its throughput. Afterwards the rows in arborl's ``calls`` table must equal
the requests sent (warm-up included).

LiteLLM lives in its own virtual environment so it cannot touch arborl's dependencies:

    python -m venv /tmp/litellm-venv && /tmp/litellm-venv/bin/pip install 'litellm[proxy]'
    python tests/bench/bench_proxy_overhead.py --litellm-python /tmp/litellm-venv/bin/python

Progress goes to stderr; the table to stdout and ``tests/bench/results/proxy_overhead.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from contextlib import closing
from pathlib import Path

HERE = Path(__file__).resolve().parent
MODEL = "bench-model"
PROMPT = "Say hello in five words."
LITELLM_CANDIDATES = ["/work/litellm-venv/bin/python", "/tmp/litellm-venv/bin/python"]
TICKS = os.sysconf("SC_CLK_TCK")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and of its threads (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Server:
    """A server in its own process, logging to a file; ``ready`` polls a URL until it answers 200."""

    def __init__(self, name: str, cmd: list[str], port: int, log_dir: Path, env: dict | None = None):
        self.name, self.port = name, port
        self.log_path = log_dir / f"{name}.log"
        # without a database: LiteLLM would try to use one named here (and refuses an empty one)
        env = {**{k: v for k, v in os.environ.items() if k != "DATABASE_URL"}, **(env or {})}
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)

    def ready(self, path: str, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=5) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        self.stop()
        tail = self.log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"{self.name} did not become ready on {path} (exit {self.proc.poll()}):\n{tail}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


# --- load generator (runs in a worker process) ---------------------------------------------------


async def _request(reader, writer, request: bytes) -> tuple[bool, bytes]:
    """Send one request on a keep-alive connection; read the whole response. -> (keep open, body)."""
    writer.write(request)
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").lower()
    status = head[9:12]
    headers = dict(line.split(":", 1) for line in head.split("\r\n")[1:] if ":" in line)
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif "chunked" in headers.get("transfer-encoding", ""):
        parts = []
        while size := int((await reader.readline()).split(b";")[0], 16):
            parts.append((await reader.readexactly(size + 2))[:-2])
        while await reader.readline() not in (b"\r\n", b""):  # trailers
            pass
        body = b"".join(parts)
    else:
        body = await reader.read()
        headers["connection"] = "close"
    if status != "200":
        raise RuntimeError(f"HTTP {status}: {body[:300]!r}")
    return "close" not in headers.get("connection", ""), body


async def _load(port: int, total: int, concurrency: int, timeout: float) -> dict:
    payload = json.dumps({"model": MODEL, "stream": True, "messages": [{"role": "user", "content": PROMPT}]})
    request = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
               "content-type: application/json\r\naccept: text/event-stream\r\n"
               "authorization: Bearer sk-bench\r\n"
               f"content-length: {len(payload)}\r\n\r\n{payload}").encode()
    left = [total]
    latencies: list[float] = []
    errors: list[str] = []

    async def client() -> None:
        conn = None
        while left[0] > 0:
            left[0] -= 1
            started = time.perf_counter()
            try:
                async with asyncio.timeout(timeout):
                    conn = conn or await asyncio.open_connection("127.0.0.1", port)
                    keep, body = await _request(*conn, request)
                if not body.rstrip().endswith(b"data: [DONE]") or b"dog." not in body:
                    raise RuntimeError(f"incomplete stream: ...{body[-200:]!r}")
                latencies.append(time.perf_counter() - started)
            except Exception as exc:  # noqa: BLE001 - every failure is counted, and a few are shown
                errors.append(f"{type(exc).__name__}: {exc}")
                keep = False
            if not keep and conn:
                conn[1].close()
                conn = None
        if conn:
            conn[1].close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return {"seconds": time.perf_counter() - started, "latencies": latencies, "errors": errors}


def load(port: int, total: int, concurrency: int, timeout: float = 60) -> dict:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(_load(port, total, concurrency, timeout))
    return uvloop.run(_load(port, total, concurrency, timeout))


# --- targets -------------------------------------------------------------------------------------


def _litellm_python(option: str | None) -> str:
    for candidate in [option, os.environ.get("LITELLM_PYTHON"), *LITELLM_CANDIDATES]:
        if candidate and Path(candidate).is_file():
            return candidate
    raise SystemExit("LiteLLM's proxy is not installed. Give it its own virtual environment:\n"
                     "    python -m venv /tmp/litellm-venv\n"
                     "    /tmp/litellm-venv/bin/pip install 'litellm[proxy]'\n"
                     "then pass --litellm-python /tmp/litellm-venv/bin/python (or set LITELLM_PYTHON).")


def start_litellm(python: str, upstream: str, work: Path) -> tuple[Server, dict]:
    probe = ("import importlib.util as u, importlib.metadata as m; "
             "print(m.version('litellm'), bool(u.find_spec('httptools')))")
    version, httptools = subprocess.run([python, "-c", probe], capture_output=True, text=True,
                                        check=True).stdout.split()
    config = work / "litellm.yaml"
    config.write_text(json.dumps({  # JSON is YAML
        "model_list": [{"model_name": MODEL, "litellm_params": {
            "model": f"openai/{MODEL}", "api_base": upstream, "api_key": "sk-dummy"}}],
        "litellm_settings": {"set_verbose": False, "json_logs": False},
        # no keys, like arborl on loopback (LiteLLM otherwise refuses to start without a master key)
        "general_settings": {"disable_spend_logs": True, "dangerously_permit_weak_or_unset_master_key": True},
    }, indent=2))
    # quiet logs, and the bundled cost map instead of a download (its --telemetry flag is a no-op now)
    env = {"LITELLM_LOG": "ERROR", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    port = _free_port()
    litellm = str(Path(python).with_name("litellm"))
    server = Server("litellm", [litellm, "--config", str(config), "--host", "127.0.0.1", "--port", str(port),
                                "--num_workers", "1"], port, work, env)
    server.ready("/health/liveliness")
    server.ready("/v1/models")
    return server, {"version": version, "workers": 1, "command": "litellm --config ... --num_workers 1",
                    "uvicorn_http": "httptools" if httptools == "True" else "h11"}


def start_arborl(upstream: str, work: Path) -> tuple[Server, dict]:
    from importlib.metadata import version

    run_dir = work / "arborl-run"
    port = _free_port()
    server = Server("arborl", [sys.executable, "-m", "arborl.ops.cli", "serve", "--engine", "upstream",
                               "--upstream-url", upstream, "--upstream-model", MODEL, "--served-name", MODEL,
                               "--run-dir", str(run_dir), "--port", str(port)], port, work)
    server.ready("/readyz")
    return server, {"version": version("arborl"), "workers": 1, "run_dir": str(run_dir)}


def _recorded_calls(run_dir: str) -> int | None:
    path = Path(run_dir) / "store.sqlite"
    if not path.is_file():
        return None
    with closing(sqlite3.connect(path)) as db:
        return db.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


# --- measuring and reporting ---------------------------------------------------------------------


def _machine_busy() -> float:
    """CPU seconds the whole machine spent busy (all but idle and iowait), from /proc/stat."""
    ticks = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS


def _measure(pool, loader: int, servers: list[Server], server: Server, requests: int,
             concurrency: int) -> dict:
    """One round of measured requests, with the proxy's CPU time and what other processes used meanwhile."""
    pids = {loader, *(s.proc.pid for s in servers)}
    ours, machine, proxy = sum(map(_cpu_seconds, pids)), _machine_busy(), _cpu_seconds(server.proc.pid)
    run = pool.submit(load, server.port, requests, concurrency).result()
    if not run["latencies"]:
        raise SystemExit(f"every request to {server.name} failed, e.g. {run['errors'][0]} "
                         f"(log: {server.log_path})")
    run["proxy_cpu"] = _cpu_seconds(server.proc.pid) - proxy
    run["other_cpu"] = max(0.0, _machine_busy() - machine - (sum(map(_cpu_seconds, pids)) - ours))
    return run


def _summary(name: str, rounds: list[dict]) -> dict:
    lat = sorted(x for r in rounds for x in r["latencies"])
    errors = [e for r in rounds for e in r["errors"]]
    seconds, ok = sum(r["seconds"] for r in rounds), len(lat)
    cuts = statistics.quantiles(lat, n=100, method="inclusive") if ok > 1 else [lat[0]] * 99
    cpu = None if name == "direct" else sum(r["proxy_cpu"] for r in rounds) * 1e3 / ok
    return {"ok": ok, "errors": len(errors), "error_samples": sorted(set(errors))[:5], "seconds": seconds,
            "rps": ok / seconds, "p50_ms": cuts[49] * 1e3, "p99_ms": cuts[98] * 1e3,
            "mean_ms": statistics.fmean(lat) * 1e3, "proxy_cpu_ms_per_request": cpu,
            "round_rps": [len(r["latencies"]) / r["seconds"] for r in rounds],
            "other_processes_cpu_cores": sum(r["other_cpu"] for r in rounds) / seconds}


def _report(results: dict, meta: dict) -> None:
    direct = results.get("direct")
    print(f"\n### Gateway overhead: {meta['requests']} streaming chat completions, {meta['concurrency']} "
          f"concurrent clients, {meta['rounds']} interleaved rounds, instant upstream "
          f"({meta['cpus']} CPUs)\n")
    print("| target | ok | errors | p50 ms | p99 ms | added p50 ms | added p99 ms | req/s | proxy CPU ms/req "
          "| other processes' cores |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        if direct and name != "direct":
            for q in ("p50", "p99"):
                r[f"added_{q}_ms"] = r[f"{q}_ms"] - direct[f"{q}_ms"]
        added = [f"{r[k]:.2f}" if k in r else "-" for k in ("added_p50_ms", "added_p99_ms")]
        cpu = "-" if r["proxy_cpu_ms_per_request"] is None else f"{r['proxy_cpu_ms_per_request']:.2f}"
        print(f"| {name} | {r['ok']} | {r['errors']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {added[0]} | "
              f"{added[1]} | {r['rps']:.0f} | {cpu} | {r['other_processes_cpu_cores']:.2f} |")
    if "litellm" in results and "arborl" in results and direct:
        lite, arb = results["litellm"], results["arborl"]
        print("\n| figure | LiteLLM | arborl | arborl / LiteLLM | beats LiteLLM | meets the aim |")
        print("|---|---|---|---|---|---|")
        ratios = {}
        for key, label, aim in (("added_p50_ms", "added p50 ms", 0.5), ("added_p99_ms", "added p99 ms", 0.5),
                                ("rps", "req/s", 2.0)):
            ratio = arb[key] / lite[key] if lite[key] > 0 else float("inf")
            better = ratio >= 1 if key == "rps" else ratio < 1
            meets = ratio >= aim if key == "rps" else ratio <= aim
            ratios[key] = {"ratio": ratio, "beats": better, "meets_aim": meets}
            print(f"| {label} | {lite[key]:.2f} | {arb[key]:.2f} | {ratio:.2f}x | "
                  f"{'yes' if better else 'NO'} | {'yes' if meets else 'no'} (aim {aim}x) |")
        meta["arborl_vs_litellm"] = ratios
    for name, info in meta["targets"].items():
        print(f"\n{name}: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    for name, r in results.items():
        for sample in r["error_samples"]:
            print(f"{name} error: {sample}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="direct,litellm,arborl", help="comma-separated")
    parser.add_argument("--requests", type=int, default=2000, help="measured requests per target")
    parser.add_argument("--warmup", type=int, default=100, help="uncounted requests per target first")
    parser.add_argument("--concurrency", type=int, default=64, help="concurrent streaming clients")
    parser.add_argument("--rounds", type=int, default=4, help="targets take turns in rounds")
    parser.add_argument("--litellm-python", help="python of LiteLLM's own venv (or set LITELLM_PYTHON)")
    parser.add_argument("--quick", action="store_true", help="200 requests, 20 warm-up (checks the script)")
    parser.add_argument("--out", type=Path, help="JSON results (default results/proxy_overhead.json)")
    args = parser.parse_args()
    if args.quick:
        args.requests, args.warmup = 200, 20
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if unknown := set(targets) - {"direct", "litellm", "arborl"}:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    litellm_python = _litellm_python(args.litellm_python) if "litellm" in targets else None
    out = args.out or HERE / "results" / f"proxy_overhead{'.quick' if args.quick else ''}.json"
    meta = {"requests": args.requests, "warmup": args.warmup, "concurrency": args.concurrency,
            "rounds": args.rounds, "cpus": os.cpu_count(), "python": platform.python_version(), "targets": {}}
    _log(f"{os.cpu_count()} CPUs; {args.requests} requests (+{args.warmup} warm-up) per target, "
         f"{args.concurrency} concurrent streaming clients")

    began = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    up_port = _free_port()
    upstream = Server("upstream", [sys.executable, str(HERE / "instant_upstream.py"), "--port", str(up_port)],
                      up_port, work)
    upstream_url = f"http://127.0.0.1:{up_port}/v1"
    servers: dict[str, Server] = {}
    rounds: dict[str, list[dict]] = {name: [] for name in targets}
    try:
        upstream.ready("/v1/models", timeout=30)
        with ProcessPoolExecutor(1) as pool:
            loader = pool.submit(os.getpid).result()
            for name in targets:
                _log(f"{name}: starting ...")
                if name == "direct":
                    servers[name], meta["targets"][name] = upstream, {"url": upstream_url}
                elif name == "litellm":
                    servers[name], meta["targets"][name] = start_litellm(litellm_python, upstream_url, work)
                else:
                    servers[name], meta["targets"][name] = start_arborl(upstream_url, work)
                if args.warmup:
                    warm = pool.submit(load, servers[name].port, args.warmup, args.concurrency).result()
                    _log(f"{name}: warm-up {len(warm['latencies'])} ok, {len(warm['errors'])} errors")
            # interleaved rounds, so drift in the machine's load hits every target alike
            for i in range(args.rounds):
                size = args.requests // args.rounds + (i < args.requests % args.rounds)
                for name in targets:
                    rounds[name].append(_measure(pool, loader, [upstream, *servers.values()], servers[name],
                                                 size, args.concurrency))
                _log(f"round {i + 1}/{args.rounds}: " + ", ".join(
                    f"{name} {len(r[-1]['latencies'])} ok {len(r[-1]['errors'])} errors "
                    f"{len(r[-1]['latencies']) / r[-1]['seconds']:.0f} req/s" for name, r in rounds.items()))
    finally:
        for server in {upstream, *servers.values()}:
            server.stop()
    results = {name: _summary(name, rounds[name]) for name in targets}
    for name, r in results.items():
        if r["other_processes_cpu_cores"] > 0.1 and r["seconds"] >= 2:
            _log(f"warning: other processes kept {r['other_processes_cpu_cores']:.2f} cores busy while "
                 f"{name} was measured: its figures are skewed")
    if "arborl" in targets:
        info = meta["targets"]["arborl"]
        info["recorded_calls"] = _recorded_calls(info["run_dir"])
        info["expected_calls"] = args.warmup + args.requests
        if info["recorded_calls"] is None:
            _log(f"arborl: no store.sqlite in {info['run_dir']}; the recording was not checked")
        else:
            verdict = "ok" if info["recorded_calls"] == info["expected_calls"] else "MISMATCH"
            _log(f"arborl: {info['recorded_calls']} rows in calls, expected {info['expected_calls']}: "
                 f"{verdict}")
    meta["bench_seconds"] = time.perf_counter() - began
    _report(results, meta)
    print(f"\nwhole bench: {meta['bench_seconds']:.0f} s; logs in {work}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**meta, "results": results}, indent=2))
    _log(f"wrote {out}")


if __name__ == "__main__":
    main()
