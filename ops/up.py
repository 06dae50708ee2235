"""``arborl up``: the whole online RL loop on one machine, as a supervised process tree.

    arborl up                          gateway + rollout workers + learner, recording into runs/default

The supervisor (this process) starts three children, each an ordinary ``arborl`` command on the
same run folder and the same configuration (written to ``RUN/config.yaml``):

- ``gateway``: ``arborl serve``, the embedded engine on ``gateway.host:port``; external agents
  may use it too, and are recorded like any session;
- ``rollouts``: ``arborl rollout --gateway URL``: the builtin agent on the dataset's train split,
  groups of ``rollout.group_size``, for ever;
- ``learner``: ``arborl train --gateway URL --resume``: trains on complete groups and publishes
  each version into the gateway.

and, every ``up.heldout_every`` committed steps, a held-out evaluation (``arborl eval`` on the
held-out split, never trained on) whose pass rate is recorded per policy version in
``RUN/heldout/v{version}/``.

A child that dies is restarted (at most ``up.max_restarts`` times each, with a growing pause),
and since every child resumes from the run folder, a ``kill -9`` loses nothing: the ledger marks
which groups each committed step consumed and which rollouts finished. Ctrl-C stops the rollouts
and the learner (their unfinished work is redone on the next start), then the gateway; running
``arborl up`` again resumes the same run. Each child's output goes to ``RUN/logs/<name>.log``.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import httpx
import yaml

from .config import ArborlConfig

RESTART_PAUSE_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STOP_GRACE_S = 30.0


@dataclass
class Child:
    """One supervised command."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen | None = None
    restarts: int = 0

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child holds it for its life
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} arborl up starts {self.name}\n".encode())
        log.flush()
        # Its own session, so Ctrl-C reaches only the supervisor, which stops the children in
        # order. A child stops by itself when the supervisor dies outright (cli.main watches
        # its parent when ARBORL_SUPERVISOR_PID is set).
        self.process = subprocess.Popen(self.argv, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return self.process.returncode if self.process is not None else None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def stop(self, sig: int = signal.SIGINT, grace_s: float = STOP_GRACE_S) -> None:
        """Ask the child to stop (``sig``), wait, then kill its whole process group."""
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        except ProcessLookupError:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


class Part(Protocol):
    """What the supervisor starts, watches and stops: a ``Child`` here, a ``RayPart`` on Ray."""

    name: str
    log_path: Path
    restarts: int

    @property
    def running(self) -> bool: ...

    @property
    def returncode(self) -> int | None: ...

    @property
    def pid(self) -> int | None: ...

    def start(self) -> None: ...

    def stop(self, sig: int = signal.SIGINT, grace_s: float = STOP_GRACE_S) -> None: ...


class Supervisor:
    def __init__(self, config: ArborlConfig, *, python: str = sys.executable):
        self.config = config
        self.run_dir = config.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.python = python
        self.admin_token = self._admin_token()
        gateway = config.gateway
        self.url = f"http://{'127.0.0.1' if gateway.host in ('0.0.0.0', '::') else gateway.host}:{gateway.port}"
        self.config_path = self.run_dir / "config.yaml"
        # The store URL may hold a database password: the children get it in their environment,
        # never from a file in the run folder.
        dumped = config.model_dump(mode="json")
        dumped["store"]["url"] = ""
        self.config_path.write_text(yaml.safe_dump(dumped, sort_keys=False))
        self.children: dict[str, Part] = {}
        self.heldout: Part | None = None
        self.heldout_versions: list[int] = []
        self.events: list[str] = []  # what the live view shows under the table

    def _admin_token(self) -> str:
        """The run's admin token: kept in RUN/admin_token (mode 0600), made on the first start."""
        if self.config.gateway.admin_token:
            return self.config.gateway.admin_token
        path = self.run_dir / "admin_token"
        if not path.is_file():
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32))
        return path.read_text().strip()

    # -- the children ---------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {**os.environ, "ARBORL_GATEWAY__ADMIN_TOKEN": self.admin_token, "ARBORL_ADMIN_TOKEN": self.admin_token,
               "ARBORL_SUPERVISOR_PID": str(os.getpid())}
        if self.config.store.url:
            env["ARBORL_STORE__URL"] = self.config.store.url
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def _child(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> Part:
        """One part, as a child process of this machine (``RaySupervisor``: a Ray actor's)."""
        return Child(name, argv, env, log_path)

    def _command(self, *args: str) -> list[str]:
        return [self.python, "-m", "arborl.ops.cli", *args]

    def plan(self) -> list[Part]:
        up, logs, run = self.config.up, self.run_dir / "logs", str(self.run_dir)
        children = [self._child("gateway", self._command("serve", "--config", str(self.config_path)), self._env(),
                                logs / "gateway.log")]
        if up.rollouts:
            argv = self._command(
                "rollout", "--config", str(self.config_path), "--gateway", self.url, "--run-dir", run,
                "--dataset", up.dataset, "--split", up.train_split, "--metrics-port", str(up.rollout_metrics_port),
                "--scaffold", ",".join(f"{name}:{weight:g}" for name, weight in self.config.rollout.scaffolds.items()),
            )
            if up.train_difficulty:
                argv += ["--difficulty", ",".join(up.train_difficulty)]
            children.append(self._child("rollouts", argv, self._env(), logs / "rollouts.log"))
        if up.learner:
            children.append(self._child("learner", self._command(
                "train", "--config", str(self.config_path), "--run-dir", run, "--gateway", self.url, "--resume",
                "--metrics-port", str(up.learner_metrics_port),
            ), self._env(), logs / "learner.log"))
        return children

    def start(self) -> None:
        for child in self.plan():
            self.children[child.name] = child
            child.start()
            if child.name == "gateway":
                self.wait_for_gateway(child)
        self.write_state()
        self.events.append(f"started {', '.join(self.children)}")

    def write_state(self) -> None:
        """RUN/up.json: the supervisor's and children's pids and the gateway URL, for operators."""
        state = {"supervisor": os.getpid(), "url": self.url,
                 "children": {name: child.pid for name, child in self.children.items() if child.pid is not None}}
        (self.run_dir / "up.json").write_text(json.dumps(state))

    def wait_for_gateway(self, child: Part, timeout_s: float = 600.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not child.running:
                raise SupervisorError(f"the gateway exited ({child.returncode}); see {child.log_path}")
            if self.gateway_healthy():
                return
            time.sleep(0.25)
        raise SupervisorError(f"the gateway did not answer on {self.url} within {timeout_s:.0f} s")

    def gateway_healthy(self) -> bool:
        try:
            return httpx.get(self.url + "/healthz", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    def check(self) -> None:
        """Restart what died (the gateway first, then waiting for it), start a due held-out run."""
        for child in self.children.values():
            if child.running:
                continue
            code = child.returncode
            if child.restarts >= self.config.up.max_restarts:
                raise SupervisorError(f"{child.name} exited {code} after {child.restarts} restarts; "
                                      f"see {child.log_path}")
            pause = RESTART_PAUSE_S[min(child.restarts, len(RESTART_PAUSE_S) - 1)]
            self.events.append(f"{child.name} exited ({code}); restarting in {pause:g} s")
            time.sleep(pause)
            child.restarts += 1
            child.start()
            self.write_state()
            if child.name == "gateway":
                self.wait_for_gateway(child)
        self._heldout_if_due()

    # -- held-out evaluation --------------------------------------------------------------------

    def _heldout_if_due(self, version: int | None = None) -> None:
        up = self.config.up
        if not up.heldout_every or (self.heldout is not None and self.heldout.running):
            return
        if version is None:
            version = self.committed_version()
        due = version == 0 or version % up.heldout_every == 0
        if not due or version in self.heldout_versions or self._heldout_done(version):
            return
        self.heldout_versions.append(version)
        argv = self._command(
            "eval", "--config", str(self.config_path), "--gateway", self.url, "--run-dir", str(self.run_dir),
            "--dataset", up.dataset, "--split", up.heldout_split, "--scaffold", "builtin", "--k", str(up.heldout_k),
            "--prefix", f"heldout/v{version}", "--report-dir", str(self.heldout_dir(version)),
        )
        if up.heldout_limit:
            argv += ["--limit", str(up.heldout_limit)]
        # a one-off job: not in self.children, so never restarted
        self.heldout = self._child(f"heldout-v{version}", argv, self._env(), self.run_dir / "logs" / "heldout.log")
        self.heldout.start()
        self.events.append(f"held-out evaluation of version {version} started")

    def heldout_dir(self, version: int) -> Path:
        return self.run_dir / "heldout" / f"v{version}"

    def _heldout_done(self, version: int) -> bool:
        return (self.heldout_dir(version) / "results.json").is_file()

    def committed_version(self) -> int:
        """The learner's last committed version, read without a write lock (called every second)."""
        from arborl.rollout.store import StoreReadError, open_read_model

        with open_read_model(self.run_dir, store_url=self.config.store.url) as store:
            try:
                return store.latest_trained_version()
            except StoreReadError:  # busy: read as before any step, as the next call reads again
                return 0

    # -- stopping -------------------------------------------------------------------------------

    def stop(self) -> None:
        """Rollouts and the held-out run first (they mark unfinished rollouts), the learner
        (between steps, or killed: its step is simply redone), the gateway last."""
        order = [self.heldout, self.children.get("rollouts"), self.children.get("learner"),
                 self.children.get("gateway")]
        for child in order:
            if child is not None:
                child.stop()


class SupervisorError(RuntimeError):
    """A child cannot be kept running."""


def run_up(config: ArborlConfig, *, max_seconds: float | None = None, refresh_s: float = 1.0) -> None:
    from .live_view import LiveView

    logging.getLogger("httpx").setLevel(logging.WARNING)  # the view polls /metrics every second
    supervisor: Supervisor
    if config.up.ray_address:
        from .ray_placement import RaySupervisor

        supervisor = RaySupervisor(config)
    else:
        supervisor = Supervisor(config)
    print(f"arborl up: run folder {config.run_dir}; logs in {config.run_dir / 'logs'}", flush=True)
    view = LiveView(supervisor)
    started = time.monotonic()
    try:
        supervisor.start()
        print(f"arborl up: gateway on {supervisor.url}/v1 (point any agent at it: `arborl connect claude-code`)",
              flush=True)
        with view:
            while max_seconds is None or time.monotonic() - started < max_seconds:
                supervisor.check()
                view.refresh()
                time.sleep(refresh_s)
    except KeyboardInterrupt:
        print("\narborl up: stopping (run `arborl up` again to resume this run)...", flush=True)
    except SupervisorError as exc:
        print(f"arborl up: {exc}", flush=True)
        raise SystemExit(1) from None
    finally:
        supervisor.stop()
    print("arborl up: stopped", flush=True)
