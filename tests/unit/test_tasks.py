"""The task model and its loaders, and every task's oracle against an untouched workspace.

Grading runs real ``pytest`` and ``bash`` subprocesses in temporary folders (the sandboxed
version comes with the sandbox): materialise, maybe apply the reference, install the hidden
tests, run the verifier's command, grade. The reference must earn 1.0 and the untouched
workspace 0.0 with its PASS_TO_PASS tests passing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from arborl.rollout.orchestrator import eval_plans
from arborl.rollout.task_loaders import load_dataset, load_harbor_task, load_humaneval, load_swebench_jsonl
from arborl.rollout.task_loaders.builtin import BUILTIN_DIR
from arborl.rollout.tasks import (
    SPLITS,
    FolderSource,
    GitSource,
    InlineFiles,
    Patch,
    TarballSource,
    Task,
    TaskError,
    VerifierSpec,
    WorkspaceError,
    pytest_command,
)
from arborl.rollout.verifiers import CommandOutput, Resolution, Verdict, regex_match, verifier_for
from task_fixtures import CALC_BUGGY, HARBOR_TOML, git, make_swe_repo, malformed_dataset, write_harbor_task

# `python3` in a task's command must be the interpreter running these tests (it has pytest).
ENV = {**os.environ, "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")}
ENV.pop("PYTEST_ADDOPTS", None)


def run_command(command: str, cwd: Path, timeout_s: float) -> CommandOutput:
    try:
        done = subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True, env=ENV,
                              timeout=timeout_s, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired as exc:
        return CommandOutput(124, str(exc.stdout or ""), str(exc.stderr or ""), timed_out=True)
    return CommandOutput(done.returncode, done.stdout, done.stderr)


def verify(task: Task, workspace: Path) -> Verdict:
    task.install_hidden_tests(workspace)
    verifier = verifier_for(task)
    return verifier.grade(task, run_command(verifier.command(task), workspace, task.verify_timeout_s))


def oracle_and_untouched(task: Task, tmp: Path) -> tuple[Verdict, Verdict]:
    solved = task.materialize(tmp / f"{task.id.replace('/', '_')}-oracle")
    task.apply_reference(solved)
    untouched = task.materialize(tmp / f"{task.id.replace('/', '_')}-untouched")
    return verify(task, solved), verify(task, untouched)


def oracle_problems(task: Task, tmp: Path) -> list[str]:
    good, bad = oracle_and_untouched(task, tmp)
    problems = []
    if good.reward != 1.0:
        problems.append(f"{task.id}: the reference earns {good.reward} ({good.details})\n{good.log[-3000:]}")
    if bad.reward != 0.0:
        problems.append(f"{task.id}: the untouched workspace earns {bad.reward} ({bad.details})")
    broken = [test for test in task.pass_to_pass if test not in bad.tests or not bad.tests[test].passed]
    if broken:
        problems.append(f"{task.id}: PASS_TO_PASS tests fail on the untouched workspace: {broken}")
    return problems


# -- SWE-bench-style JSONL ---------------------------------------------------------------------


@pytest.fixture
def swe_repo(tmp_path: Path) -> tuple[Path, str, str, str]:
    return make_swe_repo(tmp_path)


F2P = ["tests/test_add.py::test_add[1-2-3]"]
P2P = ["tests/test_neg.py::test_neg", "tests/test_add.py::test_add[0-0-0]"]


def test_swebench_jsonl_loads_materialises_and_grades(swe_repo, tmp_path):
    repo, base, gold, test_patch = swe_repo
    record = {
        "instance_id": "demo__calc-1", "repo": "demo/calc", "problem_statement": "add() subtracts.",
        "repo_path": "repo", "base_commit": base, "FAIL_TO_PASS": json.dumps(F2P), "PASS_TO_PASS": P2P,
        "patch": gold, "test_patch": test_patch, "difficulty": "<15 min fix", "hints_text": "look at calc.py",
        "test_command": pytest_command(F2P + P2P, isolated=True),
    }
    jsonl = tmp_path / "instances.jsonl"
    jsonl.write_text(json.dumps(record) + "\n\n")
    (task,) = load_swebench_jsonl(jsonl)
    assert (task.id, task.instruction, task.split, task.difficulty, task.domain) == (
        "demo__calc-1", "add() subtracts.", "train", "easy", "demo/calc")
    assert task.fail_to_pass == tuple(F2P) and task.pass_to_pass == tuple(P2P)
    assert task.workspace == GitSource(repo.resolve(), base)
    assert isinstance(task.reference, Patch) and isinstance(task.hidden_tests, Patch)
    assert task.metadata == {"hints_text": "look at calc.py"}

    workspace = task.materialize(tmp_path / "ws")
    assert (workspace / "calc.py").read_text() == CALC_BUGGY  # the base, not the later fix
    assert not (workspace / "tests" / "test_add.py").exists()
    assert git(workspace, "log", "--format=%s").split("\n")[:-1] == [f"base {base[:12]}"]  # no later history

    good, bad = oracle_and_untouched(task, tmp_path)
    assert (good.reward, good.resolution) == (1.0, Resolution.FULL)
    assert (bad.reward, bad.resolution) == (0.0, Resolution.NO)
    assert bad.tests["tests/test_neg.py::test_neg"].passed and not bad.tests[F2P[0]].passed


def test_swebench_defaults_and_other_snapshots(swe_repo, tmp_path):
    repo, base, _, _ = swe_repo
    folder = tmp_path / "snapshot"
    folder.mkdir()
    (folder / "calc.py").write_text(CALC_BUGGY)
    tarball = tmp_path / "snapshot.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(folder / "calc.py", arcname="calc.py")
    records = [
        {"instance_id": "a", "problem_statement": "x", "workspace": "snapshot", "FAIL_TO_PASS": F2P,
         "split": "heldout"},
        {"instance_id": "b", "problem_statement": "x", "workspace": "snapshot.tar.gz", "FAIL_TO_PASS": F2P},
        {"instance_id": "c", "problem_statement": "x", "repo": "repo", "base_commit": base, "FAIL_TO_PASS": F2P},
    ]
    jsonl = tmp_path / "set.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    tasks = {task.id: task for task in load_dataset(str(jsonl))}
    assert isinstance(tasks["a"].workspace, FolderSource) and isinstance(tasks["b"].workspace, TarballSource)
    assert tasks["c"].workspace == GitSource(repo.resolve(), base)
    assert tasks["b"].test_command == pytest_command(F2P)  # a repository's own pytest, not isolated
    assert "--noconftest" not in tasks["b"].test_command
    for task in tasks.values():
        assert (task.materialize(tmp_path / f"ws-{task.id}") / "calc.py").read_text() == CALC_BUGGY
    assert [task.id for task in load_dataset(str(jsonl), split="heldout")] == ["a"]


@pytest.mark.parametrize("record, message", [
    ({"problem_statement": "x", "workspace": ".", "FAIL_TO_PASS": F2P}, "instance_id"),
    ({"instance_id": "a", "problem_statement": "x", "workspace": ".", "FAIL_TO_PASS": "[]"}, "FAIL_TO_PASS is empty"),
    ({"instance_id": "a", "problem_statement": "x", "workspace": ".", "FAIL_TO_PASS": "not json"}, "JSON"),
    ({"instance_id": "a", "problem_statement": "x", "repo": "django/django", "FAIL_TO_PASS": F2P}, "clone"),
    ({"instance_id": "a", "problem_statement": "x", "workspace": ".", "FAIL_TO_PASS": F2P, "split": "dev"}, "split"),
])
def test_swebench_bad_records(tmp_path, record, message):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps(record) + "\n")
    with pytest.raises(TaskError, match=message) as error:
        load_swebench_jsonl(jsonl)
    assert "bad.jsonl:1" in str(error.value)


# -- Harbor-style folders ----------------------------------------------------------------------

@pytest.mark.parametrize("reward_json", [False, True])
def test_harbor_folder_loads_and_grades_without_docker(tmp_path, reward_json):
    folder = write_harbor_task(tmp_path / "tasks" / "greet-file", reward_json=reward_json)
    task = load_harbor_task(folder)
    assert (task.id, task.difficulty, task.domain, task.split) == ("greet-file", "hard", "file-operations", "train")
    assert (task.agent_timeout_s, task.verify_timeout_s, task.verifier.kind) == (900.0, 45.0, "script")
    assert task.metadata["tags"] == ["shell"] and task.metadata["author_name"] == "someone"

    workspace = task.materialize(tmp_path / "ws")
    assert (workspace / "data" / "input.txt").read_text() == "in\n"
    assert not (workspace / "Dockerfile").exists()  # the image recipe is not workspace content

    good, bad = oracle_and_untouched(task, tmp_path)
    assert good.reward == 1.0, good.log
    assert good.details == ("reward.json" if reward_json else "reward.txt")
    assert bad.reward == 0.0
    assert not (tmp_path / "greet-file-oracle" / ".arborl" / "solution").exists()  # removed after use
    # The task's own folder is untouched by the path rewriting (it happened in the workspace copy).
    assert (folder / "tests" / "test.sh").read_text().count("/logs/verifier") >= 2


def test_harbor_dir_and_load_dataset(tmp_path):
    root = tmp_path / "tasks"
    write_harbor_task(root / "one")
    write_harbor_task(root / "two")
    (root / "two" / "task.toml").write_text(HARBOR_TOML + '\n[arborl]\nsplit = "heldout"\n')
    (root / "not-a-task").mkdir()
    assert [t.id for t in load_dataset(str(root))] == ["one", "two"]
    assert [t.id for t in load_dataset(str(root), split="heldout")] == ["two"]
    assert [t.id for t in load_dataset(str(root / "one"))] == ["one"]  # one task folder on its own
    with pytest.raises(TaskError, match="unknown split"):
        load_dataset(str(root), split="validation")
    with pytest.raises(TaskError, match="unknown dataset"):
        load_dataset(str(tmp_path / "missing"))
    with pytest.raises(TaskError, match="no task folders"):
        load_dataset(str(root / "not-a-task"))


def test_harbor_bad_task_toml(tmp_path):
    folder = write_harbor_task(tmp_path / "t")
    (folder / "task.toml").write_text("[agent]\ntimeout_sec = -1\n")
    with pytest.raises(TaskError, match="timeout_sec"):
        load_harbor_task(folder)
    (folder / "task.toml").write_text("[arborl]\nverifier = \"tests\"\n")
    with pytest.raises(TaskError, match="FAIL_TO_PASS"):
        load_harbor_task(folder)
    (folder / "task.toml").write_text("this is = = not toml")
    with pytest.raises(TaskError, match="task.toml"):
        load_harbor_task(folder)


def test_each_malformed_task_is_named_and_skipped_not_fatal(tmp_path):
    root = malformed_dataset(tmp_path / "tasks")
    problems: list[TaskError] = []
    tasks = load_dataset(str(root), problems=problems)
    assert [task.id for task in tasks] == ["no-solution", "sound"]  # a task without solution/ still loads
    said = sorted(str(problem) for problem in problems)
    assert len(said) == 2
    assert f"{root / 'no-instruction'}: no instruction.md" in said[0]
    assert f"{root / 'no-test-sh'}: no tests/test.sh" in said[1]
    # strict (no list to report into): the first bad task ends the load, named the same way
    with pytest.raises(TaskError, match=r"no-instruction: no instruction\.md"):
        load_dataset(str(root))
    # a task that lacks what the oracle needs cannot be planned for it, and says what is missing
    no_solution = next(task for task in tasks if task.id == "no-solution")
    assert no_solution.origin == str(root / "no-solution")
    skipped: list[TaskError] = []
    plans = eval_plans(tasks, ["oracle", "nop"], 1, problems=skipped)
    assert sorted(plan.key for plan in plans) == ["eval/nop/no-solution", "eval/nop/sound", "eval/oracle/sound"]
    [problem] = skipped
    assert f"{root / 'no-solution'}: no solution/solve.sh" in str(problem) and "oracle" in str(problem)
    with pytest.raises(TaskError, match="no solution/solve.sh"):
        eval_plans(tasks, ["oracle"], 1)


# -- the task model ----------------------------------------------------------------------------


def test_task_rejects_bad_definitions():
    workspace = InlineFiles.of({"a.txt": "a"})
    with pytest.raises(TaskError, match="FAIL_TO_PASS"):
        Task("t", "do it", workspace, test_command="pytest")
    with pytest.raises(TaskError, match="split"):
        Task("t", "do it", workspace, VerifierSpec("exact", expected="x"), split="dev")  # type: ignore[arg-type]
    with pytest.raises(TaskError, match="unknown verifier"):
        VerifierSpec("vibes")  # type: ignore[arg-type]
    with pytest.raises(TaskError, match="inside the workspace"):
        InlineFiles.of({"../escape.txt": "x"})


def test_materialize_and_apply_errors(tmp_path):
    task = Task("t", "fix it", InlineFiles.of({"a.txt": "one\n"}), VerifierSpec("exact", expected="x"),
                reference=Patch("--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-something else\n+two\n"))
    workspace = task.materialize(tmp_path / "ws")
    with pytest.raises(WorkspaceError, match="not empty"):
        task.materialize(workspace)
    with pytest.raises(WorkspaceError, match="does not apply"):
        task.apply_reference(workspace)
    assert (workspace / "a.txt").read_text() == "one\n"
    with pytest.raises(TaskError, match="no reference"):
        Task("u", "x", InlineFiles(()), VerifierSpec("exact")).apply_reference(workspace)


def test_patch_applies_in_a_workspace_nested_in_another_repository(tmp_path):
    outer = tmp_path / "project"
    outer.mkdir()
    git(outer, "init", "-q")
    task = Task("t", "fix it", InlineFiles.of({"a.txt": "one\n"}), VerifierSpec("exact", expected="x"),
                reference=Patch("--- a/a.txt\n+++ b/a.txt\n@@ -1 +1 @@\n-one\n+two\n"))
    workspace = task.materialize(outer / "runs" / "ws")
    task.apply_reference(workspace)
    assert (workspace / "a.txt").read_text() == "two\n"


# -- HumanEval and the built-in set ------------------------------------------------------------


def test_humaneval_loads_164_tasks(tmp_path):
    tasks = load_dataset("humaneval")
    assert len(tasks) == 164 and len({t.id for t in tasks}) == 164
    assert {t.split for t in tasks} == {"heldout"} and load_humaneval(split="train") == []
    assert {t.difficulty for t in tasks} == {"easy", "medium", "hard"}
    task = tasks[0]
    workspace = task.materialize(tmp_path / "ws")
    assert (workspace / "solution.py").read_text().startswith("from typing import List")
    assert "def has_close_elements" in (workspace / "solution.py").read_text()
    assert not (workspace / "tests").exists()  # hidden until the agent has exited


HUMANEVAL_SAMPLE = ["HumanEval/0", "HumanEval/32", "HumanEval/38", "HumanEval/53", "HumanEval/129", "HumanEval/163"]


@pytest.mark.parametrize("task_id", HUMANEVAL_SAMPLE)
def test_humaneval_oracle_sample(task_id, tmp_path):
    task = {t.id: t for t in load_humaneval()}[task_id]
    assert oracle_problems(task, tmp_path) == []


def test_builtin_set_shape():
    """Repository tasks graded by hidden tests, and code questions (what does this program
    print?) graded by a regex on the agent's answer, both in each split."""
    tasks = load_dataset("builtin")
    questions = [t for t in tasks if t.domain == "predict-output"]
    repos = [t for t in tasks if t.domain != "predict-output"]
    by_split = {split: [t for t in repos if t.split == split] for split in SPLITS}
    assert 36 <= len(by_split["train"]) <= 48 and 12 <= len(by_split["heldout"]) <= 20
    assert sum(t.split == "train" for t in questions) == 30 and sum(t.split == "heldout" for t in questions) == 12
    assert [t.id for t in load_dataset("builtin", split="heldout")] == [t.id for t in tasks if t.split == "heldout"]
    for split_tasks in by_split.values():
        assert {t.difficulty for t in split_tasks} == {"easy", "medium", "hard"}
    for task in repos:
        assert task.verifier.kind == "tests" and task.fail_to_pass and task.reference is not None
        assert task.source == "builtin" and task.domain
        assert all(test_id.startswith("tests/") for test_id in task.fail_to_pass + task.pass_to_pass)
    for task in questions:
        answer = task.metadata["reference_answer"]
        assert task.verifier.kind == "regex" and task.difficulty == "easy" and task.source == "builtin"
        expected = task.verifier.expected
        assert regex_match(answer, expected) and regex_match(f"It prints {answer}.", expected)
        assert not regex_match(f"{answer}0", task.verifier.expected) and not regex_match("", task.verifier.expected)
    size = sum(path.stat().st_size for path in BUILTIN_DIR.rglob("*") if path.is_file())
    assert size < 1_000_000


BUILTIN_SAMPLE = ["write-hello", "edit-config-value", "rename-by-extension", "count-words", "fix-import-error",
                  "fix-wrong-test", "add-done-command", "implement-queue", "fix-order-tax", "hello-script"]


@pytest.mark.parametrize("task_id", BUILTIN_SAMPLE)
def test_builtin_oracle_sample(task_id, tmp_path):
    task = {t.id: t for t in load_dataset("builtin")}[task_id]
    assert oracle_problems(task, tmp_path) == []


def _all_oracles(tasks: list[Task], tmp: Path) -> list[str]:
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return [problem for problems in pool.map(lambda task: oracle_problems(task, tmp), tasks)
                for problem in problems]


@pytest.mark.slow
def test_every_builtin_task_oracle_solves_and_untouched_fails(tmp_path):
    # the repository tasks; the questions' reference answers are graded through the orchestrator
    # (test_orchestrator's oracle and nop on the whole set)
    repos = [task for task in load_dataset("builtin") if task.reference is not None]
    assert _all_oracles(repos, tmp_path) == []


@pytest.mark.slow
def test_every_humaneval_task_oracle_solves_and_untouched_fails(tmp_path):
    assert _all_oracles(load_humaneval(), tmp_path) == []


def test_isolated_pytest_ignores_a_workspace_that_games_the_run(tmp_path):
    """A conftest.py that passes every test, an ini file, and a module shadowing pytest itself."""
    task = {t.id: t for t in load_dataset("builtin")}["fix-add"]
    workspace = task.materialize(tmp_path / "ws")
    (workspace / "conftest.py").write_text(
        "import pytest\n\n\n@pytest.hookimpl(hookwrapper=True)\ndef pytest_runtest_makereport(item, call):\n"
        "    outcome = yield\n    outcome.get_result().outcome = 'passed'\n")
    (workspace / "pytest.ini").write_text("[pytest]\naddopts = --deselect tests/test_calc.py::test_add\n")
    (workspace / "pytest.py").write_text("print('PASSED tests/test_calc.py::test_add')\n")
    verdict = verify(task, workspace)
    assert verdict.reward == 0.0 and not verdict.tests["tests/test_calc.py::test_add"].passed
