"""The rollout orchestrator end to end: real sandboxes, a real gateway, the real verifiers.

Agents are arborl's builtin agent talking to a live gateway whose policy is a script (so a test
can make it solve, fail, misbehave or attack), and the model-free ``oracle`` and ``nop``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent_cli import scripted_gateway
from arborl.gateway.tool_parsers import get_parser
from arborl.rollout.orchestrator import GroupPlan, InfraFailure, Orchestrator, eval_plans, training_plans
from arborl.rollout.results import RolloutResult
from arborl.rollout.sandboxes import bwrap_unavailable_reason, docker_unavailable_reason
from arborl.rollout.sandboxes.uid_pool import UID_POOL_BASE, UID_POOL_SIZE
from arborl.rollout.settings import RolloutSettings
from arborl.rollout.store import DONE, INFRA_FAILED, RunLedger
from arborl.rollout.task_loaders import load_dataset
from arborl.rollout.tasks import InlineFiles, Task, VerifierSpec
from task_fixtures import write_app_task

HERMES = get_parser("hermes")
BWRAP_MISSING = bwrap_unavailable_reason()
KINDS = ["local", pytest.param("bwrap", marks=pytest.mark.skipif(BWRAP_MISSING is not None, reason=str(BWRAP_MISSING)))]
# containers too where an engine answers (.ci/run: podman, tests/podman_docker): the same rollouts
DOCKER = {"docker_image": os.environ.get("ARBORL_TEST_DOCKER_IMAGE", "debian:stable-slim"),
          "docker_cli": os.environ.get("ARBORL_TEST_DOCKER_CLI", "docker")}
DOCKER_MISSING = docker_unavailable_reason(DOCKER["docker_cli"])
WITH_DOCKER = [*KINDS, pytest.param("docker", marks=pytest.mark.skipif(DOCKER_MISSING is not None,
                                                                       reason=str(DOCKER_MISSING)))]


def kind_settings(kind: str) -> dict[str, str]:
    return {"sandbox": kind, **(DOCKER if kind == "docker" else {})}
HUMANEVAL = {task.id: task for task in load_dataset("humaneval")}
BUILTIN = load_dataset("builtin")


def sandbox_processes() -> list[int]:
    """Live processes of any rollout sandbox: a sandbox uid, or a rollout's environment mark."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            status = Path(f"/proc/{name}/status").read_text()
            environ = Path(f"/proc/{name}/environ").read_bytes()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if fields["State"].split()[0] in ("Z", "X"):
            continue
        uids = {int(uid) for uid in fields["Uid"].split()}
        if b"ARBORL_SANDBOX_ID=rollout-" in environ or any(UID_POOL_BASE <= uid < UID_POOL_BASE + UID_POOL_SIZE
                                                             for uid in uids):
            found.append(int(name))
    return found


def tool_turn(prompt: str) -> int:
    return prompt.count("<tool_response>") + prompt.count("Output of your command:")


def call(name: str, **arguments: str) -> str:
    return HERMES.format_call(name, arguments)


def reference_text(task: Task) -> dict[str, str]:
    assert isinstance(task.reference, InlineFiles)
    return dict(task.reference.files)


@contextlib.contextmanager
def orchestrated(model_dir: Path, root: Path, script: Callable[[str], str], **settings) -> Iterator[Orchestrator]:
    root.mkdir(mode=0o711, exist_ok=True)
    with scripted_gateway(model_dir, root, script) as gateway:
        ledger = RunLedger(gateway.store)
        yield Orchestrator(ledger, root / "run", gateway.url, "tiny", settings=RolloutSettings(**settings))
        gateway.store.close()


# -- the verifiers discriminate, through the orchestrator --------------------------------------


@pytest.mark.parametrize("kind", WITH_DOCKER)
def test_oracle_scores_all_and_nop_nothing_on_a_sample(kind, tiny_model_dir, run_root):
    tasks = [BUILTIN[0], BUILTIN[len(BUILTIN) // 2], BUILTIN[-1], HUMANEVAL["HumanEval/0"], HUMANEVAL["HumanEval/163"]]
    settings = {"concurrency": 2, **kind_settings(kind)}
    with orchestrated(tiny_model_dir, run_root, lambda prompt: "", **settings) as orchestrator:
        orchestrator.preflight(tasks)
        results = orchestrator.run(eval_plans(tasks, ["oracle", "nop"], 1))
        assert {(r.task_id, r.scaffold): r.reward for r in results} == {
            **{(task.id, "oracle"): 1.0 for task in tasks}, **{(task.id, "nop"): 0.0 for task in tasks}}
        assert all(r.status == "done" and r.attempts == 1 and r.turns == 0 for r in results)
        assert not sandbox_processes()


@pytest.mark.slow
@pytest.mark.parametrize(("dataset", "kind"), [("builtin", "bwrap"), ("humaneval", "local")])
def test_oracle_scores_100_and_nop_0_on_whole_sets(dataset, kind, tiny_model_dir, run_root):
    if kind == "bwrap" and BWRAP_MISSING:
        pytest.skip(BWRAP_MISSING)
    tasks = BUILTIN if dataset == "builtin" else list(HUMANEVAL.values())
    with orchestrated(tiny_model_dir, run_root, lambda prompt: "", sandbox=kind, concurrency=2) as orchestrator:
        results = orchestrator.run(eval_plans(tasks, ["oracle", "nop"], 1))
    wrong = [(r.task_id, r.scaffold, r.reward, r.details) for r in results
             if r.reward != (1.0 if r.scaffold == "oracle" else 0.0)]
    assert len(results) == 2 * len(tasks) and not wrong


# -- the builtin agent through the gateway -----------------------------------------------------


def solve_humaneval(task: Task) -> Callable[[str], str]:
    solution = reference_text(task)["solution.py"]

    def script(prompt: str) -> str:
        if tool_turn(prompt) == 0:
            return "I will write the solution.\n" + call("write_file", path="solution.py", content=solution)
        if tool_turn(prompt) == 1:
            return call("bash", command="python3 -c 'import solution; print(\"imported\")'")
        return "Done.\n" + call("submit")

    return script


@pytest.mark.parametrize("kind", WITH_DOCKER)
def test_builtin_agent_solves_through_the_gateway_and_is_recorded(kind, tiny_model_dir, run_root):
    task = HUMANEVAL["HumanEval/2"]
    settings = {"group_size": 2, **kind_settings(kind)}
    with orchestrated(tiny_model_dir, run_root, solve_humaneval(task), **settings) as orchestrator:
        [plan] = list(training_plans([task], orchestrator.settings, rounds=1))
        results = orchestrator.run([plan])
        ledger = orchestrator.ledger
        assert [r.reward for r in results] == [1.0, 1.0]
        for result in results:
            assert (result.ended_by, result.turns, result.status) == ("submitted", 3, "done")
            assert result.prompt_tokens > 0 and result.completion_tokens > 0
            assert result.timings.model_s > 0 and result.timings.tools_s > 0
            calls = ledger.training_calls(result.session_id)
            assert len(calls) == 3
            # the command's output came back to the model, and the three calls are one trie path
            assert "imported" in json.dumps(calls[2].messages)
            trie = orchestrator.store.trie(result.session_id)
            first, later = trie.path(calls[0].node_id), trie.path(calls[2].node_id)
            assert later[:len(first)] == first  # the first call's prompt and reply lead into the last's
            lines = (run_root / "run" / result.log).read_text().splitlines()
            assert sum(line.startswith("turn ") for line in lines) == 3 and "verdict: reward 1" in "\n".join(lines)
        [group] = ledger.pending_groups()  # complete: the learner can take it
        assert group.task_id == task.id and group.size == 2


def run_scripted(task: Task, replies: list[str], model_dir: Path, root: Path) -> tuple[RolloutResult, list[str]]:
    """One builtin-agent rollout whose model gives ``replies`` in turn; the result and the
    prompts the model saw."""
    seen: list[str] = []

    def script(prompt: str) -> str:
        seen.append(prompt)
        return replies[len(seen) - 1]

    with orchestrated(model_dir, root, script) as orchestrator:
        [result] = orchestrator.run(eval_plans([task], ["builtin"], 1))
    return result, seen


def test_builtin_agent_tolerates_imperfect_tool_calls(tiny_model_dir, run_root):
    task = HUMANEVAL["HumanEval/2"]
    solution = reference_text(task)["solution.py"]
    replies = [
        "<tool_call>\n{\"name\": \"bash\", \"arguments\": {\"command\": \"ls\"\n</tool_call>",  # broken JSON
        call("delete_everything", path="."),  # no such tool
        call("write_file", path="solution.py"),  # a required argument missing
        "```bash\necho from-a-fenced-block > seen.txt\n```",  # a command written as text
        call("create_file", file_path="solution.py", text=solution),  # near-miss tool and argument names
        call("finish"),
    ]
    result, seen = run_scripted(task, replies, tiny_model_dir, run_root)
    assert (result.reward, result.turns, result.ended_by) == (1.0, 6, "submitted")
    assert "tool call could not be read" in seen[1]  # the gateway could not parse it: the model is told
    assert "no tool named 'delete_everything'" in seen[2]
    assert "needs the argument(s) content" in seen[3]
    assert "Output of your command:" in seen[4] and "exit code 0" in seen[4]


def test_a_reply_in_prose_ends_the_builtin_agent_with_that_answer(tiny_model_dir, run_root):
    task = HUMANEVAL["HumanEval/2"]
    replies = [call("bash", command="ls"), "The function is already correct, nothing to change."]
    result, seen = run_scripted(task, replies, tiny_model_dir, run_root)
    assert (result.turns, result.ended_by, result.reward) == (2, "submitted", 0.0)
    assert len(seen) == 2  # no third call: the prose was the final answer
    assert "ended: submitted after 2 turns" in (run_root / "run" / result.log).read_text()


def test_turn_and_time_limits_end_the_agent_and_still_grade(tiny_model_dir, run_root):
    task = HUMANEVAL["HumanEval/2"]
    with orchestrated(tiny_model_dir, run_root, lambda prompt: call("bash", command="sleep 0.1"),
                      max_turns=3) as orchestrator:
        [limited] = orchestrator.run(eval_plans([task], ["builtin"], 1, prefix="turns"))
    assert (limited.ended_by, limited.turns, limited.reward, limited.status) == ("turn_limit", 3, 0.0, "done")
    with orchestrated(tiny_model_dir, run_root / "t", lambda prompt: call("bash", command="sleep 30"),
                      agent_timeout_s=2.0) as orchestrator:
        [timed] = orchestrator.run(eval_plans([task], ["builtin"], 1, prefix="time"))
    assert (timed.ended_by, timed.reward, timed.status) == ("time_limit", 0.0, "done")
    assert timed.timings.agent_s < 10
    assert not sandbox_processes()


@pytest.mark.parametrize("kind", KINDS)
def test_an_agent_that_does_what_a_harbor_instruction_says_in_app_is_graded_right(kind, tiny_model_dir, run_root):
    # The agent takes the instruction at its word: the folder it names is where the files are,
    # and where the tests look (bwrap puts the workspace at /app; local names its own folder).
    task = load_dataset(str(write_app_task(run_root / "tasks" / "hello-script")))[0]
    seen: list[str] = []

    def script(prompt: str) -> str:
        seen.append(prompt)
        folder = re.search(r"script\s+(\S+)/hello\.sh", prompt).group(1)
        turn = tool_turn(prompt)
        if turn == 0:
            script = f"#!/bin/bash\ncd {folder} && python3 greet.py\n"
            return call("write_file", path=f"{folder}/hello.sh", content=script)
        if turn == 1:
            return call("bash", command=f"chmod +x {folder}/hello.sh && cd / && {folder}/hello.sh")
        return call("submit")

    with orchestrated(tiny_model_dir, run_root, script, sandbox=kind) as orchestrator:
        [result] = orchestrator.run(eval_plans([task], ["builtin"], 1))
    assert "hello from greet.py" in seen[-1]  # the script the agent wrote ran where the instruction said
    assert (result.status, result.reward) == ("done", 1.0), result.details
    if kind == "bwrap":
        assert "In /app there is a program" in seen[0]  # the instruction as the task wrote it
    assert not sandbox_processes()


# -- isolation and limits ----------------------------------------------------------------------

ADMIN_TOKEN = "admin-token-that-must-not-leak-7f3a"


@pytest.mark.skipif(BWRAP_MISSING is not None, reason=str(BWRAP_MISSING))
def test_bwrap_agent_cannot_see_other_workspaces_the_run_folder_or_the_admin_token(
        tiny_model_dir, run_root, monkeypatch):
    # The gateway's admin token sits where `arborl serve` keeps it: this process's environment.
    monkeypatch.setenv("ARBORL_GATEWAY__ADMIN_TOKEN", ADMIN_TOKEN)
    run_dir = run_root / "run"
    probes = [
        f"ls {run_dir}/sandboxes; cat {run_dir}/sandboxes/*/workspace/secret.txt",  # another rollout's workspace
        f"ls {run_dir}; head -c 100 {run_dir}/store.sqlite",  # the run folder and the store
        "env; cat /proc/*/environ 2>&1 | tr '\\0' '\\n' | grep -a ARBORL_",  # the gateway's environment
        f"grep -rla {ADMIN_TOKEN[:12]} /home /tmp /workspace /etc /run 2>/dev/null | head -3; echo searched",
    ]
    outputs: dict[str, list[str]] = {}

    def script(prompt: str) -> str:
        turn = tool_turn(prompt)
        session = "first" if "write-secret" in prompt else "second"
        if turn > 0:
            outputs.setdefault(session, []).append(prompt.rsplit("<tool_response>", 1)[-1])
        if session == "first":
            return call("bash", command="echo top-secret > secret.txt") if turn == 0 else call("submit")
        return call("bash", command=probes[turn]) if turn < len(probes) else call("submit")

    writer = Task("write-secret", "write-secret", InlineFiles(()), VerifierSpec("exact", expected="x"))
    reader = Task("read-others", "read what you can", InlineFiles(()), VerifierSpec("exact", expected="x"))
    with orchestrated(tiny_model_dir, run_root, script, sandbox="bwrap", keep_workspaces=True) as orchestrator:
        orchestrator.run([GroupPlan("w", writer, ("builtin",))])
        assert list((run_dir / "sandboxes").glob("*/workspace/secret.txt"))  # it is there, on the host
        orchestrator.run([GroupPlan("r", reader, ("builtin",))])
        store = orchestrator.store
        recorded = json.dumps([call.messages for session in store.sessions() for call in store.calls(session["id"])])
    seen = "".join(outputs["second"])
    assert "top-secret" not in seen and "SQLite format" not in seen
    assert seen.count("No such file or directory") >= 3  # other workspaces, the run folder, the store
    assert ADMIN_TOKEN not in seen and ADMIN_TOKEN not in recorded
    assert "searched" in seen
    assert not sandbox_processes()


@pytest.mark.parametrize("kind", KINDS)
def test_fork_bomb_and_endless_loop_are_stopped_and_leave_nothing(kind, tiny_model_dir, run_root):
    task = HUMANEVAL["HumanEval/2"]
    commands = [":(){ :|:& };:", "nohup sh -c 'while true; do :; done' >/dev/null 2>&1 & echo started",
                "while true; do :; done"]

    def script(prompt: str) -> str:
        turn = tool_turn(prompt)
        return call("bash", command=commands[turn]) if turn < len(commands) else call("submit")

    with orchestrated(tiny_model_dir, run_root, script, sandbox=kind, command_timeout_s=3.0, processes=64,
                      memory_mb=512) as orchestrator:
        [result] = orchestrator.run(eval_plans([task], ["builtin"], 1))
    assert (result.status, result.ended_by, result.reward) == ("done", "submitted", 0.0)
    assert result.timings.tools_s < 30
    assert not sandbox_processes()


# -- infrastructure failures, interruption and resume ------------------------------------------


class FlakySandboxes(Orchestrator):
    """Fault injection: the first ``failures`` sandboxes do not start."""

    failures = 1

    def _sandbox(self, task, session, scaffold):
        if self.failures > 0:
            self.failures -= 1
            raise InfraFailure("the sandbox did not start: injected fault")
        return super()._sandbox(task, session, scaffold)


def test_infrastructure_failures_are_retried_and_never_trained_on(tiny_model_dir, run_root):
    task = HUMANEVAL["HumanEval/2"]
    with scripted_gateway(tiny_model_dir, run_root, solve_humaneval(task)) as gateway:
        ledger = RunLedger(gateway.store)
        orchestrator = FlakySandboxes(ledger, run_root / "run", gateway.url, "tiny",
                                      settings=RolloutSettings(group_size=2, concurrency=1))
        results = orchestrator.run([GroupPlan("infra", task, ("builtin", "builtin"))])
        assert [(r.status, r.reward, r.attempts) for r in results] == [("done", 1.0, 2), ("done", 1.0, 1)]
        [group] = ledger.pending_groups()
        assert [r.status for r in ledger.rollouts(group.id, status=INFRA_FAILED)] == [INFRA_FAILED]
        metric = orchestrator.metrics.registry.get_sample_value
        assert metric("arborl_rollouts_total", {"scaffold": "builtin", "outcome": "solved"}) == 2
        assert metric("arborl_rollout_infra_failures_total", {"scaffold": "builtin"}) == 1
        assert metric("arborl_groups_completed_total") == 1 and metric("arborl_rollouts_running") == 0
        trained = {r.session_id for r in ledger.rollouts(group.id, status=DONE)}
        assert trained == {r.session_id for r in results}

        # A scaffold that cannot reach the model fails before its first call: retried, then given up.
        dead = Orchestrator(ledger, run_root / "run", "http://127.0.0.1:9", "tiny",
                            settings=RolloutSettings(infra_retries=1))
        [lost] = dead.run(eval_plans([task], ["builtin"], 1, prefix="dead"))
        assert (lost.status, lost.attempts) == ("infra_failed", 2)
        assert "before its first model call" in lost.details
        dead_group = ledger.group_by_key(f"dead/builtin/{task.id}")
        assert dead_group is not None and dead_group.completed_at is None  # never reaches the learner
        assert all(not ledger.training_calls(r.session_id) for r in ledger.rollouts(dead_group.id, status=INFRA_FAILED))
        gateway.store.close()


def test_interrupted_eval_resumes_without_redoing_finished_rollouts(tiny_model_dir, run_root):
    tasks = [HUMANEVAL[f"HumanEval/{n}"] for n in range(4)]
    plans = eval_plans(tasks, ["oracle"], 2)
    with scripted_gateway(tiny_model_dir, run_root, lambda prompt: "") as gateway:
        ledger = RunLedger(gateway.store)
        first = Orchestrator(ledger, run_root / "run", gateway.url, "tiny", settings=RolloutSettings(concurrency=1))
        finished: list[str] = []

        def stop_after_three(result, resumed):
            finished.append(result.session_id)
            if len(finished) == 3:
                first.stop.set()

        first.on_result = stop_after_three
        assert len(first.run(plans)) == 3
        # a process killed mid-rollout leaves its rollout "running"
        killed_group = ledger.group_by_key(plans[1].key)  # the group the stop cut in half
        assert killed_group is not None
        ledger.start_rollout("rollout-killed", killed_group.id, scaffold="oracle")

        resumed_results: list[tuple[str, bool]] = []
        second = Orchestrator(ledger, run_root / "run", gateway.url, "tiny", settings=RolloutSettings(concurrency=2),
                              on_result=lambda result, resumed: resumed_results.append((result.session_id, resumed)))
        results = second.run(plans)
        assert len(results) == 8 and all(r.reward == 1.0 for r in results)
        assert sorted(s for s, resumed in resumed_results if resumed) == sorted(finished)
        assert len([s for s, resumed in resumed_results if not resumed]) == 5
        assert [r.status for r in ledger.rollouts(killed_group.id, status=INFRA_FAILED)] == [INFRA_FAILED]
        assert all(len(ledger.rollouts(ledger.group_by_key(plan.key).id)) == 2 for plan in plans)
        gateway.store.close()


def test_stop_interrupts_a_running_agent(tiny_model_dir, run_root):
    task = HUMANEVAL["HumanEval/2"]
    started = threading.Event()

    def script(prompt: str) -> str:
        started.set()
        return call("bash", command="sleep 1")

    with orchestrated(tiny_model_dir, run_root, script) as orchestrator:
        timer = threading.Thread(target=lambda: started.wait(30) and orchestrator.stop.set())
        timer.start()
        assert orchestrator.run(eval_plans([task], ["builtin"], 1)) == []
        timer.join()
        [group] = [orchestrator.ledger.group_by_key(f"eval/builtin/{task.id}")]
        assert [r.status for r in orchestrator.ledger.rollouts(group.id, status=INFRA_FAILED)] == [INFRA_FAILED]
        assert orchestrator.abandoned_attempts == {(task.id, "builtin"): ["interrupted"]}  # for the report
    assert not sandbox_processes()


def test_training_plans_mix_scaffolds_by_weight_and_are_deterministic():
    settings = RolloutSettings(scaffolds={"builtin": 3.0, "nop": 1.0, "oracle": 0.0}, group_size=4, seed=7)
    plans = list(training_plans(BUILTIN[:10], settings, rounds=5))
    again = list(training_plans(BUILTIN[:10], settings, rounds=5))
    assert plans == again and len({plan.key for plan in plans}) == 50
    drawn = [name for plan in plans for name in plan.scaffolds]
    assert "oracle" not in drawn and 0.6 < drawn.count("builtin") / len(drawn) < 0.9
    assert {plan.task.id for plan in plans[:10]} == {task.id for task in BUILTIN[:10]}  # a round covers every task


def test_a_plans_fingerprint_covers_what_decides_its_results(run_root):
    from arborl.rollout.store import SqliteTrajectoryStore

    store = SqliteTrajectoryStore(run_root / "store.sqlite")
    ledger = RunLedger(store)

    def fingerprint(plan: GroupPlan, *, model: str = "m", version: int | None = 3, **settings) -> str:
        orchestrator = Orchestrator(ledger, run_root / "run", "http://127.0.0.1:9", model,
                                    settings=RolloutSettings(**settings), policy_version=version)
        return orchestrator.fingerprint(plan)[0]

    task = HUMANEVAL["HumanEval/2"]
    [builtin] = eval_plans([task], ["builtin"], 1)
    [oracle] = eval_plans([task], ["oracle"], 1)
    [training] = list(training_plans([task], RolloutSettings(group_size=2), rounds=1))
    base = fingerprint(builtin)
    assert fingerprint(builtin) == base  # deterministic: a rerun finds its groups
    for changed in ({"sandbox": "bwrap"}, {"max_turns": 7}, {"agent_timeout_s": 30.0}, {"memory_mb": 1024},
                    {"max_tokens": 64}, {"temperature": 0.5}, {"model": "other"}, {"version": 4}):
        assert fingerprint(builtin, **changed) != base, changed
    [other_task] = eval_plans([HUMANEVAL["HumanEval/3"]], ["builtin"], 1)
    assert fingerprint(other_task) != base and fingerprint(oracle) != base
    # the oracle uses no model: which one is served, and its version, decide nothing
    assert fingerprint(oracle, model="other", version=9) == fingerprint(oracle)
    # a training group is on-policy at whatever version serves it
    assert fingerprint(training, version=9) == fingerprint(training)
    assert fingerprint(training, model="other") != fingerprint(training)
    store.close()


def test_a_judge_graded_task_through_a_configured_judge(tiny_model_dir, run_root):
    from arborl.rollout.orchestrator import OrchestratorError

    task = Task("haiku", "Write a haiku about trees.", InlineFiles(()), VerifierSpec("judge", rubric="a haiku"))

    def script(prompt: str) -> str:
        if "rubric" in prompt.lower():  # the judge's request
            return "The answer is a haiku. Score: 1"
        return call("submit", answer="roots under the snow")

    with orchestrated(tiny_model_dir, run_root, script) as orchestrator:
        with pytest.raises(OrchestratorError, match="judge_url"):
            orchestrator.preflight([task])
        judged = Orchestrator(orchestrator.ledger, run_root / "run", orchestrator.gateway_url, "tiny",
                              settings=RolloutSettings(judge_url=orchestrator.gateway_url + "/v1", judge_model="tiny"))
        judged.preflight([task])
        [result] = judged.run(eval_plans([task], ["builtin"], 1))
    assert (result.status, result.reward, result.details) == ("done", 1.0, "judge score 1")
