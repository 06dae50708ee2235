"""``arborl up --ray ADDRESS``: the same parts as on one machine, each placed on a Ray cluster.

The supervisor (ops/up.py) is unchanged in what it does: it starts the gateway, the rollout
workers and the learner, restarts what dies, runs the held-out evaluations, and stops them in
order. Under Ray each part is a ``PartProcess`` actor that runs the part's ordinary ``arborl``
command as a child process on whatever node Ray placed it, so the command, its flags and its
crash safety are exactly those of one machine.

Placement (``up.ray_parts.<part>``): the resources the actor reserves (``num_cpus``,
``num_gpus``) and ``prefer``, a custom resource of the node it should run on. The supervisor,
not Ray, restarts a part (Ray's own restart would keep asking for the node it preferred): while
a live node has the preferred resource the part asks for a sliver of it (and so runs there),
otherwise it goes anywhere that has room.

What a node's death does: the actor's calls fail (``ActorUnavailableError`` within seconds, the
node marked dead later); the supervisor sees the part down on its next check and starts it again
elsewhere. The part's old process, if its node is still up but cut off, stops by itself when its
actor's process goes (``ARBORL_SUPERVISOR_PID``: the command watches its parent). The new one
resumes from the store like a restarted child: the ledger says which groups each committed step
consumed, so no group trains twice and none is lost (a step interrupted mid-way is redone). A
learner cut off from Ray but still running may commit the step it was in before it stops; the
ledger's commit refuses a group that is not pending, so if the new learner started that step too,
its commit fails, and it is restarted from the newer step.

The learner's fsdp ranks are one placement: children of the learner's command on its actor's
node, so they are placed, lose their node and are placed again together (the learner restarts
them all and resumes from its last checkpoint). ``up.ray_parts.learner.num_gpus`` reserves a GPU
per rank or none (ranks on the CPU); another count is refused when the configuration loads.
Ranks spread over several nodes (a placement group of one bundle per rank, torch's rendezvous
across them) are not built.

A gateway placed again on another node has a new address: the supervisor restarts the rollout
workers and the learner with it. Every node must have arborl at the driver's python path
(``sys.executable``; one image everywhere) and reach the run folder at the same path (one machine,
or a shared file system) and the store (PostgreSQL across machines).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import ArborlConfig, RayPartSettings
from .up import STOP_GRACE_S, Part, Supervisor

NODE_IP = "{node_ip}"  # in a part's argv: replaced by its node's address (the gateway binds to it)
CALL_TIMEOUT_S = 10.0  # a health call to a part's actor
# A part whose actor is gone (its node died) is down at once; one whose health calls only time
# out (a loaded node) is down after this many in a row: a restart kills what may be a busy part.
TIMEOUTS_BEFORE_DOWN = 3
# A part with a preferred node asks for this much of the node's custom resource (so any number
# of parts fit on it), and waits this long there before it goes anywhere instead: a node whose
# death Ray has not yet noticed still looks alive.
PREFERENCE_SHARE = 0.001
PREFERRED_WAIT_S = 60.0
PLACEMENT_WAIT_S = 600.0


class PlacementTimeout(RuntimeError):
    """A part's actor did not start within its wait."""


class PartProcess:
    """A Ray actor running one arborl command as its child process (``ray.remote`` is applied in
    ``_actor_class``, so importing this module needs no ray)."""

    def __init__(self, argv: list[str], env: dict[str, str], log_path: str):
        import ray

        self.node_ip = ray.util.get_node_ip_address()
        argv = [self.node_ip if arg == NODE_IP else arg for arg in argv]
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} arborl up (ray) starts it on "
                      f"{self.node_ip}\n".encode())
            log.flush()
            # ARBORL_SUPERVISOR_PID: the command stops itself when this actor's process is gone.
            # _unblock_signals: Ray's threads block SIGINT and SIGTERM, and a child inherits the
            # mask: it would never see the stop (nor raise its own when its parent dies).
            self.process = subprocess.Popen(argv, env={**env, "ARBORL_SUPERVISOR_PID": str(os.getpid())},
                                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                            start_new_session=True, preexec_fn=_unblock_signals)

    def where(self) -> tuple[str, int]:
        return self.node_ip, self.process.pid

    def poll(self) -> int | None:
        return self.process.poll()

    def stop(self, sig: int, grace_s: float) -> int | None:
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
            except ProcessLookupError:
                pass
        return self.process.returncode


def _unblock_signals() -> None:
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def _actor_class() -> Any:
    import ray

    # max_concurrency: a health call answers while a stop() waits for the process
    remote: Any = ray.remote
    return remote(max_restarts=0, max_concurrency=4)(PartProcess)


class RayPart:
    """One part of ``arborl up`` as a Ray actor: the supervisor's ``Child``, placed by Ray."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_path: Path, settings: RayPartSettings):
        self.name, self.argv, self.env, self.log_path, self.settings = name, argv, env, log_path, settings
        self.restarts = 0
        self.actor: Any = None
        self.node_ip: str | None = None
        self._pid: int | None = None
        self._returncode: int | None = None
        self._timeouts = 0

    def start(self) -> None:
        """Place the part: on a live node with its preferred resource if there is one (if it
        does not start there within ``PREFERRED_WAIT_S``, or its node dies under it, that node
        is going: anywhere), else anywhere with room."""
        from ray.exceptions import RayError

        self._retire()
        if preferred_node(self.settings.prefer) is not None:
            assert self.settings.prefer is not None
            try:
                self._place({self.settings.prefer: PREFERENCE_SHARE}, timeout_s=PREFERRED_WAIT_S)
                return
            except (PlacementTimeout, RayError):  # the node died under it (ActorDiedError), or is dying
                self._retire()
        self._place({}, timeout_s=PLACEMENT_WAIT_S)

    def _place(self, resources: dict[str, float], *, timeout_s: float) -> None:
        import ray
        from ray.exceptions import GetTimeoutError

        self.actor = _actor_class().options(num_cpus=self.settings.num_cpus, num_gpus=self.settings.num_gpus,
                                            resources=resources).remote(self.argv, self.env, str(self.log_path))
        try:
            self.node_ip, self._pid = ray.get(self.actor.where.remote(), timeout=timeout_s)
        except GetTimeoutError as exc:
            raise PlacementTimeout(f"{self.name} was not placed within {timeout_s:g} s") from exc
        self._returncode, self._timeouts = None, 0

    @property
    def running(self) -> bool:
        if self.actor is None:
            return False
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        try:
            self._returncode = ray.get(self.actor.poll.remote(), timeout=CALL_TIMEOUT_S)
        except GetTimeoutError:
            self._timeouts += 1
            return self._timeouts < TIMEOUTS_BEFORE_DOWN
        except RayError:  # the actor is gone: its node died (ActorDiedError) or is cut off
            self._returncode = None
            return False
        self._timeouts = 0
        return self._returncode is None

    @property
    def returncode(self) -> int | None:
        return self._returncode

    @property
    def pid(self) -> int | None:
        return self._pid

    def stop(self, sig: int = signal.SIGINT, grace_s: float = STOP_GRACE_S) -> None:
        if self.actor is None:
            return
        import ray
        from ray.exceptions import GetTimeoutError, RayError

        try:
            self._returncode = ray.get(self.actor.stop.remote(int(sig), grace_s), timeout=grace_s + CALL_TIMEOUT_S)
        except (RayError, GetTimeoutError) as exc:
            print(f"arborl up: stopping {self.name} on ray: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        self._retire()

    def _retire(self) -> None:
        """The old actor goes (its process with it): a part never runs twice."""
        if self.actor is not None:
            import ray

            ray.kill(self.actor, no_restart=True)
            self.actor = None


def preferred_node(resource: str | None) -> str | None:
    """The id of a live node that has the custom resource ``resource``, else None."""
    if not resource:
        return None
    import ray

    for node in ray.nodes():
        if node.get("Alive") and node.get("Resources", {}).get(resource, 0) > 0:
            return str(node["NodeID"])
    return None


class RaySupervisor(Supervisor):
    """``arborl up`` with every part a Ray actor (see the module docstring)."""

    def __init__(self, config: ArborlConfig, *, python: str = sys.executable):
        import ray

        up = config.up
        if not ray.is_initialized():
            ray.init(address=up.ray_address, _node_ip_address=up.ray_node_ip, logging_level=logging.ERROR,
                     log_to_driver=False, configure_logging=False)
        super().__init__(config, python=python)

    def _child(self, name: str, argv: list[str], env: dict[str, str], log_path: Path) -> Part:
        part = "heldout" if name.startswith("heldout") else name
        settings = {str(key): value for key, value in self.config.up.ray_parts.items()}.get(part) or RayPartSettings()
        if name == "gateway":  # other nodes reach it at its node's address
            argv = [*argv, "--host", NODE_IP, "--port", str(self.config.gateway.port)]
        return RayPart(name, argv, env, log_path, settings)

    def wait_for_gateway(self, child: Part, timeout_s: float = 600.0) -> None:
        assert isinstance(child, RayPart)
        self.url = f"http://{child.node_ip}:{self.config.gateway.port}"
        super().wait_for_gateway(child, timeout_s)

    def start(self) -> None:
        plan = self.plan()
        gateway = plan[0]
        self.children[gateway.name] = gateway
        gateway.start()
        self.wait_for_gateway(gateway)
        # the others are planned again with the gateway's address, known once it was placed
        for child in self.plan()[1:]:
            self.children[child.name] = child
            child.start()
        self.write_state()
        self.events.append(f"started on ray: {', '.join(self.placement())}")

    def placement(self) -> list[str]:
        """Each part and the node it runs on ("learner@10.0.0.3")."""
        return [f"{name}@{part.node_ip}" for name, part in self.children.items() if isinstance(part, RayPart)]

    def check(self) -> None:
        url = self.url
        super().check()
        if self.url != url:  # the gateway was placed again elsewhere: the others follow it
            self.events.append(f"gateway moved to {self.url}: restarting the others with it")
            for child in self.plan()[1:]:
                old = self.children.get(child.name)
                if old is not None:
                    old.stop()
                    child.restarts = old.restarts
                self.children[child.name] = child
                child.start()
            self.write_state()
