"""Shared fixtures: the tiny random model and a real gateway served on loopback."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from arborl.gateway.app import create_app
from arborl.gateway.engines.embedded import EmbeddedEngine
from arborl.gateway.engines.model_source import TINY_MODEL, resolve_model
from arborl.gateway.settings import GatewaySettings
from arborl.ops.local_gateway import ServerThread, free_loopback_port
from arborl.rollout.store import PostgresTrajectoryStore, SqliteTrajectoryStore, TrajectoryStore


def pytest_collection_modifyitems(config, items):
    import shutil

    import torch

    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        cli = item.get_closest_marker("e2e")
        if cli and cli.args and shutil.which(cli.args[0]) is None:
            item.add_marker(pytest.mark.skip(reason=f"{cli.args[0]} is not installed"))


@pytest.fixture
def run_root() -> Iterator[Path]:
    """A folder rollout sandboxes' uids can cross (pytest's tmp_path sits under a 0700 folder)."""
    root = Path(tempfile.mkdtemp(prefix="arborl-run-"))
    os.chmod(root, 0o711)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    return resolve_model(TINY_MODEL)


@pytest.fixture
def tiny_model(tiny_model_dir: Path):
    """The tiny model as a float32 transformers model, for computing what an engine would record."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


free_port = free_loopback_port  # tests name it so


@dataclass
class LiveGateway:
    url: str
    store: TrajectoryStore
    engine: EmbeddedEngine
    app: object
    run_dir: Path

    @property
    def v1(self) -> str:
        return self.url + "/v1"

    def metrics(self) -> dict[str, float]:
        import httpx
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics").text
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        return out


def start_gateway(model_dir: Path, run_dir: Path, **settings) -> tuple[ServerThread, LiveGateway]:
    engine = EmbeddedEngine(model_dir, model_name="tiny")
    store = SqliteTrajectoryStore(run_dir / "store.sqlite")
    gateway_settings = GatewaySettings(**settings)
    app = create_app(engine, store, gateway_settings)
    server = ServerThread(app, settings=gateway_settings)
    return server, LiveGateway("", store, engine, app, run_dir)


def serve_live(model_dir: Path, run_dir: Path, **settings) -> Iterator[LiveGateway]:
    server, live = start_gateway(model_dir, run_dir, **settings)
    with server as url:
        live.url = url
        yield live
    live.store.close()


@pytest.fixture
def gateway(tiny_model_dir: Path, tmp_path: Path) -> Iterator[LiveGateway]:
    yield from serve_live(tiny_model_dir, tmp_path)


@pytest.fixture(scope="session")
def tool_model_dir(tiny_model_dir: Path, tmp_path_factory) -> Path:
    from tool_caller import train_tool_caller

    return train_tool_caller(tiny_model_dir, tmp_path_factory.mktemp("tool-caller"))


@pytest.fixture
def tool_gateway(tool_model_dir: Path, tmp_path: Path) -> Iterator[LiveGateway]:
    yield from serve_live(tool_model_dir, tmp_path)


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory) -> Iterator[str]:
    """The DSN of a real PostgreSQL server: CI's (``ARBORL_TEST_POSTGRES_DSN``, started by .ci/run),
    else one started here for the session. Without PostgreSQL installed the tests that need it
    skip, unless ``ARBORL_REQUIRE_POSTGRES=1`` (CI) makes that a failure."""
    import postgres_server as server

    dsn = os.environ.get(server.DSN_VARIABLE)
    if dsn:
        yield dsn
        return
    if server.binary("initdb") is None:
        if os.environ.get("ARBORL_REQUIRE_POSTGRES") == "1":
            pytest.fail("PostgreSQL is required here (ARBORL_REQUIRE_POSTGRES=1) but not installed")
        pytest.skip("PostgreSQL is not installed (ops/bootstrap.sh installs it)")
    folder = Path(tempfile.mkdtemp(prefix="arborl-pg-"))
    try:
        yield server.start(folder)
    finally:
        server.stop(folder)


@pytest.fixture
def postgres_dsn(postgres_server: str) -> str:
    """A DSN of a new, empty database on the test server (one per test)."""
    import uuid

    import psycopg

    name = "t_" + uuid.uuid4().hex[:16]
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(params=["sqlite", "postgres"])
def open_store(request, tmp_path) -> Iterator[Callable[[], TrajectoryStore]]:
    """Opens (or reopens, as a restarted or a second process would) one store of the
    implementation under test: SQLite, or a fresh database on a real PostgreSQL server."""
    opened: list[TrajectoryStore] = []
    if request.param == "sqlite":
        def make() -> TrajectoryStore:
            opened.append(SqliteTrajectoryStore(tmp_path / "store.sqlite"))
            return opened[-1]
    else:
        dsn = request.getfixturevalue("postgres_dsn")

        def make() -> TrajectoryStore:
            opened.append(PostgresTrajectoryStore(dsn))
            return opened[-1]
    yield make
    for store in opened:
        try:
            store.close()
        except Exception:  # noqa: BLE001 - closed by the test already
            pass


@pytest.fixture(scope="session")
def vllm_tiny64(tmp_path_factory, tiny_model_dir: Path) -> Iterator[tuple[str, Path]]:
    """(URL, model folder) of one real vLLM server for the session, serving the tiny 64-dim Llama;
    skipped, saying how to install vLLM, where it is not installed (tests/vllm_server.py)."""
    import vllm_server

    from arborl.ops.engine_servers import VllmServer

    python = vllm_server.vllm_python()
    if python is None:
        pytest.skip(f"vLLM is not installed here (ARBORL_VLLM_PYTHON); install it with: {vllm_server.INSTALL}")
    work = tmp_path_factory.mktemp("vllm")
    model = vllm_server.build_model(work / "tiny64", tiny_model_dir)
    server = VllmServer(python, model, free_port(), work / "server.log", max_num_seqs=8, dtype="float32",
                        max_model_len=2048)
    server.start()
    try:
        yield server.url, model
    finally:
        server.stop()


@pytest.fixture(scope="session")
def sglang_default(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """(URL, model folder) of one real SGLang server on a GPU, serving the default model; skipped
    where SGLang is not installed (``ARBORL_SGLANG_PYTHON``) or there is no GPU."""
    import torch

    from arborl.gateway.engines.model_source import DEFAULT_MODEL
    from arborl.ops.engine_servers import DEFAULT_SGLANG_PYTHON, SglangServer

    python = os.environ.get("ARBORL_SGLANG_PYTHON", DEFAULT_SGLANG_PYTHON)
    if not torch.cuda.is_available() or not Path(python).is_file():
        pytest.skip("SGLang needs a GPU and its own venv (ARBORL_SGLANG_PYTHON; see the README)")
    model = resolve_model(DEFAULT_MODEL)
    server = SglangServer(python, model, free_port(), tmp_path_factory.mktemp("sglang") / "server.log",
                          max_num_seqs=8, gpu_memory_fraction=0.3)
    server.start()
    try:
        yield server.url, model
    finally:
        server.stop()
