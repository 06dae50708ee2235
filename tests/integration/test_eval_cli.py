"""`arborl eval` and `arborl rollout` as a user runs them: datasets written here in the Harbor
and SWE-bench formats, a gateway in the process (or a running one), sandboxes, the report, and
resuming."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from agent_cli import SCRIPTED_ADMIN_TOKEN, scripted_gateway
from arborl.gateway.tool_parsers import get_parser
from arborl.ops.cli import main
from arborl.ops.eval_report import load_results
from arborl.rollout.store import RunLedger, SqliteTrajectoryStore
from arborl.rollout.tasks import pytest_command
from arborl.rollout.verifiers import Resolution
from task_fixtures import git, malformed_dataset, write_app_task, write_harbor_task

HERMES = get_parser("hermes")


def harbor_tasks(root: Path) -> Path:
    write_harbor_task(root / "greet-txt")
    write_harbor_task(root / "greet-json", reward_json=True)
    return root


def test_eval_runs_a_harbor_folder_reports_and_resumes(run_root, capsys):
    dataset = harbor_tasks(run_root / "tasks")
    run = run_root / "run"
    argv = ["eval", "--dataset", str(dataset), "--scaffold", "oracle,nop", "--k", "2", "--run-dir", str(run),
            "--model", "tiny-random-llama", "--sandbox", "local"]
    main(argv)
    out = capsys.readouterr().out
    results = load_results(run / "eval" / "results.json")
    assert sorted((r.task_id, r.scaffold, r.reward) for r in results) == sorted(
        [(t, "oracle", 1.0) for t in ("greet-txt", "greet-txt", "greet-json", "greet-json")]
        + [(t, "nop", 0.0) for t in ("greet-txt", "greet-txt", "greet-json", "greet-json")])
    assert "pass rates" in out and "oracle" in out and "100.0%" in out
    html = (run / "eval" / "report.html").read_text()
    assert "greet-json" in html and "greet-txt" in html
    for result in results:
        assert (run / result.log).is_file()

    main(argv)  # everything finished: the second run redoes nothing
    out = capsys.readouterr().out
    assert out.count("(done before)") == 8
    store = SqliteTrajectoryStore(run / "store.sqlite")
    assert store.query("SELECT COUNT(*) FROM rollouts")[0][0] == 8
    assert RunLedger(store).pending_groups() == []  # an evaluation's groups are never trained on
    store.close()


CALC = "def add(a, b):\n    return a - b\n\n\ndef neg(a):\n    return a\n"
TESTS = ("import pytest\nfrom calc import add, neg\n\n\n@pytest.mark.parametrize('a, b, total', [(1, 2, 3), "
         "(0, 0, 0)])\ndef test_add(a, b, total):\n    assert add(a, b) == total\n\n\ndef test_neg():\n"
         "    assert neg(2) == -2\n")
F2P = ["tests/test_calc.py::test_add[1-2-3]", "tests/test_calc.py::test_neg"]
P2P = ["tests/test_calc.py::test_add[0-0-0]"]


def swebench_jsonl(root: Path) -> Path:
    """One instance: two bugs, two FAIL_TO_PASS tests added by the test patch."""
    repo = root / "repo"
    repo.mkdir(parents=True)
    (repo / "calc.py").write_text(CALC)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    base = git(repo, "rev-parse", "HEAD").strip()
    (repo / "calc.py").write_text(CALC.replace("a - b", "a + b").replace("return a\n", "return -a\n"))
    gold = git(repo, "diff")
    git(repo, "checkout", "-q", "calc.py")
    (repo / "tests").mkdir()
    (repo / "tests" / "test_calc.py").write_text(TESTS)
    git(repo, "add", "-A")
    test_patch = git(repo, "diff", "--cached")
    git(repo, "reset", "-q", "--hard", base)
    record = {"instance_id": "demo__calc-2", "problem_statement": "add() subtracts and neg() does nothing.",
              "repo_path": str(repo), "base_commit": base, "FAIL_TO_PASS": F2P, "PASS_TO_PASS": P2P, "patch": gold,
              "test_patch": test_patch, "test_command": pytest_command(F2P + P2P, isolated=True)}
    path = root / "instances.jsonl"
    path.write_text(json.dumps(record) + "\n")
    return path


def fix_add_only(prompt: str) -> str:
    if prompt.count("<tool_response>") == 0:
        return HERMES.format_call("edit", {"path": "calc.py", "old": "return a - b", "new": "return a + b"})
    return HERMES.format_call("submit", {})


@pytest.mark.parametrize("kind", ["local", "bwrap"])
def test_eval_against_a_running_gateway_grades_a_swebench_partial(kind, tiny_model_dir, run_root, capsys):
    from arborl.rollout.sandboxes import bwrap_unavailable_reason

    if kind == "bwrap" and bwrap_unavailable_reason():
        pytest.skip(bwrap_unavailable_reason())
    jsonl = swebench_jsonl(run_root / "data")
    with scripted_gateway(tiny_model_dir, run_root, fix_add_only) as gateway:
        main(["eval", "--dataset", str(jsonl), "--scaffold", "builtin,oracle,nop", "--gateway", gateway.url,
              "--admin-token", SCRIPTED_ADMIN_TOKEN, "--run-dir", str(run_root / "run"), "--sandbox", kind])
        gateway.store.close()
    results = {r.scaffold: r for r in load_results(run_root / "run" / "eval" / "results.json")}
    assert (results["builtin"].reward, results["builtin"].resolution) == (0.5, Resolution.PARTIAL.value)
    assert (results["oracle"].reward, results["oracle"].resolution) == (1.0, Resolution.FULL.value)
    assert (results["nop"].reward, results["nop"].resolution) == (0.0, Resolution.NO.value)
    assert "FAIL_TO_PASS 1/2" in results["builtin"].details
    html = (run_root / "run" / "eval" / "report.html").read_text()
    assert f"tries/{results['builtin'].session_id}.html" in html
    assert (run_root / "run" / "eval" / "tries" / f"{results['builtin'].session_id}.html").is_file()


def test_rollout_makes_groups_for_the_learner_and_continues(run_root, capsys):
    dataset = harbor_tasks(run_root / "tasks")
    run = run_root / "run"
    base = ["rollout", "--dataset", str(dataset), "--scaffold", "oracle:1,nop:1", "--group-size", "3",
            "--run-dir", str(run), "--model", "tiny-random-llama"]
    main([*base, "--groups", "2"])
    assert "2 complete groups wait for the learner" in capsys.readouterr().out
    main([*base, "--groups", "3"])  # the first two groups are found again; only the third runs
    out = capsys.readouterr().out
    assert out.count("(done before)") == 6 and "3 complete groups" in out
    store = SqliteTrajectoryStore(run / "store.sqlite")
    ledger = RunLedger(store)
    groups = ledger.pending_groups()
    assert len(groups) == 3 and all(group.size == 3 for group in groups)
    assert store.query("SELECT COUNT(*) FROM rollouts")[0][0] == 9
    store.close()


def test_bad_invocations_say_what_is_wrong(run_root, capsys):
    with pytest.raises(SystemExit, match="unknown scaffold 'gpt-pilot'"):
        main(["eval", "--dataset", "builtin", "--scaffold", "builtin,gpt-pilot"])
    with pytest.raises(SystemExit, match="no task nope"):
        main(["eval", "--dataset", "builtin", "--tasks", "nope", "--run-dir", str(run_root / "r")])
    with pytest.raises(SystemExit, match=r"no task of difficulty eassy in builtin \(it has easy, hard, medium\)"):
        main(["eval", "--dataset", "builtin", "--difficulty", "eassy,hard", "--run-dir", str(run_root / "r")])
    with pytest.raises(SystemExit, match="give the gateway's store"):
        main(["eval", "--dataset", "builtin", "--gateway", "http://127.0.0.1:9", "--run-dir", str(run_root / "r")])
    with pytest.raises(SystemExit):
        main(["eval", "--dataset", str(run_root / "missing.jsonl")])


@pytest.mark.slow
def test_eval_of_a_humaneval_subset_with_the_default_model(run_root, capsys, monkeypatch):
    # The acceptance run: the builtin agent, the default model served in the process, a
    # short budget per rollout so it fits the suite (two calls of at most 96 tokens).
    monkeypatch.setenv("ARBORL_ROLLOUT__MAX_TOKENS", "96")
    run = run_root / "run"
    main(["eval", "--dataset", "humaneval", "--limit", "2", "--scaffold", "builtin", "--k", "2", "--max-turns", "2",
          "--run-dir", str(run)])
    out = capsys.readouterr().out
    results = load_results(run / "eval" / "results.json")
    assert len(results) == 4 and all(r.status == "done" for r in results)
    assert all(r.turns >= 1 and r.completion_tokens > 0 and r.reward in (0.0, 1.0) for r in results)
    assert "pass@1" in out and "pass@2" in out
    html = (run / "eval" / "report.html").read_text()
    assert "SmolLM2-135M-Instruct" in html and "HumanEval/0" in html and "pass@2" in html


BROKEN_VERIFIERS = {
    "times-out": "sleep 30\necho 1 > /logs/verifier/reward.txt\n",
    "writes-passed": "echo PASSED > /logs/verifier/reward.txt\n",
    "writes-nothing": "echo all good\n",
}


def test_a_broken_verifier_is_a_verifier_failure_not_the_agents_zero(run_root, capsys, monkeypatch):
    dataset = run_root / "tasks"
    write_harbor_task(dataset / "sound")
    for name, script in BROKEN_VERIFIERS.items():
        folder = write_harbor_task(dataset / name)
        (folder / "tests" / "test.sh").write_text("#!/bin/bash\nmkdir -p /logs/verifier\n" + script)
        (folder / "task.toml").write_text((folder / "task.toml").read_text().replace("timeout_sec = 45.0",
                                                                                    "timeout_sec = 2.0"))
    monkeypatch.setenv("ARBORL_ROLLOUT__INFRA_RETRIES", "1")
    run = run_root / "run"
    main(["eval", "--dataset", str(dataset), "--scaffold", "oracle", "--run-dir", str(run), "--model",
          "tiny-random-llama"])
    out = capsys.readouterr().out
    results = {r.task_id: r for r in load_results(run / "eval" / "results.json")}
    assert (results["sound"].status, results["sound"].reward) == ("done", 1.0)
    for name in BROKEN_VERIFIERS:
        broken = results[name]
        assert (broken.status, broken.reward, broken.attempts) == ("verifier_failed", None, 2), broken
    assert "ran out of time" in results["times-out"].details
    assert "'PASSED', not a number" in results["writes-passed"].details
    assert "no reward file" in results["writes-nothing"].details
    store = SqliteTrajectoryStore(run / "store.sqlite")
    graded = store.query("SELECT task_id FROM rollouts WHERE status = 'done'")
    store.close()
    assert graded == [("sound",)]  # nothing of a broken verifier is ever a sample
    data = json.loads((run / "eval" / "results.json").read_text())
    [oracle] = data["summary"]["scaffolds"]
    assert (oracle["rollouts"], oracle["verifier_failed"], oracle["infra_failed"]) == (1, 3, 0)
    assert "verifier failures" in out
    html = (run / "eval" / "report.html").read_text()
    assert "<th>verifier failed</th>" in html


def test_eval_reports_and_skips_malformed_tasks_unless_strict(run_root, capsys):
    dataset = malformed_dataset(run_root / "tasks")
    run = run_root / "run"
    argv = ["eval", "--dataset", str(dataset), "--scaffold", "oracle,nop", "--run-dir", str(run), "--model",
            "tiny-random-llama"]
    main(argv)
    out = capsys.readouterr().out
    assert f"{dataset / 'no-instruction'}: no instruction.md" in out
    assert f"{dataset / 'no-test-sh'}: no tests/test.sh" in out
    assert f"{dataset / 'no-solution'}: no solution/solve.sh" in out
    results = sorted((r.task_id, r.scaffold, r.reward) for r in load_results(run / "eval" / "results.json"))
    assert results == [("no-solution", "nop", 0.0), ("sound", "nop", 0.0), ("sound", "oracle", 1.0)]
    with pytest.raises(SystemExit, match=r"no-instruction: no instruction\.md"):
        main([*argv, "--strict", "--run-dir", str(run_root / "strict")])


@pytest.mark.parametrize("kind", ["local", "bwrap"])
def test_a_harbor_task_that_works_in_app_runs_unmodified_in_both_sandboxes(kind, run_root, capsys):
    from arborl.rollout.sandboxes import bwrap_unavailable_reason

    if kind == "bwrap" and bwrap_unavailable_reason():
        pytest.skip(bwrap_unavailable_reason())
    dataset = run_root / "tasks"
    write_app_task(dataset / "hello-script")
    run = run_root / "run"
    main(["eval", "--dataset", str(dataset), "--scaffold", "oracle,nop", "--run-dir", str(run), "--model",
          "tiny-random-llama", "--sandbox", kind])
    results = {r.scaffold: r for r in load_results(run / "eval" / "results.json")}
    assert (results["oracle"].status, results["oracle"].reward) == ("done", 1.0), results["oracle"].details
    assert (results["nop"].status, results["nop"].reward) == ("done", 0.0)


def test_resuming_reuses_only_results_of_the_same_plan(run_root, capsys):
    from arborl.rollout.sandboxes import bwrap_unavailable_reason

    dataset = harbor_tasks(run_root / "tasks")
    run = run_root / "run"
    argv = ["eval", "--dataset", str(dataset), "--scaffold", "oracle", "--run-dir", str(run), "--model",
            "tiny-random-llama", "--sandbox", "local"]

    def reused() -> tuple[int, dict]:
        out = capsys.readouterr().out
        return out.count("(done before)"), json.loads((run / "eval" / "results.json").read_text())["meta"]

    main(argv)
    assert reused()[0] == 0
    main(argv)  # the same plan: everything is reused, and the report says so
    count, meta = reused()
    assert count == 2 and meta["reused results"] == 2
    if not bwrap_unavailable_reason():  # another sandbox decides results too: run again
        main([*argv[:-1], "bwrap"])
        count, meta = reused()
        assert count == 0 and meta["reused results"] == 0
    # the task's solution changed (now wrong): its result is not the old one
    (dataset / "greet-txt" / "solution" / "answer.txt").write_text("a wrong greeting\n")
    main(argv)
    count, meta = reused()
    assert count == 1 and meta["reused results"] == 1  # greet-json is unchanged
    rewards = {r.task_id: r.reward for r in load_results(run / "eval" / "results.json")}
    assert rewards == {"greet-txt": 0.0, "greet-json": 1.0}
    # so did its tests: run again
    (dataset / "greet-json" / "tests" / "check.py").write_text("raise SystemExit(1)\n")
    main(argv)
    assert reused()[0] == 1
    assert {r.task_id: r.reward for r in load_results(run / "eval" / "results.json")}["greet-json"] == 0.0
    # a changed limit decides results too
    main([*argv, "--agent-timeout", "30"])
    assert reused()[0] == 0


def test_an_interrupted_eval_reports_every_task_and_what_became_of_it(run_root, capsys, monkeypatch):
    from arborl.ops import rollout_commands

    dataset = run_root / "tasks"
    for name in ("greet-a", "greet-b", "greet-c"):
        write_harbor_task(dataset / name)
    shown = rollout_commands.ProgressLine.__call__

    def interrupt_after_the_first(self, result, resumed):
        shown(self, result, resumed)
        raise KeyboardInterrupt  # Ctrl-C, as the first result comes in

    monkeypatch.setattr(rollout_commands.ProgressLine, "__call__", interrupt_after_the_first)
    run = run_root / "run"
    with pytest.raises(SystemExit) as stopped:
        main(["eval", "--dataset", str(dataset), "--scaffold", "oracle", "--k", "2", "--concurrency", "1",
              "--run-dir", str(run), "--model", "tiny-random-llama"])
    assert stopped.value.code == 130
    assert len(load_results(run / "eval" / "results.json")) == 1
    page = (run / "eval" / "report.html").read_text()
    for name in ("greet-a", "greet-b", "greet-c"):  # unfinished tasks keep their rows
        assert f"<code>{name}</code>" in page
    assert page.count("2 not run") == 2 and page.count("1 not run") == 1
    assert json.loads((run / "eval" / "results.json").read_text())["summary"]["unfinished"] == 5


HEAVY_MODULES_AFTER = (
    "import sys\n"
    "from arborl.ops.cli import main\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "finally:\n"
    "    print('HEAVY', sorted(m for m in ('torch', 'transformers') if m in sys.modules), flush=True)\n"
)


def eval_in_a_process(*argv: str) -> str:
    done = subprocess.run([sys.executable, "-c", HEAVY_MODULES_AFTER, "eval", *argv], capture_output=True, text=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_model_free_scaffolds_load_no_model_and_no_tokenizer(tiny_model_dir, run_root):
    dataset = str(harbor_tasks(run_root / "tasks"))
    # in the process: oracle and nop use no model, so no gateway and no model are started
    out = eval_in_a_process("--dataset", dataset, "--scaffold", "oracle,nop", "--run-dir", str(run_root / "own"),
                            "--model", "tiny-random-llama")
    assert "HEAVY []" in out and "serving" not in out
    assert len(load_results(run_root / "own" / "eval" / "results.json")) == 4
    # against a running gateway whose run names its model (run.json, as `arborl serve` writes it): no tokenizer
    # is loaded, since no rollout has a trie to draw
    with scripted_gateway(tiny_model_dir, run_root / "gw", lambda prompt: "") as gateway:
        run = run_root / "gw" / "run"
        (run / "run.json").write_text(json.dumps({"model_dir": str(tiny_model_dir), "model": "tiny"}))
        out = eval_in_a_process("--dataset", dataset, "--scaffold", "oracle,nop", "--gateway", gateway.url,
                                "--admin-token", SCRIPTED_ADMIN_TOKEN, "--run-dir", str(run))
        gateway.store.close()
    assert "HEAVY []" in out
    assert len(load_results(run / "eval" / "results.json")) == 4


@pytest.mark.slow
def test_the_in_process_gateway_listens_on_the_port_asked_for(run_root, capsys):
    from arborl.ops.local_gateway import free_loopback_port

    port = free_loopback_port()
    dataset = harbor_tasks(run_root / "tasks")
    main(["eval", "--dataset", str(dataset), "--tasks", "greet-txt", "--scaffold", "builtin", "--max-turns", "1",
          "--run-dir", str(run_root / "run"), "--model", "tiny-random-llama", "--port", str(port)])
    assert f"on http://127.0.0.1:{port}/v1" in capsys.readouterr().out
