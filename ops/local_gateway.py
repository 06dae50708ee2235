"""Building the serving engine from the configuration, and running the gateway in this process.

``arborl serve`` runs the gateway in the foreground; ``arborl eval`` and ``arborl rollout``
without ``--gateway`` start one in a background thread on a free loopback port, recording into
the run's store, so a single command is enough to evaluate a model.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from arborl.gateway.settings import GatewaySettings

from .config import ArborlConfig, EmbeddedEngineConfig, SglangEngineConfig, UpstreamEngineConfig, VllmEngineConfig


@dataclass
class BuiltEngine:
    """The engine the configuration names, the model folder it loaded (None for an upstream
    without a tokenizer), a line saying where it runs, and the servers started for it (stopped
    with the gateway: ``stop``)."""

    engine: Any
    model_dir: Path | None
    where: str
    servers: list[Any] = field(default_factory=list)

    def stop(self) -> None:
        for server in self.servers:
            server.stop()


def build_engine(config: ArborlConfig, run_dir: Path) -> BuiltEngine:
    return ENGINE_BUILDERS[config.engine.kind](config.engine, run_dir)


def _embedded_engine(settings: EmbeddedEngineConfig, run_dir: Path) -> BuiltEngine:
    from arborl.gateway.engines.embedded import EmbeddedEngine  # torch: only when running a model here
    from arborl.gateway.engines.model_source import needs_preparing, resolve_model

    if needs_preparing(settings.model):
        print(f"arborl: preparing model {settings.model} once (converted into the cache; later starts "
              "skip this)...", flush=True)
    else:
        print(f"arborl: loading model {settings.model}...", flush=True)
    model_dir = resolve_model(settings.model)
    engine = EmbeddedEngine(
        model_dir,
        model_name=settings.served_name,
        device=settings.device,
        max_running=settings.max_running,
        prefill_chunk=settings.prefill_chunk,
        cache_memory_bytes=int(settings.cache_memory_gb * (1 << 30)),
    )
    return BuiltEngine(engine, model_dir, f"device {engine.device}, context {engine.context_length}")


def _upstream_engine(settings: UpstreamEngineConfig, run_dir: Path) -> BuiltEngine:
    from arborl.gateway.engines.base import TokenizerLike
    from arborl.gateway.engines.model_source import resolve_model
    from arborl.gateway.upstream import UpstreamEngine

    if not settings.upstream_url:
        raise SystemExit("arborl: the upstream engine needs --upstream-url (or engine.upstream_url)")
    model = settings.upstream_model or settings.served_name
    if not model:
        raise SystemExit("arborl: the upstream engine needs --upstream-model or --served-name")
    tokenizer: TokenizerLike | None = None
    model_dir = None
    if settings.tokenizer:
        from transformers import AutoTokenizer

        model_dir = resolve_model(settings.tokenizer)
        # cast: transformers types decode and convert_ids_to_tokens as str | list[str] whatever they are given
        tokenizer = cast(TokenizerLike, AutoTokenizer.from_pretrained(model_dir))
    engine = UpstreamEngine(
        settings.upstream_url, model=model, api=settings.upstream_api, api_key=settings.upstream_api_key,
        served_name=settings.served_name, tokenizer=tokenizer, timeout_s=settings.upstream_timeout_s,
    )
    return BuiltEngine(engine, model_dir, f"forwarding to {settings.upstream_api} upstream {settings.upstream_url}")


def _server_engine(settings: VllmEngineConfig | SglangEngineConfig, run_dir: Path) -> BuiltEngine:
    """``vllm`` or ``sglang``: one engine per server, behind a router when there are several."""
    from arborl.gateway.engines.model_source import resolve_model
    from arborl.gateway.engines.replica_router import ReplicaRouter
    from arborl.gateway.engines.sglang_server import SglangEngine
    from arborl.gateway.engines.vllm_server import VllmEngine

    from .engine_servers import launch_servers, loopback_port

    model_dir = resolve_model(settings.model)
    urls = settings.urls
    servers: list[Any] = []
    if settings.launch:
        if len(urls) != 1:
            raise SystemExit("arborl: engine.launch starts engine.replicas servers from one engine.url; "
                             f"it has {len(urls)}")
        try:
            loopback_port(urls[0])
            print(f"arborl: starting {settings.replicas} {settings.kind} server(s) for {model_dir.name} from "
                  f"{urls[0]} (logs in {run_dir})...", flush=True)
            servers = launch_servers(settings, model_dir, run_dir)
        except (FileNotFoundError, ValueError, RuntimeError) as exc:
            raise SystemExit(f"arborl: {exc}") from None
        urls = [server.url for server in servers]
    elif settings.replicas not in (1, len(urls)):
        raise SystemExit(f"arborl: engine.replicas is {settings.replicas} but engine.url names {len(urls)} server(s)")
    kind = {"vllm": VllmEngine, "sglang": SglangEngine}[settings.kind]
    engines = [kind(url, model_dir, model_name=settings.served_name, max_running=settings.max_running,
                    timeout_s=settings.timeout_s) for url in urls]
    if len(engines) == 1:
        return BuiltEngine(engines[0], model_dir, f"{settings.kind} server {urls[0]}", servers)
    router = ReplicaRouter(engines, names=urls, routing=settings.routing, publish=settings.publish)
    return BuiltEngine(router, model_dir, f"{len(urls)} {settings.kind} servers ({settings.routing} routing)", servers)


# How each engine kind of the configuration (ops/config.py: ENGINE_KINDS) is built.
ENGINE_BUILDERS: dict[str, Callable[[Any, Path], BuiltEngine]] = {
    "embedded": _embedded_engine,
    "upstream": _upstream_engine,
    "vllm": _server_engine,
    "sglang": _server_engine,
}


def write_run_info(run_dir: Path, engine: Any, model_dir: Path | None) -> None:
    """run.json: which model the run serves (the learner and `arborl trie` read it)."""
    (run_dir / "run.json").write_text(json.dumps({"model_dir": str(model_dir) if model_dir else None,
                                                  "model": engine.model_name}))


def open_run_store(config: ArborlConfig, run_dir: Path) -> Any:
    """The run's store (``store.url``, else ``run_dir``'s SQLite file); a store that cannot be
    opened (a database that does not answer, a newer layout) ends the command with its message."""
    from arborl.rollout.store import open_store

    try:
        return open_store(config.store.url, run_dir, synchronous=config.store.synchronous)
    except RuntimeError as exc:
        raise SystemExit(f"arborl: {exc}") from None


def restore_served_version(engine: Any, store: Any) -> int:
    """Serve the run's last committed version, not the base weights, when a gateway (re)starts on
    a run the learner has trained: rollouts sampled after a gateway restart stay on-policy. Returns
    the version served."""
    from arborl.gateway.engines.base import FromPath
    from arborl.rollout.store import RunLedger

    last = RunLedger(store).last_step()
    if last is None or FromPath not in engine.weight_updates or not Path(last.checkpoint).exists():
        return 0
    import asyncio

    asyncio.run(engine.load_weights(FromPath(Path(last.checkpoint), last.version)))
    print(f"arborl: serving version {last.version} (the run's last committed step)", flush=True)
    return last.version


def free_loopback_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerThread:
    """uvicorn serving an ASGI app from a background thread, on a loopback port (a free one by
    default). ``with ServerThread(app) as url:`` serves for the block."""

    def __init__(self, app: Any, port: int | None = None, settings: GatewaySettings | None = None):
        import uvicorn

        from .http_server import server_config

        self.port = port or free_loopback_port()
        config = server_config(app, settings or GatewaySettings(), host="127.0.0.1", port=self.port,
                               log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="gateway", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120.0) -> str:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start")
            time.sleep(0.02)
        return self.url

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class LocalGateway:
    """A gateway served from a background thread of this process."""

    url: str
    engine: Any
    store: Any  # the run's TrajectoryStore: the orchestrator writes its ledger into the same one
    server: ServerThread
    built: BuiltEngine

    def stop(self) -> None:
        self.server.stop()
        self.built.stop()


def start_local_gateway(config: ArborlConfig, run_dir: Path, *, port: int | None = None) -> LocalGateway:
    """The configured engine served on loopback, on ``port`` (default: a free one)."""
    from arborl.gateway.app import create_app

    run_dir.mkdir(parents=True, exist_ok=True)
    built = build_engine(config, run_dir)
    engine, model_dir, where = built.engine, built.model_dir, built.where
    store = open_run_store(config, run_dir)
    write_run_info(run_dir, engine, model_dir)
    restore_served_version(engine, store)
    # The command's own progress lines are what its user reads: no line per model call.
    logging.getLogger("arborl.access").setLevel(logging.WARNING)
    server = ServerThread(create_app(engine, store, config.gateway), port=port, settings=config.gateway)
    try:
        url = server.start()
    except RuntimeError:
        built.stop()
        raise SystemExit("arborl: the gateway did not start") from None
    print(f"arborl: serving {engine.model_name!r} on {url}/v1 ({where}); recording into {store.location}",
          flush=True)
    return LocalGateway(url, engine, store, server, built)
