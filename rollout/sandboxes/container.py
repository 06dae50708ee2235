"""What the container kinds (docker, k8s) share: the protocol's calls on top of one ``_exec``.

A container sandbox runs every command by asking its platform to exec it in the container
(``docker exec``, the API's ``pods/exec``): the kind supplies ``_exec``, ``workspace_inside``,
``kill_all``, ``start`` and ``close``; ``run``, the environment, and the copies in and out (tar
streams through ``_exec``, archive.py) are the same for both.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Self

from . import archive
from .base import Area, CommandResult, Limits, WallClocked, command_argv, sandbox_environment

CONTAINER_HOME = "/home/agent"  # HOME inside every container sandbox


class ContainerSandbox(WallClocked, ABC):
    id: str
    limits: Limits
    dir: Path  # host scratch: started processes' output, the archives of copy_in/out

    @property
    @abstractmethod
    def workspace_inside(self) -> str: ...

    @property
    def home_inside(self) -> str:
        return CONTAINER_HOME

    def env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return sandbox_environment(self.id, home=CONTAINER_HOME, tmp="/tmp", extra=extra)

    def run(
        self,
        command: str | Sequence[str],
        *,
        timeout_s: float | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | None = None,
        stdin: str | bytes | None = None,
    ) -> CommandResult:
        data = stdin.encode() if isinstance(stdin, str) else stdin
        return self._exec(command_argv(command), env=env, cwd=cwd or ".", stdin=data,
                          timeout_s=self.limits.command_s if timeout_s is None else timeout_s)

    def copy_in(self, src: Path, dest: str, *, into: Area = "workspace") -> None:
        folder = self.workspace_inside if into == "workspace" else CONTAINER_HOME
        archive.copy_in(self._run_inside, self.dir, src, dest, folder)

    def copy_out(self, src: str, dest: Path) -> None:
        archive.copy_out(self._run_inside, self.dir, src, self.workspace_inside, dest)

    def _run_inside(self, argv: list[str], stdin: IO[bytes] | None, stdout_to: IO[bytes] | None) -> CommandResult:
        """archive.py's way in: ``argv`` as the sandbox's user, within ``Limits.command_s``."""
        return self._exec(argv, env=None, cwd=".", stdin=stdin, timeout_s=self.limits.command_s, stdout_to=stdout_to)

    @abstractmethod
    def _exec(self, argv: list[str], *, env: Mapping[str, str] | None, cwd: str, stdin: bytes | IO[bytes] | None,
              timeout_s: float, stdout_to: IO[bytes] | None = None) -> CommandResult:
        """Run ``argv`` in the container as the sandbox's user, in the workspace (``cwd`` relative
        to it), under ``timeout_s``, with the sandbox's environment plus ``env``."""

    @abstractmethod
    def close(self) -> None: ...

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
