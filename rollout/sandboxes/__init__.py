"""Sandboxes for rollouts: the protocol (base.py) and its kinds, chosen by name.

| kind | module | where commands run |
| --- | --- | --- |
| ``local`` | process.py | processes on this machine, as a leased uid, under rlimits |
| ``bwrap`` | bwrap.py | the same, each command inside bubblewrap namespaces |
| ``docker`` | docker.py | a container per sandbox, through the docker CLI |
| ``k8s`` | k8s.py (k8s_pod.py) | a pod per sandbox, through the Kubernetes API |

The container kinds share container.py (run, the environment, copies in and out over one exec).

Callers hold a ``Sandbox`` (the protocol) and never ask which kind it is.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, get_args

from .base import (
    DEFAULT_LIMITS,
    SYSTEM_PATH,
    CommandResult,
    Limits,
    Sandbox,
    SandboxClosed,
    SandboxError,
    SandboxExpired,
    SandboxKind,
    SandboxProcess,
    SandboxUnavailable,
)
from .bwrap import BwrapSandbox, bwrap_unavailable_reason
from .docker import DockerSandbox, docker_unavailable_reason
from .k8s_pod import PodOptions
from .process import LocalSandbox, ProcessSandbox

SANDBOX_KINDS: tuple[str, ...] = get_args(SandboxKind)


def k8s_unavailable_reason() -> str | None:
    """None when kubectl's configuration reaches a Kubernetes cluster from here, else why not."""
    try:
        from .k8s import cluster_unavailable_reason
    except ImportError as exc:
        return f"the kubernetes client is not installed: {exc}"
    return cluster_unavailable_reason()


def make_sandbox(
    kind: SandboxKind,
    root: Path,
    *,
    name: str,
    limits: Limits = DEFAULT_LIMITS,
    source: Path | None = None,
    keep: bool = False,
    move_source: bool = False,
    expose: Sequence[Path] = (),
    workspace_at: str | None = None,
    image: str | None = None,
    network: str = "host",
    docker_cli: str = "docker",
    pod: PodOptions | None = None,
    configuration: Any = None,
) -> Sandbox:
    """A fresh sandbox of ``kind``, its workspace seeded with a copy of the host folder ``source``
    (``move_source``: the caller gives the folder up, and a process sandbox on its filesystem
    renames it into place instead of copying it).
    ``root``: the host folder a process sandbox keeps its scratch folder in (a container's own
    scratch files). ``expose``: host paths a ``bwrap`` sandbox sees read-only (a ``local`` one
    sees them anyway). ``workspace_at``: where the commands find the workspace (default
    /workspace), the folder a task takes as its working directory (Harbor's /app). A ``local``
    sandbox cannot move it: its ``workspace_inside`` is the host folder, and a task's text that
    names ``workspace_at`` must be rewritten to that (``Task.instruction_in``). ``image`` and
    ``network``: the container image and docker network of a ``docker`` sandbox (which sees no
    host path: ``expose`` does not apply; the image holds the toolchain), driven by ``docker_cli``
    (docker, or podman: the same command lines). ``pod``: a ``k8s``
    sandbox's pod (``rollout.k8s``); ``configuration``: its Kubernetes client's (default: as
    kubectl finds the cluster)."""
    if kind == "local":
        return LocalSandbox(root, name=name, limits=limits, source=source, keep=keep, move_source=move_source)
    if kind == "bwrap":
        return BwrapSandbox(root, name=name, limits=limits, source=source, keep=keep, move_source=move_source,
                            expose=expose, workspace_at=workspace_at)
    if kind == "docker":
        return DockerSandbox(root, name=name, image=image or "", limits=limits, source=source, keep=keep,
                             workspace_at=workspace_at, network=network, docker=docker_cli)
    if kind == "k8s":
        from .k8s import K8sSandbox  # the kubernetes client loads only for the kind that needs it

        return K8sSandbox(root, name=name, options=pod or PodOptions(), limits=limits, source=source, keep=keep,
                          workspace_at=workspace_at, configuration=configuration)
    raise SandboxError(f"unknown sandbox kind {kind!r}; known: {', '.join(SANDBOX_KINDS)}")


__all__ = [
    "SANDBOX_KINDS",
    "SYSTEM_PATH",
    "BwrapSandbox",
    "CommandResult",
    "DockerSandbox",
    "Limits",
    "PodOptions",
    "LocalSandbox",
    "ProcessSandbox",
    "Sandbox",
    "SandboxClosed",
    "SandboxError",
    "SandboxExpired",
    "SandboxKind",
    "SandboxProcess",
    "SandboxUnavailable",
    "bwrap_unavailable_reason",
    "docker_unavailable_reason",
    "k8s_unavailable_reason",
    "make_sandbox",
]
