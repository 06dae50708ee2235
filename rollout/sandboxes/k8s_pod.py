"""What a ``k8s`` sandbox sends the Kubernetes API, pure (no client, no cluster): the pod's
manifest, the exec command line, the stdin preamble that carries a command's environment, and
how an exec's status becomes an exit code. k8s.py does the talking.

Why the environment travels on stdin: an exec request has no environment field, and its command
is the request's query string, which the API server writes to its audit log. A variable's value
(the gateway's API key) must not be there, so every exec runs ``sh -c LAUNCHER`` and the first
bytes of its stdin are an 8-digit length and a shell line, built here with every value quoted,
that changes to the working folder and execs the command under ``env -i`` with exactly the
sandbox's environment. The command's own stdin is what follows, exactly ``stdin_bytes`` of it
(``head -c``), else /dev/null: the command sees its end of input without the exec closing its
stdin channel, which the v4 exec protocol cannot do.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from .base import Limits, SandboxError, relative_path
from .container import CONTAINER_HOME

POD_WORKSPACE = "/workspace"
POD_HOME = CONTAINER_HOME
CONTAINER = "sandbox"
LABEL = "arborl.io/sandbox"  # every sandbox pod carries it (its value: the sandbox's id)
# A sandbox pod outlives its wall limit by this much at most: the kubelet ends it even when the
# rollout worker that made it died without deleting it.
DEADLINE_MARGIN_S = 120
# Reads the preamble: its length (8 decimal digits), then the line, which it evaluates.
LAUNCHER = 'n=$(head -c 8) && eval "$(head -c "$n")"'
# pid 1 of the pod's container: bash reaps the orphans a killed command leaves (its SIGCHLD
# handler waits for any child) and ``kill -KILL -1`` from an exec cannot reach it (the pid
# namespace's init); the sleep it waits on may be killed, the loop starts another.
IDLE_SCRIPT = "trap 'exit 0' TERM; while :; do sleep 3600 & wait $!; done"


class PodOptions(BaseModel):
    """``rollout.k8s``: where and how a ``k8s`` sandbox's pod runs."""

    model_config = ConfigDict(extra="forbid")

    # The image of every sandbox pod: bash, coreutils (head, timeout, tar) and the scaffolds the
    # run uses. Required.
    image: str = ""
    # The namespace the pods are made in; None: the rollout worker's own (in a pod), else "default".
    namespace: str | None = None
    runtime_class: str | None = None  # e.g. gvisor or kata: a stronger boundary than the default runtime
    cpu: str = "1"  # requested and limited per sandbox pod
    node_selector: dict[str, str] = Field(default_factory=dict)
    image_pull_policy: str = "IfNotPresent"
    start_timeout_s: float = 300.0  # until the pod runs (an image pull included)
    uid: int = 1000  # the user every command runs as (never root)


@dataclass(frozen=True)
class PodSpec:
    """One sandbox's pod: its manifest and its exec command lines."""

    pod: str
    sandbox_id: str
    namespace: str
    options: PodOptions
    limits: Limits
    workspace_at: str = POD_WORKSPACE
    owner: Mapping[str, str] | None = None  # {"name", "uid"} of the rollout worker's pod, if it runs in one

    def manifest(self) -> dict[str, Any]:
        """The pod, as the API's JSON: no service-account token, no service links, no
        privilege, memory for the whole pod, a deadline past the wall limit."""
        memory = f"{self.limits.memory_mb}Mi"
        uid = self.options.uid
        metadata: dict[str, Any] = {"name": self.pod, "namespace": self.namespace,
                                    "labels": {LABEL: self.sandbox_id, "app.kubernetes.io/part-of": "arborl",
                                               "app.kubernetes.io/component": "sandbox"}}
        if self.owner:
            # deleted with the rollout worker's pod (Kubernetes' garbage collector)
            metadata["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": self.owner["name"],
                                            "uid": self.owner["uid"], "blockOwnerDeletion": False}]
        spec: dict[str, Any] = {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "enableServiceLinks": False,
            "terminationGracePeriodSeconds": 0,
            "activeDeadlineSeconds": math.ceil(self.limits.wall_s) + DEADLINE_MARGIN_S,
            "securityContext": {"runAsUser": uid, "runAsGroup": uid, "fsGroup": uid, "runAsNonRoot": True,
                                "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": CONTAINER,
                "image": self.options.image,
                "imagePullPolicy": self.options.image_pull_policy,
                "command": ["bash", "-c", IDLE_SCRIPT],
                "workingDir": self.workspace_at,
                "env": [{"name": "HOME", "value": POD_HOME}],
                "resources": {"requests": {"cpu": self.options.cpu, "memory": memory},
                              "limits": {"cpu": self.options.cpu, "memory": memory}},
                "securityContext": {"allowPrivilegeEscalation": False, "privileged": False,
                                    "capabilities": {"drop": ["ALL"]}},
                "volumeMounts": [{"name": "workspace", "mountPath": self.workspace_at},
                                 {"name": "home", "mountPath": POD_HOME},
                                 {"name": "tmp", "mountPath": "/tmp"}],
            }],
            "volumes": [{"name": "workspace", "emptyDir": {}}, {"name": "home", "emptyDir": {}},
                        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": memory}}],
        }
        if self.options.runtime_class:
            spec["runtimeClassName"] = self.options.runtime_class
        if self.options.node_selector:
            spec["nodeSelector"] = dict(self.options.node_selector)
        return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}

    def exec_command(self, argv: Sequence[str], *, timeout_s: float | None) -> list[str]:
        """The exec's command: the launcher, then ``argv`` (under coreutils ``timeout`` when
        ``timeout_s`` is given: killing the exec's stream does not stop the command)."""
        command = list(argv)
        if timeout_s is not None:
            grace = max(self.limits.kill_grace_s, 0.1)
            command = ["timeout", "--signal=TERM", f"--kill-after={grace:g}", f"{max(timeout_s, 0.001):g}", *command]
        return ["sh", "-c", LAUNCHER, "arborl-sandbox", *command]

    def preamble(self, env: Mapping[str, str], *, cwd: str = ".", stdin_bytes: int | None = None) -> bytes:
        """The first bytes of an exec's stdin (see the module docstring)."""
        folder = str(PurePosixPath(self.workspace_at) / relative_path(cwd))
        assignments = " ".join(shlex.quote(f"{name}={value}") for name, value in env.items())
        run = f'env -i {assignments} "$@"'
        line = (f"cd -- {shlex.quote(folder)} && exec {run} </dev/null" if stdin_bytes is None
                else f"cd -- {shlex.quote(folder)} && head -c {int(stdin_bytes)} | {run}")
        data = line.encode()
        if len(data) >= 10**8:
            raise SandboxError("a command's environment is too large to send")
        return b"%08d" % len(data) + data


def exit_code_of_status(status: str | bytes) -> int:
    """The exit code an exec's final status (its error channel: a metav1.Status) reports;
    SandboxError when the exec itself failed (the command never ran)."""
    if isinstance(status, bytes):
        status = status.decode("utf-8", "replace")
    if not status.strip():
        raise SandboxError("the exec ended without a status: its connection was lost")
    try:
        parsed = json.loads(status)
    except json.JSONDecodeError as exc:
        raise SandboxError(f"the exec ended with an unreadable status: {status[:200]!r}") from exc
    if parsed.get("status") == "Success":
        return 0
    if parsed.get("reason") == "NonZeroExitCode":
        for cause in (parsed.get("details") or {}).get("causes") or []:
            if cause.get("reason") == "ExitCode":
                return int(cause["message"])
    raise SandboxError(f"the exec failed: {str(parsed.get('message', parsed))[:300]}")


def pod_name(sandbox_id: str) -> str:
    """A DNS-1123 name for a sandbox's pod (lowercase, at most 63 characters)."""
    cleaned = "".join(ch if ch.isascii() and ch.isalnum() else "-" for ch in sandbox_id.lower()).strip("-")
    name = f"arborl-{cleaned}"
    if len(name) > 63:  # the id's random suffix stays: two sandboxes never share a pod
        name = f"{name[:54].rstrip('-')}-{cleaned[-8:]}"
    return name
