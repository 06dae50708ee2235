"""Verifiers: pytest output parsing on real pytest runs, SWE-bench resolution, reward files,
output matching, and the LLM judge against a real HTTP server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from arborl.rollout.tasks import InlineFiles, Task, TaskError, VerifierSpec
from arborl.rollout.verifiers import (
    REWARD_END_MARK,
    REWARD_JSON_MARK,
    REWARD_TXT_MARK,
    BrokenVerifier,
    CommandOutput,
    JudgeError,
    JudgeVerifier,
    OpenAIChatClient,
    OutputVerifier,
    Resolution,
    RewardFileError,
    ScriptVerifier,
    TestStatus,
    TestsVerifier,
    parse_judge_score,
    parse_pytest_output,
    parse_reward_json,
    parse_reward_txt,
    read_reward_files,
    status_of,
    swebench_report,
    verifier_for,
)

ENV = {**os.environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
for name in ("PYTEST_ADDOPTS", "CI", "PY_COLORS", "FORCE_COLOR"):  # each run below sets its own
    ENV.pop(name, None)

SAMPLE_TESTS = '''\
import pytest


@pytest.mark.parametrize("value", ["a b", "a - b", "x]y", "[1, 2]", 3])
def test_param(value):
    assert value != 3


def test_skip():
    pytest.skip("not today")


@pytest.mark.xfail
def test_xfail():
    assert 0


@pytest.mark.xfail
def test_xpass():
    pass


def test_fail():
    assert [1] == [2]


@pytest.fixture
def broken():
    raise RuntimeError("fixture - broke [badly]")


def test_error(broken):
    pass


class TestGroup:
    def test_method(self):
        print("PASSED tests/test_fake.py::test_printed_not_run")
'''


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    (root / "tests").mkdir()
    (root / "tests" / "test_sample.py").write_text(SAMPLE_TESTS)
    (root / "tests" / "test_broken.py").write_text("import no_such_module\n\n\ndef test_never():\n    pass\n")
    return root


def run_pytest(root: Path, *args: str, env: dict[str, str] | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--rootdir=.",
                           "--continue-on-collection-errors", *args, "tests"], cwd=root,
                          env={**ENV, **(env or {})},
                          capture_output=True, text=True, timeout=60, check=False)
    return done.stdout + done.stderr


EXPECTED = {
    "tests/test_sample.py::test_param[a b]": TestStatus.PASSED,
    "tests/test_sample.py::test_param[a - b]": TestStatus.PASSED,
    "tests/test_sample.py::test_param[x]y]": TestStatus.PASSED,
    "tests/test_sample.py::test_param[[1, 2]]": TestStatus.PASSED,
    "tests/test_sample.py::test_param[3]": TestStatus.FAILED,
    "tests/test_sample.py::test_xfail": TestStatus.XFAIL,
    "tests/test_sample.py::test_xpass": TestStatus.XPASS,
    "tests/test_sample.py::test_fail": TestStatus.FAILED,
    "tests/test_sample.py::test_error": TestStatus.ERROR,
    "tests/test_sample.py::TestGroup::test_method": TestStatus.PASSED,
    "tests/test_broken.py": TestStatus.ERROR,  # the collection error
}


def test_parse_real_pytest_rA_output(sample_run):
    output = run_pytest(sample_run, "-rA")
    results = parse_pytest_output(output)
    # A skip in the -rA summary names only a location, so it cannot be tied to a test id.
    assert results == EXPECTED
    assert "tests/test_fake.py::test_printed_not_run" not in results  # captured output is not a report
    assert status_of(results, "tests/test_broken.py::test_never") is TestStatus.ERROR
    assert status_of(results, "tests/test_sample.py::test_missing") is None


def test_parse_real_pytest_verbose_output(sample_run):
    results = parse_pytest_output(run_pytest(sample_run, "-v"))
    assert results == {**EXPECTED, "tests/test_sample.py::test_skip": TestStatus.SKIPPED}
    assert parse_pytest_output(run_pytest(sample_run, "-v", "-rA")) == results


@pytest.mark.parametrize("env", [{"CI": "true"}, {"PY_COLORS": "1"}], ids=["CI", "colours"])
@pytest.mark.parametrize("verbosity", ["-v", "-vv"])
def test_parse_real_pytest_output_under_ci_and_colours(sample_run, env, verbosity):
    # Under CI, pytest prints whole multi-line assertion messages in the summary, blank lines
    # included; a parser that stops at the first blank line loses every report after it.
    output = run_pytest(sample_run, verbosity, env=env)
    assert "test_broken" in output
    assert parse_pytest_output(output) == {**EXPECTED, "tests/test_sample.py::test_skip": TestStatus.SKIPPED}


def test_parse_summary_edge_cases():
    output = """\
=========================== short test summary info ============================
FAILED t.py::test_p[a] - AssertionError: assert [1] == [2]
FAILED t.py::test_q[x - ] - y] - boom
PASSED t.py::test_r
ERROR t.py::test_r - teardown failed
=================== 2 failed, 1 passed, 1 error in 0.01s ===================
PASSED t.py::after_the_summary
"""
    # test_r is reported twice (it passed, then its teardown failed): the worse outcome stands.
    assert parse_pytest_output(output) == {"t.py::test_p[a]": TestStatus.FAILED,
                                           "t.py::test_q[x - ]": TestStatus.FAILED,
                                           "t.py::test_r": TestStatus.ERROR}
    # The task's own ids settle an id that guessing gets wrong.
    assert parse_pytest_output(output, ["t.py::test_q[x - ] - y]"])["t.py::test_q[x - ] - y]"] is TestStatus.FAILED


F2P = ("f::a", "f::b", "f::c", "f::d")
P2P = ("f::p", "f::q")


def results_for(passed: set[str]) -> dict[str, TestStatus]:
    return {t: TestStatus.PASSED if t in passed else TestStatus.FAILED for t in F2P + P2P}


@pytest.mark.parametrize("passed, resolution, reward, binary", [
    (set(F2P + P2P), Resolution.FULL, 1.0, 1.0),
    ({"f::a", "f::b", "f::c", "f::p", "f::q"}, Resolution.PARTIAL, 0.75, 0.0),
    ({"f::a", "f::p", "f::q"}, Resolution.PARTIAL, 0.25, 0.0),
    (set(F2P) | {"f::p"}, Resolution.NO, 0.0, 0.0),  # a broken PASS_TO_PASS test: no credit at all
    ({"f::p", "f::q"}, Resolution.NO, 0.0, 0.0),
])
def test_swebench_resolution(passed, resolution, reward, binary):
    report = swebench_report(results_for(passed), F2P, P2P)
    assert report.resolution is resolution
    assert report.reward() == reward and report.reward(partial_credit=False) == binary


def test_resolution_counts_missing_skipped_and_xfail_like_swebench():
    results = {"f::a": TestStatus.XFAIL, "f::b": TestStatus.SKIPPED, "f::p": TestStatus.XPASS}
    report = swebench_report(results, ["f::a", "f::b", "f::c"], ["f::p"])
    assert report.f2p_passed == ("f::a",) and report.f2p_failed == ("f::b", "f::c")
    assert report.p2p_passed == ("f::p",) and report.resolution is Resolution.PARTIAL


def task_with(kind: str, **fields) -> Task:
    return Task("t", "Say hello.", InlineFiles(()), VerifierSpec(kind, **fields.pop("spec", {})), **fields)


def test_tests_verifier_on_a_real_run(sample_run):
    f2p = ("tests/test_sample.py::test_param[a - b]", "tests/test_sample.py::test_fail")
    p2p = ("tests/test_sample.py::test_xfail", "tests/test_sample.py::TestGroup::test_method")
    task = task_with("tests", test_command="python3 -m pytest --continue-on-collection-errors tests",
                     fail_to_pass=f2p, pass_to_pass=p2p)
    verifier = TestsVerifier()
    command = verifier.command(task)
    assert command.endswith(task.test_command) and "-rA" in command
    env = {**ENV, "PATH": os.path.dirname(sys.executable) + os.pathsep + ENV["PATH"]}
    done = subprocess.run(["bash", "-c", command], cwd=sample_run, env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    verdict = verifier.grade(task, CommandOutput(done.returncode, done.stdout, done.stderr))
    assert (verdict.resolution, verdict.reward) == (Resolution.PARTIAL, 0.5)
    assert "FAIL_TO_PASS 1/2, PASS_TO_PASS 2/2" in verdict.details
    timed_out = verifier.grade(task, CommandOutput(124, "", "", timed_out=True))
    assert (timed_out.resolution, timed_out.reward) == (Resolution.NO, 0.0) and "out of time" in timed_out.details


# -- reward files ------------------------------------------------------------------------------


def test_reward_files(tmp_path):
    assert parse_reward_txt(" 0.75\n") == 0.75
    assert parse_reward_json('{"reward": 1, "style": 0.2}') == 1.0
    assert parse_reward_json('{"accuracy": 0.5}') == 0.5 and parse_reward_json("0.25") == 0.25
    for bad in ('{"a": 1, "b": 2}', '{"reward": "high"}', "{", "true"):
        with pytest.raises(RewardFileError):
            parse_reward_json(bad)
    with pytest.raises(RewardFileError):
        parse_reward_txt("passed")
    assert read_reward_files(tmp_path) is None
    (tmp_path / "reward.txt").write_text("0\n")
    assert read_reward_files(tmp_path) == 0.0
    (tmp_path / "reward.json").write_text('{"reward": 0.5}')
    assert read_reward_files(tmp_path) == 0.5  # reward.json first, as Harbor reads them


def run_script_verifier(task: Task, folder: Path) -> CommandOutput:
    done = subprocess.run(["bash", "-c", ScriptVerifier().command(task)], cwd=folder, capture_output=True, text=True,
                          timeout=30, check=False)
    return CommandOutput(done.returncode, done.stdout, done.stderr)


@pytest.mark.parametrize("script, reward, details", [
    ('echo 0.5 > "$ARBORL_VERIFIER_DIR/reward.txt"', 0.5, "reward.txt"),
    ('echo \'{"reward": 1.0}\' > "$ARBORL_VERIFIER_DIR/reward.json"; echo 0 > "$ARBORL_VERIFIER_DIR/reward.txt"',
     1.0, "reward.json"),
    ('echo 0 > "$ARBORL_VERIFIER_DIR/reward.txt"; exit 3', 0.0, "reward.txt"),
])
def test_script_verifier_reads_the_reward_its_command_prints(tmp_path, script, reward, details):
    (tmp_path / "check.sh").write_text(script + "\n")
    task = task_with("script", test_command="bash check.sh")
    verdict = ScriptVerifier().grade(task, run_script_verifier(task, tmp_path))
    assert (verdict.reward, verdict.details) == (reward, details)
    # a second run starts without the first run's reward files: one that writes none is broken
    (tmp_path / "check.sh").write_text("true\n")
    with pytest.raises(BrokenVerifier, match="the script wrote no reward file"):
        ScriptVerifier().grade(task, run_script_verifier(task, tmp_path))


@pytest.mark.parametrize("script, message", [
    ("echo no reward; exit 3", "the script wrote no reward file"),
    ('echo PASSED > "$ARBORL_VERIFIER_DIR/reward.txt"', "reward.txt holds 'PASSED', not a number"),
    ('echo \'{"reward": "high"}\' > "$ARBORL_VERIFIER_DIR/reward.json"', "not a number"),
])
def test_a_script_that_gives_no_reward_is_a_broken_verifier_not_a_zero(tmp_path, script, message):
    # the verifier's own failure is not the agent's: no reward at all, so nothing to train on
    (tmp_path / "check.sh").write_text(script + "\n")
    task = task_with("script", test_command="bash check.sh")
    with pytest.raises(BrokenVerifier, match=message):
        ScriptVerifier().grade(task, run_script_verifier(task, tmp_path))


def test_a_script_that_ran_out_of_time_is_a_broken_verifier(tmp_path):
    task = task_with("script", test_command="bash check.sh", verify_timeout_s=5.0)
    with pytest.raises(BrokenVerifier, match=r"the script ran out of time \(5 s\)"):
        ScriptVerifier().grade(task, CommandOutput(124, "", "", timed_out=True))
    # even with a reward file: a script cut off mid-way may have written a reward it had not finished
    partial = f"{REWARD_JSON_MARK}\n\n{REWARD_TXT_MARK}\n1\n{REWARD_END_MARK}\n"
    with pytest.raises(BrokenVerifier, match="ran out of time"):
        ScriptVerifier().grade(task, CommandOutput(124, partial, "", timed_out=True))


# -- exact and regex ---------------------------------------------------------------------------


def test_output_verifiers():
    exact = task_with("exact", spec={"expected": "hello"}, test_command="cat hello.txt")
    regex = task_with("regex", spec={"expected": r"^total: \d+$"})
    assert verifier_for(exact).command(exact) == "cat hello.txt"
    assert OutputVerifier("exact").grade(exact, CommandOutput(stdout="hello\n")).reward == 1.0
    assert OutputVerifier("exact").grade(exact, CommandOutput(stdout="hello world")).reward == 0.0
    assert OutputVerifier("exact").grade(exact, CommandOutput(stdout="hello", timed_out=True)).reward == 0.0
    assert OutputVerifier("regex").grade(regex, CommandOutput(stdout="log\ntotal: 42\n")).reward == 1.0
    assert OutputVerifier("regex").grade(regex, CommandOutput(stdout="total: many")).reward == 0.0
    with pytest.raises(TaskError, match="bad regex"):
        OutputVerifier("regex").grade(task_with("regex", spec={"expected": "("}), CommandOutput(stdout="x"))


# -- the LLM judge -----------------------------------------------------------------------------


@pytest.mark.parametrize("reply, score", [
    ("Looks right.\nSCORE: 1", 1.0), ("score = 0.4", 0.4), ("Score: 7/10", 0.7), ("**SCORE:** 0.25", 0.25),
    ("SCORE: 0.2 at first... on reflection SCORE: 0.9", 0.9), ("SCORE: 3", 1.0), ("SCORE: -1", 0.0),
])
def test_parse_judge_score(reply, score):
    assert parse_judge_score(reply) == pytest.approx(score)


def test_parse_judge_score_without_a_score():
    with pytest.raises(JudgeError):
        parse_judge_score("I think it is fine.")


class FakeUpstream(BaseHTTPRequestHandler):
    """A real OpenAI-compatible endpoint on loopback with canned replies (the server's own state
    records what it was sent)."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["content-length"])))
        self.server.requests.append((self.path, {k.lower(): v for k, v in self.headers.items()}, body))  # type: ignore[attr-defined]
        status, reply = self.server.replies.pop(0)  # type: ignore[attr-defined]
        payload = json.dumps({"choices": [{"message": {"role": "assistant", "content": reply}}]}
                             if status == 200 else {"error": {"message": reply}}).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def upstream() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeUpstream)
    server.requests, server.replies = [], []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_judge_through_an_openai_compatible_server(upstream):
    base_url = f"http://127.0.0.1:{upstream.server_address[1]}/v1"
    client = OpenAIChatClient(base_url, "judge-model", api_key="k", timeout_s=10)
    task = task_with("judge", spec={"rubric": "Full marks for a greeting."})
    verifier = verifier_for(task, judge=client)
    assert isinstance(verifier, JudgeVerifier) and verifier.command(task) == ""

    upstream.replies.append((200, "A greeting, as asked.\nSCORE: 0.8"))
    verdict = verifier.grade(task, CommandOutput(stdout="Hello there!"))
    assert verdict.reward == pytest.approx(0.8) and verdict.details == "judge score 0.8"
    path, headers, body = upstream.requests[-1]
    assert path == "/v1/chat/completions" and headers["authorization"] == "Bearer k"
    assert body["model"] == "judge-model" and body["temperature"] == 0.0
    system, user = body["messages"]
    assert "SCORE" in system["content"]
    assert "Say hello." in user["content"] and "Full marks for a greeting." in user["content"]
    assert "Hello there!" in user["content"]

    upstream.replies.append((200, "no score here"))
    with pytest.raises(JudgeError, match="SCORE"):
        verifier.grade(task, CommandOutput(stdout="Hello"))
    upstream.replies.append((500, "overloaded"))
    with pytest.raises(JudgeError, match="500"):
        verifier.grade(task, CommandOutput(stdout="Hello"))


def test_judge_messages_and_unreachable_judge():
    task = task_with("judge")
    verifier = JudgeVerifier(lambda messages: "SCORE: 1", rubric="Be kind.", max_response_chars=10)
    user = verifier.messages(task, "x" * 50)[1]["content"]
    assert "Be kind." in user and "earlier output cut" in user and "x" * 11 not in user
    with pytest.raises(TaskError, match="judge client"):
        verifier_for(task)
    closed = OpenAIChatClient("http://127.0.0.1:9/v1", "m", timeout_s=2)  # port 9 (discard): nothing listens
    with pytest.raises(JudgeError):
        closed([{"role": "user", "content": "hi"}])
