"""``k8s``: a sandbox is one pod, driven through the Kubernetes API with the ``kubernetes`` client.

The pod (k8s_pod.py: ``PodSpec.manifest``) is made at creation and deleted at ``close``; its
container idles under bash and every command is an exec (the API's ``pods/exec`` websocket, v5
or v4 channel protocol) as the pod's unprivileged user. What bounds what:

- memory and CPU: the pod's resources (``Limits.memory_mb``, ``rollout.k8s.cpu``) for the whole
  pod, a cgroup as in docker; /tmp is memory-backed, of the same size. Processes: the node's own
  ``podPidsLimit`` (a pod spec has no field for it);
- time: each ``run`` goes through coreutils ``timeout`` inside the pod (closing an exec's stream
  does not stop its command), SIGTERM then SIGKILL ``kill_grace_s`` later; the wall limit kills
  everything and later calls raise ``SandboxExpired``; the pod's ``activeDeadlineSeconds`` ends
  it a little later even if nobody is left to delete it;
- ``kill_all`` is an exec of ``kill -KILL -1``: every process of the pod's user but the
  container's init, which keeps the pod alive. A started process's ``kill`` does the same (an exec
  gives no handle on its process);
- no service-account token, no privilege, every capability dropped; ``rollout.k8s.runtime_class``
  (gVisor, Kata) for a stronger boundary. The network is the cluster's: the agent reaches the
  gateway by its Service name, and a NetworkPolicy (``arborl deploy k8s``) keeps sandboxes from
  the rest.

Environment values travel on the exec's stdin, never in its command (k8s_pod.py says why);
``copy_in`` and ``copy_out`` stream a tar through an exec, unpacked and packed by the sandbox's
user (archive.py), as in the other kinds.

The client is configured as kubectl is: in a pod from its service account, elsewhere from
``$KUBECONFIG`` or ~/.kube/config. Tested against a recorded API conversation
(tests/integration/test_k8s_sandbox.py) and, where a cluster answers, by the contract suite.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .base import (
    DEFAULT_LIMITS,
    CommandResult,
    Limits,
    OutputCapture,
    OutputFile,
    SandboxError,
    SandboxKind,
    SandboxUnavailable,
    WallClock,
    checked_workspace_at,
    command_argv,
    new_sandbox_id,
)
from .container import ContainerSandbox
from .docker import TIMEOUT_EXIT_CODES
from .k8s_pod import CONTAINER, POD_HOME, POD_WORKSPACE, PodOptions, PodSpec, exit_code_of_status, pod_name

STDOUT, STDERR, STATUS = 1, 2, 3  # the exec protocol's channels (0 is stdin)
HOST_MARGIN_S = 5.0  # past a command's own timeout before the host kills it itself
CHUNK = 1 << 16
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")
POLL_S = 0.5  # between two looks at a starting pod


@functools.cache
def client_configuration() -> Any:
    """The client's configuration, as kubectl finds its cluster (SandboxUnavailable if none)."""
    try:
        from kubernetes import client, config
    except ImportError as exc:
        raise SandboxUnavailable("the k8s sandbox needs the kubernetes client: pip install 'arborl[k8s]'") from exc
    configuration = client.Configuration()
    try:
        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration, persist_config=False)
    except config.ConfigException as exc:
        raise SandboxUnavailable(f"no Kubernetes cluster is configured: {exc}") from exc
    return configuration


@functools.cache
def cluster_unavailable_reason() -> str | None:
    """None when a cluster answers the client's configuration, else why not."""
    try:
        from kubernetes import client

        with client.ApiClient(client_configuration()) as api:
            client.VersionApi(api).get_code(_request_timeout=10)
    except SandboxUnavailable as exc:
        return str(exc)
    except Exception as exc:  # noqa: BLE001 - any failure to reach it is the reason
        return f"no Kubernetes cluster answers: {str(exc)[:300]}"
    return None


def default_namespace() -> str:
    """The rollout worker's own namespace in a pod, else "default"."""
    try:
        return SERVICE_ACCOUNT_NAMESPACE.read_text().strip() or "default"
    except OSError:
        return "default"


def owner_pod() -> dict[str, str] | None:
    """The rollout worker's own pod (``ARBORL_POD_NAME`` / ``ARBORL_POD_UID``, from the
    downward API), the owner of its sandbox pods: they go when it goes."""
    name, uid = os.environ.get("ARBORL_POD_NAME"), os.environ.get("ARBORL_POD_UID")
    return {"name": name, "uid": uid} if name and uid else None


class ExecStream:
    """One exec: stdin written from a thread of its own (a command may fill its stdout before it
    reads all its input), stdout and stderr handed to callbacks as frames arrive, then the
    exit code from the status channel."""

    def __init__(self, ws: Any, stdin: Sequence[bytes | IO[bytes]]):
        self.ws = ws
        self._writer = threading.Thread(target=self._write, args=(stdin,), daemon=True)
        self._writer.start()

    def _write(self, parts: Sequence[bytes | IO[bytes]]) -> None:
        try:
            for part in parts:
                if isinstance(part, bytes):
                    self.ws.write_stdin(part)
                    continue
                while chunk := part.read(CHUNK):
                    self.ws.write_stdin(chunk)
        except Exception:  # noqa: BLE001 - the connection closed under us: the reader reports it
            pass

    def pump(self, on_output: Callable[[int, bytes], None], deadline: float) -> bool:
        """Read until the exec ends (True: its connection closed, or was lost) or ``deadline``
        passes (False)."""
        from websocket import WebSocketException

        while self.ws.is_open():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            try:
                self.ws.update(timeout=min(left, 1.0))
            except (WebSocketException, OSError, ValueError):  # closed under us (a kill): no status follows
                break
            self._drain(on_output)
        self._drain(on_output)
        return True

    def _drain(self, on_output: Callable[[int, bytes], None]) -> None:
        for channel in (STDOUT, STDERR):
            if data := self.ws.read_channel(channel):
                on_output(channel, data)

    def exit_code(self) -> int:
        """The command's exit code from the exec's status; SandboxError if none came."""
        return exit_code_of_status(self.ws.read_channel(STATUS))

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - already closed
            pass


class K8sProcess:
    """The protocol's ``SandboxProcess`` over an exec: its output goes to a host file."""

    def __init__(self, sandbox: K8sSandbox, stream: ExecStream, output_path: Path):
        self._sandbox = sandbox
        self._stream = stream
        self._output = OutputFile(output_path, sandbox.limits.output_bytes)
        self._file = open(output_path, "ab", buffering=0)  # noqa: SIM115 - closed by the pump
        self._code: int | None = None
        self._ended = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        try:
            if self._stream.pump(self._write, float("inf")):
                try:
                    self._code = self._stream.exit_code()
                except SandboxError:
                    self._code = 137  # the exec was cut (killed, the pod gone): as a shell reports SIGKILL
        finally:
            self._file.close()
            self._stream.close()
            self._ended.set()

    def _write(self, _channel: int, data: bytes) -> None:
        self._file.write(data)

    @property
    def returncode(self) -> int | None:
        return self._code if self._ended.is_set() else None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        self._ended.wait(timeout)
        return self.returncode

    def kill(self) -> None:
        if not self._ended.is_set():
            try:
                self._sandbox.kill_all()
            finally:
                self._stream.close()
            self._ended.wait(30)

    def output(self) -> str:
        return self._output.text()


class K8sSandbox(ContainerSandbox):
    """One pod per sandbox (see the module docstring)."""

    kind: SandboxKind = "k8s"

    def __init__(
        self,
        root: Path,
        *,
        name: str,
        options: PodOptions,
        limits: Limits = DEFAULT_LIMITS,
        source: Path | None = None,
        keep: bool = False,
        workspace_at: str | None = None,
        configuration: Any = None,
    ):
        if not options.image:
            raise SandboxError("a k8s sandbox needs an image (rollout.k8s.image)")
        if source is not None and not Path(source).is_dir():
            raise SandboxError(f"source {source} is not a folder")
        from kubernetes import client  # after the checks above: importing it takes a while

        self.limits = limits
        self.keep = keep
        self.id = new_sandbox_id(name)
        workspace = checked_workspace_at(workspace_at or POD_WORKSPACE, home=POD_HOME)
        self.spec = PodSpec(pod=pod_name(self.id), sandbox_id=self.id,
                            namespace=options.namespace or default_namespace(), options=options, limits=limits,
                            workspace_at=workspace, owner=owner_pod())
        self.pod = self.spec.pod
        self.namespace = self.spec.namespace
        self._api_client = client.ApiClient(configuration or client_configuration())
        self.api = client.CoreV1Api(self._api_client)
        self._connect_lock = threading.Lock()  # the client's stream() swaps a method of the ApiClient
        self._lock = threading.Lock()
        self._closed = self._removed = False
        self._clock = WallClock(self.id, limits.wall_s)
        self._started = 0
        self.dir = Path(root).absolute() / self.id  # host scratch: started processes' output, archives
        self.dir.mkdir(parents=True, mode=0o700)
        try:
            self._create_pod(client.V1Pod.from_dict(self.spec.manifest()))
            if source is not None:
                self.copy_in(Path(source), ".")
        except BaseException:
            with contextlib.suppress(SandboxError):  # the reason it did not start is the error to see
                self._remove()
            raise
        self._clock.start(self.kill_all)

    # -- the protocol ----------------------------------------------------------------------------

    @property
    def workspace_inside(self) -> str:
        return self.spec.workspace_at

    def start(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | None = None) -> K8sProcess:
        self._check_open()
        argv = command_argv(argv)
        with self._lock:
            self._started += 1
            output_path = self.dir / f"process-{self._started}.out"
        output_path.touch(mode=0o600, exist_ok=False)
        stream = self._open(self.spec.exec_command(list(argv), timeout_s=None),
                            [self.spec.preamble(self.env(env), cwd=cwd or ".")])
        return K8sProcess(self, stream, output_path)

    def kill_all(self) -> None:
        """``kill -KILL -1`` as the pod's user, by an exec: every process but the container's init."""
        with self._lock:
            if self._removed:
                return
        stream = self._open(["kill", "-KILL", "-1"], [], stdin_open=False)
        try:
            stream.pump(lambda _channel, _data: None, time.monotonic() + 60)
        finally:
            stream.close()
        # kill -1 reports failure when there was nothing to kill: its exit code says nothing

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self._clock.stop()
        self._remove()

    def __repr__(self) -> str:
        return f"K8sSandbox({self.id!r}, pod={self.namespace}/{self.pod})"

    # -- internals -------------------------------------------------------------------------------

    def _create_pod(self, pod: Any) -> None:
        """Make the pod and wait until its container runs; SandboxUnavailable with the cluster's
        reason if it cannot (an image that does not pull, a namespace it may not use)."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.api.create_namespaced_pod(self.namespace, pod)
        except ApiException as exc:
            raise SandboxUnavailable(f"the cluster refused the sandbox pod: {_api_reason(exc)}") from exc
        waited_until = time.monotonic() + self.spec.options.start_timeout_s
        while True:
            try:
                # the raw JSON, not the client's model: the same fields the manifest was written in
                raw: Any = self.api.read_namespaced_pod(self.pod, self.namespace, _preload_content=False)
                status = json.loads(raw.data).get("status", {})
            except ApiException as exc:
                raise SandboxUnavailable(f"the sandbox pod could not be read: {_api_reason(exc)}") from exc
            problem = _start_problem(status)
            if problem is not None:
                raise SandboxUnavailable(f"the sandbox pod {self.namespace}/{self.pod} did not start: {problem}")
            if status.get("phase") == "Running" and all(c.get("ready") for c in status.get("containerStatuses", [])):
                return
            if time.monotonic() > waited_until:
                raise SandboxUnavailable(f"the sandbox pod {self.namespace}/{self.pod} was not running after "
                                         f"{self.spec.options.start_timeout_s:g} s (phase {status.get('phase')})")
            time.sleep(POLL_S)

    def _open(self, command: list[str], stdin: Sequence[bytes | IO[bytes]], *, stdin_open: bool = True) -> ExecStream:
        """Start an exec of ``command`` in the pod's container and feed it ``stdin``."""
        from kubernetes.client.exceptions import ApiException
        from kubernetes.stream import stream

        try:
            with self._connect_lock:
                ws = stream(self.api.connect_get_namespaced_pod_exec, self.pod, self.namespace, command=command,
                            container=CONTAINER, stdin=stdin_open, stdout=True, stderr=True, tty=False,
                            _preload_content=False, binary=True)
        except ApiException as exc:
            raise SandboxError(f"sandbox {self.id}: the exec could not start: {_api_reason(exc)}") from exc
        return ExecStream(ws, stdin)

    def _exec(self, argv: list[str], *, env: Mapping[str, str] | None, cwd: str, stdin: bytes | IO[bytes] | None,
              timeout_s: float, stdout_to: IO[bytes] | None = None) -> CommandResult:
        self._check_open()
        started = time.monotonic()
        limit = min(timeout_s, self.seconds_left)
        size = None if stdin is None else (len(stdin) if isinstance(stdin, bytes) else _size_left(stdin))
        parts: list[bytes | IO[bytes]] = [self.spec.preamble(self.env(env), cwd=cwd, stdin_bytes=size)]
        if stdin is not None:
            parts.append(stdin)
        stream = self._open(self.spec.exec_command(argv, timeout_s=limit), parts)
        captures = {STDOUT: OutputCapture(self.limits.output_bytes), STDERR: OutputCapture(self.limits.output_bytes)}

        def on_output(channel: int, data: bytes) -> None:
            if channel == STDOUT and stdout_to is not None:
                stdout_to.write(data)
            else:
                captures[channel].add(data)

        try:
            ended = stream.pump(on_output, started + limit + self.limits.kill_grace_s + HOST_MARGIN_S)
            if not ended:  # the in-pod timeout did not end it
                self.kill_all()
            code = stream.exit_code() if ended else None
        except SandboxError:
            if not self._clock.passed:
                raise
            code = None  # the wall limit's kill_all cut the exec
        finally:
            stream.close()
        elapsed = time.monotonic() - started
        killed = code is None or (code in TIMEOUT_EXIT_CODES and elapsed >= limit) or (self._clock.passed and code != 0)
        return CommandResult(exit_code=None if killed else code, stdout=captures[STDOUT].text(),
                             stderr=captures[STDERR].text(), timed_out=killed, seconds=elapsed)

    def _remove(self) -> None:
        """The pod goes (``keep``: its processes are killed and it stays until its deadline, for a look)."""
        from kubernetes.client.exceptions import ApiException

        if self._removed:
            return
        try:
            if self.keep:
                self.kill_all()
            else:
                self.api.delete_namespaced_pod(self.pod, self.namespace, grace_period_seconds=0,
                                               propagation_policy="Background")
        except ApiException as exc:
            if exc.status != 404:
                raise SandboxError(f"sandbox {self.id}: its pod could not be deleted: {_api_reason(exc)}") from exc
        finally:
            with self._lock:
                self._removed = True
            self._api_client.close()
            if not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)


def _size_left(stream: IO[bytes]) -> int:
    """Bytes from ``stream``'s position to its end (an archive file of archive.py)."""
    position = stream.tell()
    end = stream.seek(0, os.SEEK_END)
    stream.seek(position)
    return end - position


def _start_problem(status: Mapping[str, Any]) -> str | None:
    """Why a starting pod will not run, if the cluster says so."""
    if status.get("phase") in ("Failed", "Succeeded"):
        return f"it ended ({status.get('phase')}: {status.get('reason') or status.get('message') or 'no reason'})"
    for container in status.get("containerStatuses", []):
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff", "InvalidImageName",
                                     "CreateContainerConfigError", "CreateContainerError"):
            return f"{waiting['reason']}: {waiting.get('message', '')}"[:500]
        if (container.get("state") or {}).get("terminated"):
            return f"its container ended: {container['state']['terminated'].get('reason', '')}"
    return None


def _api_reason(exc: Any) -> str:
    """An API error in a line: the Status's message when the server sent one."""
    try:
        return f"{exc.status} {json.loads(exc.body).get('message', '')}"[:500]
    except (TypeError, ValueError, AttributeError):
        return f"{exc.status} {exc.reason}"[:500]
