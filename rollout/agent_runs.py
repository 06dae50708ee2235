"""Running one scaffold on one task inside a sandbox, within the rollout's time and turn limits.

Scaffolds by kind:

- ``builtin``: arborl's own agent (``scaffold_adapters/builtin.py``), run in this process; its
  commands run in the sandbox.
- the agent CLIs (``claude-code``, ``codex``, ``opencode``, ``cline``, ``mini-swe-agent``): the
  adapter writes its configuration into the sandbox's HOME and the CLI runs headless inside the
  sandbox. The gateway counts its calls; once it has made ``max_turns`` it is stopped.
- ``oracle`` applies the task's reference solution (inside the sandbox, as an agent would) and
  ``nop`` does nothing, as Harbor's agents of those names: they check that a dataset's verifiers
  discriminate (the oracle must score 100%, nop 0%), and use no model. A reference that does not
  apply is the oracle's crash.

Every scaffold gets the instruction for the folder its workspace is in (``Task.instruction_in``:
a Harbor task's "/app" names the workspace wherever the sandbox has it).

What comes back says why the agent phase ended and whether the scaffold itself failed
(``crashed``): a crash before any model call is an infrastructure failure, which the
orchestrator retries and never trains on.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from arborl.scaffold_adapters.base import GatewayTarget
from arborl.scaffold_adapters.builtin import AgentError, BuiltinAgent
from arborl.scaffold_adapters.registry import ADAPTERS, get_adapter

from .results import AGENT_ERROR, NO_ACTION, STOPPED, SUBMITTED, TIME_LIMIT, TURN_LIMIT
from .sandboxes import SYSTEM_PATH, CommandResult, Sandbox, SandboxError, SandboxProcess
from .settings import RolloutSettings
from .tasks import Task
from .verification import apply_in_sandbox

MODEL_FREE_SCAFFOLDS = ("oracle", "nop")
SCAFFOLDS: tuple[str, ...] = ("builtin", *sorted(ADAPTERS), *MODEL_FREE_SCAFFOLDS)
POLL_S = 0.2  # how often a CLI's exit, deadline and call count are checked
ANSWER_CHARS = 20_000


def install_prefix(name: str) -> Path | None:
    """Where a CLI scaffold is installed, when that is outside the system folders a ``bwrap``
    sandbox shows anyway: the venv of a Python CLI under /opt, say (``/usr/local/bin/mini`` is a
    link into ``/opt/mini-swe-agent/bin``). None for the others."""
    if name not in ADAPTERS:
        return None
    found = shutil.which(get_adapter(name).executable, path=SYSTEM_PATH)
    if found is None:
        return None
    real = Path(found).resolve()
    if real.parts[1] in ("usr", "bin", "sbin", "lib", "lib64", "etc"):
        return None
    return real.parent.parent if real.parent.name == "bin" else real.parent


def min_memory_mb(name: str) -> int:
    """The per-process memory limit a scaffold needs to start at all (its adapter's
    ``min_memory_mb``: a runtime that reserves more address space than it uses); 0 for the others."""
    return (get_adapter(name).min_memory_mb or 0) if name in ADAPTERS else 0


@functools.cache
def scaffold_version(name: str) -> str:
    """What identifies the scaffold's behaviour, for a plan's key: arborl's version and the
    source of the code that drives it (the builtin agent, a CLI's adapter), and for a CLI the
    installed executable (its resolved path, size and modification time: an upgrade changes
    them without running anything). The oracle and nop do what the task's content says."""
    check_scaffold(name)
    if name in MODEL_FREE_SCAFFOLDS:
        return name
    try:
        arborl = importlib.metadata.version("arborl")
    except importlib.metadata.PackageNotFoundError:
        arborl = "unknown"
    module = BuiltinAgent if name == "builtin" else type(get_adapter(name))
    source = hashlib.sha256(Path(sys.modules[module.__module__].__file__ or "").read_bytes()).hexdigest()[:16]
    parts = [f"arborl {arborl}", f"code {source}"]
    if name in ADAPTERS:
        found = shutil.which(get_adapter(name).executable, path=SYSTEM_PATH)
        if found is None:
            parts.append("not installed")
        else:
            real = Path(found).resolve()
            info = real.stat()
            parts.append(f"{real} {info.st_size} {info.st_mtime_ns}")
    return "; ".join(parts)


def check_scaffold(name: str) -> str:
    if name not in SCAFFOLDS:
        raise ValueError(f"unknown scaffold {name!r}; known: {', '.join(SCAFFOLDS)}")
    return name


def cannot_run(name: str, task: Task) -> str | None:
    """Why scaffold ``name`` cannot run ``task`` at all (naming where the task is and what it
    lacks), or None. Only the oracle needs more than a task has to have: a reference solution,
    or for an answer-graded task the answer (the expected text, or a ``reference_answer``)."""
    if name != "oracle" or task.reference is not None:
        return None
    if task.verifier.kind == "exact" or task.metadata.get("reference_answer"):
        return None
    missing = f"no {task.reference_at}" if task.reference_at else "no reference solution"
    return f"{task.origin or task.id}: {missing}, so the oracle has nothing to apply"


@dataclass(frozen=True)
class AgentOutcome:
    ended_by: str  # results.SUBMITTED, AGENT_ERROR, TIME_LIMIT, TURN_LIMIT, NO_ACTION, or STOPPED
    answer: str = ""  # what an output-graded task is graded on
    tools_s: float = 0.0  # the agent's own commands (builtin only; 0 for a CLI)
    crashed: bool = False  # the scaffold failed (an exception, a non-zero exit)
    error: str = ""


class SandboxRunner:
    """The builtin agent's ``CommandRunner``: commands in the sandbox, with the rollout's env."""

    def __init__(self, sandbox: Sandbox, env: Mapping[str, str]):
        self.sandbox = sandbox
        self.env = dict(env)

    def run(self, command: str | Sequence[str], *, timeout_s: float | None = None,
            stdin: str | None = None) -> CommandResult:
        return self.sandbox.run(command, timeout_s=timeout_s, stdin=stdin, env=self.env)


@dataclass
class AgentContext:
    """Everything a scaffold run needs besides the task and its scaffold's name."""

    sandbox: Sandbox
    target: GatewayTarget
    settings: RolloutSettings
    env: Mapping[str, str]  # extra environment of every command (the task toolchain's PATH)
    deadline: float  # time.monotonic() at which the agent is stopped
    calls_made: Callable[[], int]  # model calls the rollout has made so far (from the store)
    log: IO[str]
    should_stop: Callable[[], bool]


def run_scaffold(name: str, task: Task, context: AgentContext) -> AgentOutcome:
    check_scaffold(name)
    if name == "nop":
        return AgentOutcome(NO_ACTION)
    if name == "oracle":
        return _oracle(task, context)
    if name == "builtin":
        return _builtin(task, context)
    return _cli(name, task, context)


def _oracle(task: Task, context: AgentContext) -> AgentOutcome:
    # The reference runs inside the sandbox, as an agent would: its script sees the workspace
    # where the tests will (Harbor's /app under bwrap), and runs as the sandbox's uid under its
    # limits, not as the host's root.
    if task.reference is not None:  # a question has only a reference answer
        problem = apply_in_sandbox(task.reference, context.sandbox, what="the reference solution", env=context.env)
        if problem:
            context.log.write(f"oracle: {problem}\n")
            return AgentOutcome(AGENT_ERROR, crashed=True, error=problem)
    answer = task.verifier.expected if task.verifier.kind == "exact" else str(task.metadata.get("reference_answer", ""))
    return AgentOutcome(NO_ACTION, answer=answer)


def _builtin(task: Task, context: AgentContext) -> AgentOutcome:
    settings = context.settings

    def log(line: str) -> None:
        context.log.write(line + "\n")
        context.log.flush()

    agent = BuiltinAgent(
        context.target,
        SandboxRunner(context.sandbox, context.env),
        max_turns=settings.max_turns,
        deadline=context.deadline,
        command_timeout_s=settings.command_timeout_s,
        max_tokens=settings.max_tokens,
        temperature=settings.temperature,
        log=log,
        should_stop=context.should_stop,
    )
    try:
        run = agent.run(task.instruction_in(context.sandbox.workspace_inside))
    except AgentError as exc:  # raised only before the first successful call
        log(f"agent error: {exc}")
        return AgentOutcome(AGENT_ERROR, crashed=True, error=str(exc))
    log(f"ended: {run.ended_by} after {run.turns} turns {run.error}")
    return AgentOutcome(run.ended_by, answer=run.answer, tools_s=run.tools_s, error=run.error)


def _cli(name: str, task: Task, context: AgentContext) -> AgentOutcome:
    adapter = get_adapter(name)
    sandbox = context.sandbox
    setup = adapter.setup(context.target)
    # The scaffold's configuration is written here and copied into the sandbox's home: the
    # sandbox may be a container on another machine.
    with tempfile.TemporaryDirectory(prefix="arborl-scaffold-home-") as staging:
        setup.write(Path(staging))
        try:
            sandbox.copy_in(Path(staging), ".", into="home")
        except (SandboxError, OSError) as exc:
            return AgentOutcome(AGENT_ERROR, crashed=True, error=f"{name}'s configuration could not be written: {exc}")
    env = {**context.env, **setup.env}
    argv = adapter.command(task.instruction_in(sandbox.workspace_inside))
    context.log.write(f"$ {' '.join(argv[:1])} ... (in {sandbox.kind} sandbox {sandbox.id})\n")
    context.log.flush()
    try:
        process = sandbox.start(argv, env=env)
    except OSError as exc:
        return AgentOutcome(AGENT_ERROR, crashed=True, error=f"{name} did not start: {exc}")
    ended_by = _watch(process, context)
    if process.poll() is None:
        sandbox.kill_all()
        process.wait()
    text = process.output()
    context.log.write(text[-ANSWER_CHARS:] + "\n")
    code = process.returncode
    if ended_by is None:
        ended_by = SUBMITTED if code == 0 else AGENT_ERROR
    crashed = ended_by == AGENT_ERROR
    error = f"{name} exited {code}: {text.strip()[-500:]}" if crashed else ""
    context.log.write(f"ended: {ended_by} (exit {code})\n")
    context.log.flush()
    return AgentOutcome(ended_by, answer=text[-ANSWER_CHARS:], crashed=crashed, error=error)


def _watch(process: SandboxProcess, context: AgentContext) -> str | None:
    """Wait for the CLI; the reason it was stopped, or None when it exited by itself."""
    while process.poll() is None:
        if context.should_stop():
            return STOPPED
        if time.monotonic() >= context.deadline:
            return TIME_LIMIT
        if context.calls_made() >= context.settings.max_turns:
            return TURN_LIMIT
        process.wait(timeout=POLL_S)
    return None

