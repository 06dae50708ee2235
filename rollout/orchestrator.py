"""The rollout orchestrator: groups of rollouts, each an agent in a sandbox, verified and recorded.

A ``GroupPlan`` names a task and the scaffold of each of its G rollouts. For every plan the
orchestrator opens (or, on resume, finds by the plan's key) a group in the run ledger, and runs
the rollouts that group still lacks, ``concurrency`` at a time. One rollout:

1. opens a session with its own API key, so every call it makes is recorded under it, whatever
   the scaffold sends (the key and the ``/s/{session}`` path both say which session it is);
2. creates a sandbox and materialises the task's workspace in it;
3. runs the scaffold (``agent_runs.py``) until it is done, or at its time or turn limit;
4. kills the agent's processes, installs the hidden tests and runs the verifier
   (``verification.py``);
5. closes the sandbox and writes the reward and the outcome (a ``RolloutResult``) to the ledger;
   the rollout that completes its group makes the group visible to the learner.

Failures are told apart. A wrong answer, a crash after the model was used, or a limit reached
is a reward (often 0) and a training sample. An infrastructure failure -- the sandbox or the
workspace could not be made, the scaffold died before its first model call, grading could not
run -- and a verifier failure -- the task's own verifier ran and gave no reward (its script
timed out, wrote no reward file, or one that is not a number) -- are marked ``infra_failed`` in
the ledger (never trained on, not counted in its group) and retried under a new session, up to
``infra_retries`` times; a result that fails every attempt says which of the two it was.

Interrupting (``stop``) stops the running agents; their rollouts are marked ``infra_failed`` as
"interrupted". A later run with the same plans finds each group by its key and fingerprint,
counts what is done, marks rollouts a killed process left ``running`` as interrupted, and runs
only what is missing.

A plan's fingerprint (``Orchestrator.fingerprint``) is a digest of everything that decides its
results: the task's content (``Task.content_hash``: its text and the bytes of its files), each
scaffold and its version, the sandbox kind, the limits and sampling settings, and -- when a
scaffold uses the model -- the model and, for an evaluation, the policy version it is served at
(a training group is on-policy at whatever version serves it, so its fingerprint leaves the
version out). A changed plan opens a new group and runs again; the old group stays in the ledger.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
import secrets
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from arborl.scaffold_adapters.base import GatewayTarget

from .agent_runs import (
    MODEL_FREE_SCAFFOLDS,
    AgentContext,
    AgentOutcome,
    cannot_run,
    check_scaffold,
    install_prefix,
    min_memory_mb,
    run_scaffold,
    scaffold_version,
)
from .gateway_sessions import RolloutSessions, StoreSessions
from .metrics import RolloutMetrics
from .results import STOPPED, RolloutResult, Status, Timings
from .sandboxes import SYSTEM_PATH, Limits, Sandbox, SandboxError, make_sandbox
from .settings import RolloutSettings
from .store import RUNNING, RunLedger
from .tasks import Task, TaskError, WorkspaceError
from .verification import VerificationError, VerifierFailed, verify_in_sandbox
from .verifiers import JudgeClient, Verdict, verifier_for

log = logging.getLogger(__name__)

VERIFY_MARGIN_S = 120.0  # the sandbox's wall limit beyond agent + verification time
INTERRUPTED = "interrupted"


@dataclass(frozen=True)
class GroupPlan:
    """One group: ``task`` run once per entry of ``scaffolds``. ``key`` names the group in the
    ledger, so a resumed run finds it again; it must be unique within a run."""

    key: str
    task: Task
    scaffolds: tuple[str, ...]
    trainable: bool = True  # False for an evaluation: the learner never takes the group

    def __post_init__(self) -> None:
        if not self.scaffolds:
            raise ValueError(f"group {self.key!r} has no rollouts")
        for name in self.scaffolds:
            check_scaffold(name)
            problem = cannot_run(name, self.task)
            if problem is not None:  # it would score 0 without saying why
                raise TaskError(problem)


def eval_plans(tasks: Iterable[Task], scaffolds: Sequence[str], k: int, *, prefix: str = "eval",
               problems: list[TaskError] | None = None) -> list[GroupPlan]:
    """A group of ``k`` rollouts per task and scaffold, never trained on. A scaffold that cannot
    run a task (the oracle on a task without a reference) raises its ``TaskError``, unless
    ``problems`` is given: then the error goes there and only that pair is left out."""
    plans = []
    for task in tasks:
        for scaffold in scaffolds:
            try:
                plans.append(GroupPlan(f"{prefix}/{scaffold}/{task.id}", task, (scaffold,) * k, trainable=False))
            except TaskError as exc:
                if problems is None:
                    raise
                problems.append(exc)
    return plans


def training_plans(tasks: Sequence[Task], settings: RolloutSettings, *, rounds: int | None = None,
                   prefix: str = "train") -> Iterator[GroupPlan]:
    """Groups of ``settings.group_size`` rollouts, a round over every task at a time (shuffled per
    round), each rollout's scaffold drawn from the weighted mixture. Deterministic in
    ``settings.seed``, so a resumed run plans the same groups; endless when ``rounds`` is None."""
    names = list(settings.scaffolds)
    weights = [settings.scaffolds[name] for name in names]
    round_index = 0
    while rounds is None or round_index < rounds:
        order = list(tasks)
        random.Random(f"{settings.seed}:{round_index}").shuffle(order)
        for task in order:
            key = f"{prefix}/{round_index}/{task.id}"
            draw = random.Random(f"{settings.seed}:{key}")
            yield GroupPlan(key, task, tuple(draw.choices(names, weights, k=settings.group_size)))
        round_index += 1


@dataclass(frozen=True)
class Job:
    plan: GroupPlan
    group_id: int
    scaffold: str


class OrchestratorError(RuntimeError):
    """The orchestrator cannot run these plans here (say, the sandbox cannot run the tests)."""


class InfraFailure(Exception):
    """Not the agent's doing: the attempt is marked and retried."""

    status: ClassVar[Status] = "infra_failed"  # the result's status when the last attempt failed so


class VerifierFailure(InfraFailure):
    """The task's verifier gave no reward: retried like an infrastructure failure, and reported
    as a verifier failure (a broken task, not a broken machine)."""

    status = "verifier_failed"


class Interrupted(Exception):
    """The run was stopped while this rollout was under way."""


class Orchestrator:
    def __init__(
        self,
        ledger: RunLedger,
        run_dir: Path,
        gateway_url: str,
        model: str,
        *,
        settings: RolloutSettings | None = None,
        judge: JudgeClient | None = None,
        on_result: Callable[[RolloutResult, bool], None] | None = None,
        metrics: RolloutMetrics | None = None,
        policy_version: int | str | None = None,
        sessions: RolloutSessions | None = None,
    ):
        """``sessions``: how to ask the gateway for session keys and call counts; by default its
        store (a gateway in this process), ``GatewaySessions`` for one elsewhere (over HTTP)."""
        self.ledger = ledger
        self.store = ledger.store  # the run's store: the rollouts' tries, for their pages
        self.sessions = sessions or StoreSessions(ledger)
        self.run_dir = Path(run_dir)
        self.gateway_url = gateway_url
        self.model = model
        self.policy_version = policy_version  # what the gateway serves: part of an evaluation's fingerprint
        self.settings = settings or RolloutSettings()
        self.changed_plans = 0  # plans found under their key with another fingerprint, so run again
        # (task id, scaffold) -> errors of attempts of rollouts that got no result (a stop came first)
        self.abandoned_attempts: dict[tuple[str, str], list[str]] = {}
        self.judge = judge or _configured_judge(self.settings)
        self.on_result = on_result or (lambda result, resumed: None)
        self.metrics = metrics or RolloutMetrics()
        self.metrics.declare(self.settings.scaffolds)
        self.stop = threading.Event()
        self._jobs_lock = threading.Lock()
        self._active = 0  # rollouts under way (rollout.learner_gate waits for none)
        self._active_lock = threading.Lock()  # not _jobs_lock: a gate waits while holding that one
        for folder in ("sandboxes", "rollouts"):
            (self.run_dir / folder).mkdir(parents=True, exist_ok=True)
        task_path = self.settings.task_path
        self.env = {"PATH": f"{task_path}:{SYSTEM_PATH}"} if task_path else {}
        self.expose = (Path(task_path),) if task_path else ()

    def preflight(self, tasks: Iterable[Task]) -> None:
        """Fail early, with the fix, when these tasks cannot be graded here: a judge-graded task
        needs a judge, a tests- or script-graded one a python3 with pytest on the sandbox's PATH."""
        tasks = list(tasks)
        judged = [task.id for task in tasks if task.verifier.kind == "judge"]
        if judged and self.judge is None:
            raise OrchestratorError(f"tasks {', '.join(judged[:5])} are graded by an LLM judge: set rollout.judge_url "
                                    "and rollout.judge_model (an OpenAI-compatible endpoint)")
        if not any(task.verifier.kind in ("tests", "script") for task in tasks):
            return
        try:
            sandbox = make_sandbox(self.settings.sandbox, self.run_dir / "sandboxes", name="preflight",
                                   expose=self.expose, image=self.settings.docker_image,
                                   network=self.settings.docker_network, docker_cli=self.settings.docker_cli,
                                   pod=self.settings.k8s)
        except SandboxError as exc:
            raise OrchestratorError(f"the {self.settings.sandbox} sandbox cannot run here: {exc}") from exc
        try:
            probe = sandbox.run("python3 -m pytest --version", env=self.env, timeout_s=60)
        finally:
            self._close(sandbox)
        if not probe.ok:
            raise OrchestratorError(
                "the tasks' tests run with python3 and pytest inside the sandbox, and there they fail: "
                f"{(probe.stderr or probe.stdout).strip()[-300:]}. Install Debian's python3-pytest "
                "(`apt-get install python3-pytest`; ops/bootstrap.sh does it as root), or set "
                "rollout.task_path to a folder with a python3 that has pytest.")

    # -- running plans --------------------------------------------------------------------------

    def run(self, plans: Iterable[GroupPlan], *, max_groups: int | None = None) -> list[RolloutResult]:
        """Run every plan's missing rollouts; returns every result of these plans, finished now
        or before. Stops early when ``stop`` is set (``KeyboardInterrupt`` sets it)."""
        results: list[RolloutResult] = []
        results_lock = threading.Lock()
        jobs = self._jobs(plans, max_groups, results, results_lock)

        def worker() -> None:
            while not self.stop.is_set():
                with self._jobs_lock:
                    job = next(jobs, None)
                    if job is not None:
                        with self._active_lock:
                            self._active += 1
                if job is None:
                    return
                try:
                    result = self.run_rollout(job)
                finally:
                    with self._active_lock:
                        self._active -= 1
                if result is None:  # interrupted
                    return
                with results_lock:
                    results.append(result)
                self.on_result(result, False)

        with ThreadPoolExecutor(self.settings.concurrency, thread_name_prefix="rollout") as pool:
            futures = [pool.submit(worker) for _ in range(self.settings.concurrency)]
            try:
                for future in futures:
                    while True:
                        try:
                            future.result(timeout=0.5)  # short waits keep Ctrl-C responsive
                            break
                        except TimeoutError:
                            continue
            except BaseException:
                self.stop.set()
                raise
        return results

    def active_rollouts(self) -> int:
        with self._active_lock:
            return self._active

    def _jobs(self, plans: Iterable[GroupPlan], max_groups: int | None, results: list[RolloutResult],
              results_lock: threading.Lock) -> Iterator[Job]:
        """The rollouts still to run, one group at a time (lazily: plans may be endless)."""
        for count, plan in enumerate(plans):
            if max_groups is not None and count >= max_groups:
                return
            group_id, done = self._open_or_resume(plan)
            with results_lock:
                results.extend(done)
            for result in done:
                self.on_result(result, True)
            missing = Counter(plan.scaffolds) - Counter(result.scaffold for result in done)
            for scaffold in plan.scaffolds:
                if missing[scaffold] > 0:
                    missing[scaffold] -= 1
                    yield Job(plan, group_id, scaffold)

    def fingerprint(self, plan: GroupPlan) -> tuple[str, dict[str, object]]:
        """The digest of what decides the plan's results, and what it was made of (see the module
        docstring)."""
        settings = self.settings
        inputs: dict[str, object] = {
            "task": plan.task.content_hash(),
            "scaffolds": [[name, scaffold_version(name)] for name in plan.scaffolds],
            "sandbox": settings.sandbox,
            "limits": {"agent_timeout_s": self._agent_timeout(plan.task), "max_turns": settings.max_turns,
                       "command_timeout_s": settings.command_timeout_s, "memory_mb": settings.memory_mb,
                       "processes": settings.processes},
            "task_path": settings.task_path,
        }
        if any(name not in MODEL_FREE_SCAFFOLDS for name in plan.scaffolds):
            inputs["model"] = self.model
            inputs["sampling"] = {"max_tokens": settings.max_tokens, "temperature": settings.temperature}
            if not plan.trainable:
                inputs["policy_version"] = self.policy_version
        if plan.task.verifier.kind == "judge":
            inputs["judge"] = [settings.judge_url, settings.judge_model]
        text = json.dumps(inputs, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest(), inputs

    def _open_or_resume(self, plan: GroupPlan) -> tuple[int, list[RolloutResult]]:
        fingerprint, inputs = self.fingerprint(plan)
        group = self.ledger.group_by_key(plan.key, fingerprint=fingerprint)
        if group is None:
            if self.ledger.group_by_key(plan.key) is not None:
                self.changed_plans += 1
                log.info("group %r: its plan changed since it last ran (task, scaffold, sandbox, model or limits); "
                         "running it again", plan.key)
            group_id = self.ledger.open_group(plan.task.id, len(plan.scaffolds), domain=plan.task.domain,
                                              meta={"key": plan.key, "scaffolds": list(plan.scaffolds),
                                                    "fingerprint": fingerprint, "plan": inputs},
                                              trainable=plan.trainable)
            return group_id, []
        if group.size != len(plan.scaffolds) or group.task_id != plan.task.id:
            raise ValueError(f"group {plan.key!r} was planned as {group.size} rollouts of {group.task_id!r}; "
                             f"now {len(plan.scaffolds)} of {plan.task.id!r}")
        for stale in self.ledger.rollouts(group.id, status=RUNNING):  # left by a killed run
            self.ledger.fail_rollout(stale.session_id, INTERRUPTED)
        return group.id, self._done(group.id)

    def _done(self, group_id: int) -> list[RolloutResult]:
        return [RolloutResult.from_json(json.loads(text)) for text in self.ledger.rollout_outcomes(group_id)]

    def finished(self, plans: Iterable[GroupPlan]) -> list[RolloutResult]:
        """Every result these plans have so far (after an interrupted run, say)."""
        groups = (self.ledger.group_by_key(plan.key, fingerprint=self.fingerprint(plan)[0]) for plan in plans)
        return [result for group in groups if group is not None for result in self._done(group.id)]

    # -- one rollout ----------------------------------------------------------------------------

    def run_rollout(self, job: Job) -> RolloutResult | None:
        """Run one rollout to a recorded result, retrying infrastructure failures; None if the run
        was stopped first. A rollout that fails every attempt comes back ``infra_failed``."""
        self.metrics.running.inc()
        try:
            result = self._run_attempts(job)
        finally:
            self.metrics.running.dec()
        if result is not None:
            self.metrics.observe(result)
        return result

    def _run_attempts(self, job: Job) -> RolloutResult | None:
        errors: list[str] = []
        status = InfraFailure.status
        for attempt in range(1, self.settings.infra_retries + 2):
            if self.stop.is_set():
                self._abandon(job, errors)
                return None
            session = f"rollout-{job.group_id}-{secrets.token_hex(5)}"
            self.ledger.start_rollout(session, job.group_id, scaffold=job.scaffold)
            try:
                result, verdict = self._attempt(job, session, attempt)
            except Interrupted:
                self.ledger.fail_rollout(session, INTERRUPTED)
                self._abandon(job, [*errors, INTERRUPTED])
                return None
            except Exception as exc:  # one broken rollout must not end the whole run
                if not isinstance(exc, InfraFailure):
                    log.exception("rollout %s: unexpected error", session)
                    exc = InfraFailure(f"internal error: {type(exc).__name__}: {exc}")
                log.warning("rollout %s (%r, %s) failed (%s): %r", session, job.plan.task.id, job.scaffold,
                            exc.status, str(exc))
                self.ledger.fail_rollout(session, str(exc))
                self.metrics.infra_attempts.labels(job.scaffold).inc()
                errors.append(str(exc)[-2000:])
                status = exc.status
                continue
            result = dataclasses.replace(result, failed_attempts=tuple(errors))
            if self.ledger.finish_rollout(session, verdict.reward, outcome=result.dumps()):
                self.metrics.groups_completed.inc()
            return result
        return RolloutResult(session, job.plan.task.id, job.scaffold, job.group_id, status,
                             details=errors[-1], attempts=len(errors), failed_attempts=tuple(errors[:-1]))

    def _abandon(self, job: Job, errors: list[str]) -> None:
        """Keep the errors of a rollout the run gave up on (a stop), for its report."""
        if errors:
            with self._active_lock:
                self.abandoned_attempts.setdefault((job.plan.task.id, job.scaffold), []).extend(errors)

    def _attempt(self, job: Job, session: str, attempt: int) -> tuple[RolloutResult, Verdict]:
        task, settings = job.plan.task, self.settings
        started = time.monotonic()
        log_path = self.run_dir / "rollouts" / f"{session}.log"
        with open(log_path, "w") as log_file:
            log_file.write(f"task {task.id}  scaffold {job.scaffold}  group {job.group_id}  attempt {attempt}\n")
            sandbox = self._sandbox(task, session, job.scaffold)
            try:
                setup_s = time.monotonic() - started
                agent_started = time.monotonic()
                api_key = self.sessions.issue_session_key(session)
                target = GatewayTarget(self.gateway_url, api_key, self.model, session_id=session)
                outcome = run_scaffold(job.scaffold, task, AgentContext(
                    sandbox=sandbox, target=target, settings=settings, env=self.env,
                    deadline=agent_started + self._agent_timeout(task),
                    calls_made=lambda: self.sessions.call_stats(session).calls,
                    log=log_file, should_stop=self.stop.is_set,
                ))
                agent_s = time.monotonic() - agent_started
                stats = self.sessions.call_stats(session)
                self._check_agent(job, outcome, stats.calls + stats.refused)
                verify_started = time.monotonic()
                try:
                    verdict = verify_in_sandbox(task, sandbox, answer=outcome.answer, verifier=self._verifier(task))
                except VerifierFailed as exc:
                    raise VerifierFailure(str(exc)) from exc
                except VerificationError as exc:
                    raise InfraFailure(f"grading failed: {exc}") from exc
                verify_s = time.monotonic() - verify_started
                log_file.write(f"verdict: reward {verdict.reward:g} {verdict.resolution or ''} {verdict.details}\n"
                               f"{verdict.log[-4000:]}\n")
            finally:
                teardown_started = time.monotonic()
                self._close(sandbox)
            teardown_s = time.monotonic() - teardown_started
        # Read again for the figures: a call the agent cut off is recorded once the gateway has seen
        # the connection close, which may come after the agent phase; its time and tokens count.
        stats = self.sessions.call_stats(session)
        # tools_s: the builtin agent measures its commands; a CLI's own time is what the model did not take
        tools_s = outcome.tools_s if job.scaffold == "builtin" else max(0.0, agent_s - stats.model_s)
        timings = Timings(total_s=time.monotonic() - started, setup_s=setup_s, agent_s=agent_s,
                          model_s=stats.model_s, tools_s=tools_s, verify_s=verify_s, teardown_s=teardown_s)
        result = RolloutResult(
            session_id=session, task_id=task.id, scaffold=job.scaffold, group_id=job.group_id, status="done",
            reward=verdict.reward, solved=verdict.solved,
            resolution=verdict.resolution.value if verdict.resolution is not None else None,
            details=verdict.details, ended_by=outcome.ended_by, attempts=attempt, turns=stats.calls,
            prompt_tokens=stats.prompt_tokens, completion_tokens=stats.completion_tokens, timings=timings,
            log=str(log_path.relative_to(self.run_dir)), cancelled_calls=stats.cancelled,
        )
        return result, verdict

    def _sandbox(self, task: Task, session: str, scaffold: str) -> Sandbox:
        settings = self.settings
        prefix = install_prefix(scaffold)
        expose = (*self.expose, prefix) if prefix is not None else self.expose
        limits = Limits(wall_s=self._agent_timeout(task) + task.verify_timeout_s + VERIFY_MARGIN_S,
                        command_s=max(settings.command_timeout_s, task.verify_timeout_s),
                        # raised for a CLI that cannot start below its floor (OpenClaw's Node workers)
                        memory_mb=max(settings.memory_mb, min_memory_mb(scaffold)), processes=settings.processes)
        # The task's files are made on the host, in a staging folder of the orchestrator's own,
        # and the sandbox seeds its workspace from it (a process sandbox on the same filesystem
        # takes the folder as it is): nothing here touches the sandbox's paths, which may be on
        # another machine (a container).
        staging_root = self.run_dir / "staging"
        staging_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=staging_root, prefix=f"{session}-") as staging:
            try:
                workspace = task.materialize(Path(staging) / "workspace")
            except (WorkspaceError, OSError) as exc:
                raise InfraFailure(f"the workspace could not be made: {exc}") from exc
            try:
                return make_sandbox(settings.sandbox, self.run_dir / "sandboxes", name=session, limits=limits,
                                    source=workspace, move_source=True, keep=settings.keep_workspaces, expose=expose,
                                    workspace_at=task.workdir or None, image=settings.docker_image,
                                    network=settings.docker_network, docker_cli=settings.docker_cli,
                                    pod=settings.k8s)
            except (SandboxError, OSError) as exc:
                raise InfraFailure(f"the sandbox did not start: {exc}") from exc

    def _agent_timeout(self, task: Task) -> float:
        """The task's own agent timeout, or the run's if that is lower."""
        return min(task.agent_timeout_s, self.settings.agent_timeout_s or float("inf"))

    def _check_agent(self, job: Job, outcome: AgentOutcome, calls: int) -> None:
        if outcome.ended_by == STOPPED or self.stop.is_set():  # not graded: redone on resume
            raise Interrupted
        # ``calls`` counts requests the gateway refused too: a scaffold whose prompt does not fit
        # the model's context did reach the model, and fails for a reason retrying cannot fix.
        if outcome.crashed and calls == 0 and job.scaffold not in MODEL_FREE_SCAFFOLDS:
            raise InfraFailure(f"{job.scaffold} failed before its first model call: {outcome.error}")
        if outcome.crashed and job.scaffold == "oracle":  # its reference did not apply: a broken task, no sample
            raise InfraFailure(f"the oracle failed: {outcome.error}")

    def _verifier(self, task: Task):
        return verifier_for(task, judge=self.judge)

    @staticmethod
    def _close(sandbox: Sandbox) -> None:
        try:
            sandbox.close()
        except SandboxError as exc:  # a process that survived SIGKILL: worth a warning, not the run
            log.warning("closing sandbox %s: %s", sandbox.id, exc)


def _configured_judge(settings: RolloutSettings) -> JudgeClient | None:
    if not settings.judge_url:
        return None
    from .verifiers import OpenAIChatClient

    return OpenAIChatClient(settings.judge_url, settings.judge_model or "judge", api_key=settings.judge_api_key)
