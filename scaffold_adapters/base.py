"""What arborl knows about an agent scaffold (DESIGN section 7).

An adapter is pure knowledge, no I/O beyond writing files it is asked to write: the
configuration that points the scaffold at a gateway, the command that runs one task headless,
and which of its calls are auxiliary (title generation, small-model side calls) so the
gateway records them in their own roots, out of the training data.
"""

from __future__ import annotations

import shlex
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

Dialect = Literal["chat", "responses", "messages", "gemini"]


class CommandOutcome(Protocol):
    """What running a command in a sandbox returns, as agents and verifiers read it (the sandbox's
    frozen ``CommandResult``, or a plain record of a local run). Read-only members, so that frozen
    dataclasses satisfy it."""

    @property
    def exit_code(self) -> int | None: ...  # None: the command was stopped (at its timeout)
    @property
    def stdout(self) -> str: ...
    @property
    def stderr(self) -> str: ...
    @property
    def timed_out(self) -> bool: ...


@dataclass(frozen=True)
class GatewayTarget:
    """Where the scaffold should send its calls.

    ``url`` is the gateway's root (``http://127.0.0.1:8000``, no ``/v1``). With a
    ``session_id`` every call goes through ``/s/{session_id}``, so the gateway files them under
    that session whatever the scaffold sends (how the orchestrator keeps rollouts apart).
    """

    url: str
    api_key: str
    model: str
    session_id: str | None = None

    @property
    def root(self) -> str:
        base = self.url.rstrip("/")
        return f"{base}/s/{self.session_id}" if self.session_id else base

    @property
    def openai_base_url(self) -> str:
        return self.root + "/v1"


@dataclass
class ScaffoldSetup:
    """Environment variables and files (paths relative to the scaffold's HOME) it needs."""

    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # advice printed by `arborl connect`

    def write(self, home: Path) -> list[Path]:
        written = []
        for relative, text in self.files.items():
            path = home / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            written.append(path)
        return written

    def shell_exports(self) -> str:
        return "\n".join(f"export {name}={shlex.quote(value)}" for name, value in self.env.items())


# Why a call was made. Only "main" and "subagent" calls are the policy acting in its task;
# the others are bookkeeping the scaffold asks the model for and never training samples.
Purpose = Literal["main", "subagent", "title", "side"]
TRAINABLE_PURPOSES: frozenset[str] = frozenset({"main", "subagent"})


@dataclass(frozen=True)
class CallPurpose:
    kind: Purpose
    branch: str | None = None  # the sub-trie it goes to, e.g. "title" or "agent-<id>"; None: the main trie


MAIN = CallPurpose("main")


class ScaffoldAdapter(ABC):
    name: str  # as `arborl connect NAME` spells it
    executable: str  # the CLI's command
    npm_package: str | None = None
    pypi_package: str | None = None
    tested_version: str | None = None  # the version the e2e tests run (.ci/run installs exactly this)
    # How the scaffold names its session to the gateway; None: it does not, so without a session
    # in its base URL every run would share one anonymous session (`arborl connect` gives each
    # configuration it prints a session of its own).
    names_its_session: str | None = None
    dialect: Dialect
    # The per-process memory limit (the sandbox's RLIMIT_DATA, MiB) below which the CLI cannot
    # start: a runtime that reserves address space it never touches (each V8 isolate of a Node
    # program with worker threads reserves hundreds of MiB) needs more than it uses. None: the
    # rollout settings' limit is enough.
    min_memory_mb: int | None = None

    @property
    def install_hint(self) -> str | None:
        """The command that installs the tested version."""
        if self.npm_package:
            return f"npm install -g {self.npm_package}@{self.tested_version}"
        if self.pypi_package:
            return f"pip install {self.pypi_package}=={self.tested_version}"
        return None

    @abstractmethod
    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        """The configuration that points this scaffold at ``target``."""

    @abstractmethod
    def command(self, task: str) -> list[str]:
        """argv that runs ``task`` headless in the current directory, tools auto-approved."""

    def call_purpose(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> CallPurpose | None:
        """This scaffold's auxiliary calls; None when the call is not recognisably this scaffold's."""
        return None
