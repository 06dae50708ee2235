"""What the e2e tests of the real agent CLIs share: a scripted gateway, and running a CLI safely.

Each CLI runs in its own process group with stdin closed (several read a piped stdin to its end
and append it to the task), and the whole group is killed afterwards: CLIs that are a node
launcher in front of a native binary, or that start helper daemons, would otherwise leave
processes behind.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from arborl.gateway.app import create_app
from arborl.gateway.settings import GatewaySettings
from arborl.rollout.store import SqliteTrajectoryStore, TrajectoryStore
from conftest import ServerThread
from scripted_engine import Script, ScriptedEngine

CLI_TIMEOUT_S = 120


class RecordHeaders:
    """The app, remembering each model request's headers (the store keeps bodies, not headers)."""

    def __init__(self, app):
        self.app = app
        self.headers: list[dict[str, str]] = []

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["method"] == "POST":
            self.headers.append({k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]})
        await self.app(scope, receive, send)


@dataclass
class ScriptedGateway:
    url: str
    store: TrajectoryStore
    app: RecordHeaders
    work: Path  # the agent's working directory
    home: Path  # the agent's HOME, where its adapter's files go


SCRIPTED_ADMIN_TOKEN = "scripted-gateway-admin"  # rollouts against it (--gateway) ask its admin API


@contextlib.contextmanager
def scripted_gateway(model_dir: Path, tmp_path: Path, script: Script, *, first_token_delay_s: float = 0.0,
                     stream_keepalive_s: float = 5.0) -> Iterator[ScriptedGateway]:
    """A live gateway whose policy is ``script``, recording into a fresh store (the test closes it);
    ``first_token_delay_s`` plays a long prefill before every reply."""
    from transformers import AutoTokenizer

    engine = ScriptedEngine(AutoTokenizer.from_pretrained(model_dir), script, first_token_delay_s=first_token_delay_s)
    store = SqliteTrajectoryStore(tmp_path / "run" / "store.sqlite")
    work, home = tmp_path / "work", tmp_path / "home"
    for folder in (work, home):
        folder.mkdir()
    settings = GatewaySettings(tool_parser="hermes", stream_keepalive_s=stream_keepalive_s,
                               admin_token=SCRIPTED_ADMIN_TOKEN)
    app = RecordHeaders(create_app(engine, store, settings))
    with ServerThread(app, settings=settings) as url:
        yield ScriptedGateway(url, store, app, work, home)


def run_cli(command: list[str], *, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run an agent CLI headless; fail the test with its output if it does not finish in time."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{command[0]} did not finish in {CLI_TIMEOUT_S}s:\n{stdout}\n{stderr}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)
