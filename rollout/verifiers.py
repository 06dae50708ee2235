"""Verifiers: from what a verification command printed to a reward (DESIGN section 6).

Each verifier has two halves so that running one inside a sandbox is a few lines of glue::

    verifier = verifier_for(task)
    task.install_hidden_tests(workspace)
    result = sandbox.run(verifier.command(task), timeout_s=task.verify_timeout_s)
    verdict = verifier.grade(task, result)   # result: exit_code, stdout, stderr, timed_out

``command`` is a shell command run with the workspace as its working directory; ``grade`` is a
pure function of the task and the command's result (it never reads the workspace, so the sandbox
can be a container or another machine). A command that prints nothing to grade (``command``
returns ``""`` for an output or judge task with no test command) is graded on the agent's final
answer instead: pass ``CommandOutput(stdout=answer)``.

Kinds:

- ``tests``: pytest ``-rA`` output parsed into per-test outcomes, then SWE-bench's resolution
  (``ResolvedStatus`` in swebench/harness/grading.py): FULL when every FAIL_TO_PASS and every
  PASS_TO_PASS test passes, PARTIAL when some but not all FAIL_TO_PASS tests pass and every
  PASS_TO_PASS test passes, NO otherwise. A test passes when it PASSED, XFAILed (as in SWE-bench)
  or XPASSed (a non-strict xfail that ran and passed); a test that is missing from the output,
  FAILED, ERRORed or was SKIPPED does not. Reward: FULL 1.0, PARTIAL the fraction of
  FAIL_TO_PASS tests that pass (partial credit: a denser signal for small policies, and no credit
  at all for breaking a PASS_TO_PASS test), NO 0.0. ``TestsVerifier(partial_credit=False)``
  gives the binary reward (PARTIAL -> 0.0) SWE-bench's "resolved" counts.
- ``script``: the task's own script (Harbor's tests/test.sh) writes ``reward.json`` or
  ``reward.txt`` into ``$ARBORL_VERIFIER_DIR``; the command prints both files between markers
  after the script, and ``grade`` reads them from the output (reward.json first, as Harbor does).
  A script that ran out of time, wrote no reward file, or wrote one that holds no number raises
  ``BrokenVerifier``: the verifier failed, not the agent, so there is no reward (as in Harbor,
  where these are trial errors, not zeros). The orchestrator retries such a rollout and never
  trains on it; a report counts it apart from graded rollouts.
- ``exact`` / ``regex``: the test command's stdout (or the agent's answer) compared with
  ``task.verifier.expected``: exact compares with surrounding whitespace stripped; regex is
  ``re.search`` with MULTILINE (anchor the pattern to demand a full match).
- ``judge``: an LLM scores the output against the task's rubric through an OpenAI-compatible
  chat endpoint (the gateway's ``upstream`` engine, or any server). A judge that cannot be
  reached or gives no score raises ``JudgeError``: that is an infrastructure failure to retry,
  not a wrong answer.
"""

from __future__ import annotations

import enum
import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from arborl.scaffold_adapters.base import CommandOutcome

from .tasks import VERIFIER_DIR, Task, TaskError

LOG_TAIL_CHARS = 20_000


class TestStatus(enum.StrEnum):
    __test__ = False  # not a pytest test class, whatever its name

    PASSED = "PASSED"
    FAILED = "FAILED"
    ERROR = "ERROR"
    SKIPPED = "SKIPPED"
    XFAIL = "XFAIL"
    XPASS = "XPASS"

    @property
    def passed(self) -> bool:
        return self in (TestStatus.PASSED, TestStatus.XFAIL, TestStatus.XPASS)


class Resolution(enum.StrEnum):
    """SWE-bench's ``ResolvedStatus``, with the same values."""

    FULL = "RESOLVED_FULL"
    PARTIAL = "RESOLVED_PARTIAL"
    NO = "RESOLVED_NO"


class VerifierError(RuntimeError):
    """Verification could not produce a verdict (not a wrong answer: retry, do not train on it)."""


class BrokenVerifier(VerifierError):
    """The task's own verifier ran but gave no reward (its script timed out, wrote no reward file,
    or one that holds no number): a fault of the task's verifier, never a reward of 0."""


class JudgeError(VerifierError):
    """The LLM judge could not be reached or gave no usable score."""


@dataclass(frozen=True)
class CommandOutput:
    """A plain ``CommandOutcome``: for a local subprocess, or to grade an agent's final answer."""

    exit_code: int | None = 0
    stdout: str = ""
    stderr: str = ""
    timed_out: bool = False


@dataclass(frozen=True)
class Verdict:
    reward: float
    resolution: Resolution | None = None
    tests: Mapping[str, TestStatus] = field(default_factory=dict)
    details: str = ""  # one line: why this reward
    log: str = ""  # the tail of what the verification printed

    @property
    def solved(self) -> bool:
        return self.reward >= 1.0


def _log_tail(result: CommandOutcome) -> str:
    text = result.stdout + ("\n" + result.stderr if result.stderr else "")
    return text[-LOG_TAIL_CHARS:]


# -- pytest output -----------------------------------------------------------------------------

_STATUS_WORDS = "|".join(status.value for status in TestStatus)
_SUMMARY_HEADER = re.compile(r"^=+ short test summary info =+$")
_SUMMARY_LINE = re.compile(rf"^({_STATUS_WORDS}) (.+)$")
# Colour codes, for output of a pytest run with PY_COLORS or FORCE_COLOR set.
_ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;]*m")
# `pytest -v`: "tests/test_a.py::test_x[a b] PASSED                 [ 50%]"
_VERBOSE_LINE = re.compile(rf"^(\S+::.+?) ({_STATUS_WORDS})(?: \(.*\))?\s+\[\s*\d+%\]$")
# How bad an outcome is: when a test is reported twice (it passed, then its teardown errored),
# the worse report wins.
_SEVERITY = {TestStatus.PASSED: 0, TestStatus.XPASS: 0, TestStatus.XFAIL: 0, TestStatus.SKIPPED: 1,
             TestStatus.FAILED: 2, TestStatus.ERROR: 3}


def _summary_test_id(rest: str, known_ids: Sequence[str]) -> str | None:
    """The node id at the start of a summary line's remainder (``id`` or ``id - message``)."""
    for test_id in known_ids:  # longest first: the caller's exact ids settle every ambiguity
        if rest == test_id or rest.startswith(test_id + " "):
            return test_id
    if rest.startswith("[") and not rest.startswith("[["):
        return None  # "SKIPPED [1] tests/t.py:12: reason" names a location, not a test
    head = rest.split(" ", 1)[0]
    name_start = head.rfind("::")
    bracket = head.find("[", max(name_start, 0))
    if bracket < 0:
        return head
    # A parametrized id can hold spaces, " - " and brackets: it ends at a "]" followed by the end
    # of the line or by " - " (the message), preferring the first such "]" whose brackets balance.
    candidates = [i for i, char in enumerate(rest) if char == "]" and i >= bracket
                  and (i + 1 == len(rest) or rest.startswith(" - ", i + 1))]
    if not candidates:
        return head
    for end in candidates:
        segment = rest[bracket:end + 1]
        if segment.count("[") == segment.count("]"):
            return rest[:end + 1]
    return rest[:candidates[0] + 1]


def parse_pytest_output(output: str, known_ids: Iterable[str] = ()) -> dict[str, TestStatus]:
    """Per-test outcomes from pytest output: the ``-rA`` short summary (``PASSED id``, ``FAILED id -
    message``, ``ERROR file`` for a collection error, ...) and ``-v`` progress lines, the summary
    winning where both report a test. Skips reported only by location (``SKIPPED [1] file:line``)
    cannot be tied to a test and are left out. ``known_ids`` (e.g. the task's FAIL_TO_PASS and
    PASS_TO_PASS) are matched exactly before any guessing at where a parametrized id ends."""
    known = sorted(set(known_ids), key=len, reverse=True)
    summary: dict[str, TestStatus] = {}
    verbose: dict[str, TestStatus] = {}
    in_summary = False
    for raw in _ANSI_ESCAPE.sub("", output).splitlines():
        line = raw.rstrip()
        if _SUMMARY_HEADER.match(line):
            in_summary = True
            continue
        if in_summary:
            # Under CI (the CI variable set) or -vv a message runs on over indented lines, blank
            # ones included; the summary itself ends at the "===" totals line.
            if not line or raw[0].isspace():
                continue
            if line.startswith(("=", "!")):
                in_summary = False
                continue
            match = _SUMMARY_LINE.match(line)
            if match:
                test_id = _summary_test_id(match.group(2), known)
                if test_id:
                    _record(summary, test_id, TestStatus(match.group(1)))
            continue
        match = _VERBOSE_LINE.match(line)
        if match:
            _record(verbose, match.group(1), TestStatus(match.group(2)))
    return {**verbose, **summary}


def _record(results: dict[str, TestStatus], test_id: str, status: TestStatus) -> None:
    old = results.get(test_id)
    if old is None or _SEVERITY[status] >= _SEVERITY[old]:
        results[test_id] = status


def status_of(results: Mapping[str, TestStatus], test_id: str) -> TestStatus | None:
    """A test's outcome; a test in a file that failed to import takes the file's ERROR."""
    if test_id in results:
        return results[test_id]
    file_status = results.get(test_id.split("::", 1)[0])
    return file_status if file_status is TestStatus.ERROR else None


# -- SWE-bench resolution ----------------------------------------------------------------------


@dataclass(frozen=True)
class TestsReport:
    __test__ = False

    f2p_passed: tuple[str, ...]
    f2p_failed: tuple[str, ...]
    p2p_passed: tuple[str, ...]
    p2p_failed: tuple[str, ...]

    @property
    def f2p_rate(self) -> float:
        total = len(self.f2p_passed) + len(self.f2p_failed)
        return 1.0 if total == 0 else len(self.f2p_passed) / total  # SWE-bench: empty counts as 1

    @property
    def p2p_rate(self) -> float:
        total = len(self.p2p_passed) + len(self.p2p_failed)
        return 1.0 if total == 0 else len(self.p2p_passed) / total

    @property
    def resolution(self) -> Resolution:
        if self.f2p_rate == 1 and self.p2p_rate == 1:
            return Resolution.FULL
        if 0 < self.f2p_rate < 1 and self.p2p_rate == 1:
            return Resolution.PARTIAL
        return Resolution.NO

    def reward(self, *, partial_credit: bool = True) -> float:
        resolution = self.resolution
        if resolution is Resolution.FULL:
            return 1.0
        if resolution is Resolution.PARTIAL and partial_credit:
            return self.f2p_rate
        return 0.0


def swebench_report(results: Mapping[str, TestStatus], fail_to_pass: Iterable[str],
                 pass_to_pass: Iterable[str]) -> TestsReport:
    def split(ids: Iterable[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
        passed: list[str] = []
        failed: list[str] = []
        for test_id in ids:
            status = status_of(results, test_id)
            (passed if status is not None and status.passed else failed).append(test_id)
        return tuple(passed), tuple(failed)

    f2p_passed, f2p_failed = split(fail_to_pass)
    p2p_passed, p2p_failed = split(pass_to_pass)
    return TestsReport(f2p_passed, f2p_failed, p2p_passed, p2p_failed)


class TestsVerifier:
    """FAIL_TO_PASS / PASS_TO_PASS tests run by the task's pytest command (see the module docstring)."""

    __test__ = False

    def __init__(self, *, partial_credit: bool = True):
        self.partial_credit = partial_credit

    def command(self, task: Task) -> str:
        # -rA makes pytest report every test by id; added here so that any pytest the task's
        # command starts reports them, whatever options the command itself passes.
        return f'export PYTEST_ADDOPTS="${{PYTEST_ADDOPTS:+$PYTEST_ADDOPTS }}-rA"\n{task.test_command}'

    def grade(self, task: Task, result: CommandOutcome) -> Verdict:
        output = result.stdout + "\n" + result.stderr
        results = parse_pytest_output(output, (*task.fail_to_pass, *task.pass_to_pass))
        report = swebench_report(results, task.fail_to_pass, task.pass_to_pass)
        resolution = report.resolution
        details = (f"FAIL_TO_PASS {len(report.f2p_passed)}/{len(task.fail_to_pass)}, PASS_TO_PASS "
                   f"{len(report.p2p_passed)}/{len(task.pass_to_pass)}: {resolution.value}")
        if result.timed_out:
            details += " (the tests ran out of time)"
        return Verdict(report.reward(partial_credit=self.partial_credit), resolution, results, details,
                       _log_tail(result))


# -- Harbor-style reward files -----------------------------------------------------------------

REWARD_JSON_MARK = "<<<arborl:reward.json>>>"
REWARD_TXT_MARK = "<<<arborl:reward.txt>>>"
REWARD_END_MARK = "<<<arborl:end>>>"


class RewardFileError(BrokenVerifier):
    """A reward file that exists but holds no reward (not a number, not a JSON object of numbers)."""


def parse_reward_txt(text: str) -> float:
    """reward.txt: one number."""
    try:
        return float(text.strip())
    except ValueError as exc:
        raise RewardFileError(f"reward.txt holds {text.strip()[:80]!r}, not a number") from exc


def parse_reward_json(text: str) -> float:
    """reward.json: Harbor's ``{"reward": 1.0, ...}`` (a dict of named rewards). The reward is the
    ``reward`` entry, or the only entry when there is just one; a bare number is accepted too."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise RewardFileError(f"reward.json is not JSON: {exc}") from exc
    if isinstance(data, dict):
        if "reward" in data:
            data = data["reward"]
        elif len(data) == 1:
            (data,) = data.values()
        else:
            raise RewardFileError(f"reward.json has no 'reward' entry among {sorted(data)[:10]}")
    if isinstance(data, bool) or not isinstance(data, int | float):
        raise RewardFileError(f"reward.json's reward is {data!r}, not a number")
    return float(data)


def read_reward_files(verifier_dir: Path) -> float | None:
    """The reward a script left in a folder (reward.json first, then reward.txt); None if neither."""
    folder = Path(verifier_dir)
    if (folder / "reward.json").is_file():
        return parse_reward_json((folder / "reward.json").read_text())
    if (folder / "reward.txt").is_file():
        return parse_reward_txt((folder / "reward.txt").read_text())
    return None


def _between(text: str, start: str, end: str) -> str | None:
    at = text.rfind(start)
    if at < 0:
        return None
    body = text[at + len(start):]
    stop = body.find(end)
    return body[:stop] if stop >= 0 else None


class ScriptVerifier:
    """The task's own verification script writes a reward file (see the module docstring)."""

    def command(self, task: Task) -> str:
        files = '"$ARBORL_VERIFIER_DIR/reward.json" "$ARBORL_VERIFIER_DIR/reward.txt"'
        return (
            f'export ARBORL_VERIFIER_DIR="$PWD/{VERIFIER_DIR}"; mkdir -p "$ARBORL_VERIFIER_DIR"; '
            f"rm -f {files}; (\n{task.test_command}\n); "
            f"echo; echo '{REWARD_JSON_MARK}'; cat \"$ARBORL_VERIFIER_DIR/reward.json\" 2>/dev/null; "
            f"echo; echo '{REWARD_TXT_MARK}'; cat \"$ARBORL_VERIFIER_DIR/reward.txt\" 2>/dev/null; "
            f"echo; echo '{REWARD_END_MARK}'"
        )

    def grade(self, task: Task, result: CommandOutcome) -> Verdict:
        """The reward the script wrote; raises ``BrokenVerifier`` when it gave none (a script cut
        off at its timeout gave none, whatever it had written by then)."""
        if result.timed_out:
            raise BrokenVerifier(f"the script ran out of time ({task.verify_timeout_s:g} s)")
        log = _log_tail(result)
        json_text = _between(result.stdout, REWARD_JSON_MARK, REWARD_TXT_MARK)
        txt_text = _between(result.stdout, REWARD_TXT_MARK, REWARD_END_MARK)
        if json_text is not None and json_text.strip():
            return Verdict(parse_reward_json(json_text), details="reward.json", log=log)
        if txt_text is not None and txt_text.strip():
            return Verdict(parse_reward_txt(txt_text), details="reward.txt", log=log)
        raise BrokenVerifier(f"the script wrote no reward file (exit code {result.exit_code}); its output ends: "
                             f"{log[-300:]!r}" if log.strip() else "the script wrote no reward file")


# -- exact and regex output ---------------------------------------------------------------------


def exact_match(output: str, expected: str) -> bool:
    return output.strip() == expected.strip()


def regex_match(output: str, pattern: str) -> bool:
    return re.search(pattern, output, re.MULTILINE) is not None


class OutputVerifier:
    """The test command's stdout (or the agent's answer) against ``task.verifier.expected``."""

    def __init__(self, kind: str):
        if kind not in ("exact", "regex"):
            raise TaskError(f"an output verifier is exact or regex, not {kind!r}")
        self.kind = kind

    def command(self, task: Task) -> str:
        return task.test_command

    def grade(self, task: Task, result: CommandOutcome) -> Verdict:
        expected = task.verifier.expected
        if self.kind == "regex":
            try:
                ok = regex_match(result.stdout, expected)
            except re.error as exc:
                raise TaskError(f"task {task.id!r}: bad regex {expected!r}: {exc}") from exc
        else:
            ok = exact_match(result.stdout, expected)
        details = f"{self.kind} match" if ok else f"output does not {self.kind}-match the expected"
        if result.timed_out:
            details += " (the command ran out of time)"
        return Verdict(1.0 if ok and not result.timed_out else 0.0, details=details, log=_log_tail(result))


# -- LLM judge ---------------------------------------------------------------------------------

Message = dict[str, str]
JudgeClient = Callable[[list[Message]], str]

DEFAULT_RUBRIC = ("Score 1 if the response fully and correctly does what the task asks, 0 if it does not, "
                  "and a value in between for a partly correct response.")
JUDGE_SYSTEM = (
    "You are a strict grader. You are given a task, a rubric and a response to the task. Judge the "
    "response only against the rubric. Think briefly, then end your reply with a last line of the form "
    "'SCORE: <number from 0 to 1>'."
)
_SCORE = re.compile(r"score\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)\s*(?:/\s*(\d+(?:\.\d+)?))?", re.IGNORECASE)


def parse_judge_score(text: str) -> float:
    """The judge's score in [0, 1] from its last ``SCORE: x`` line (``x`` in [0, 1], or ``x/N``).
    Raises ``JudgeError`` when there is none."""
    matches = list(_SCORE.finditer(text))
    if not matches:
        raise JudgeError(f"the judge gave no 'SCORE: x' line: {text[-200:]!r}")
    value, scale = matches[-1].groups()
    score = float(value) / float(scale) if scale else float(value)
    if scale and float(scale) == 0:
        raise JudgeError(f"the judge scored out of zero: {matches[-1].group(0)!r}")
    return min(1.0, max(0.0, score))


class OpenAIChatClient:
    """A judge client for an OpenAI-compatible ``/chat/completions`` endpoint (the gateway with the
    ``upstream`` engine, or any such server). Standard library only."""

    def __init__(self, base_url: str, model: str, *, api_key: str | None = None, timeout_s: float = 120.0,
                 temperature: float = 0.0, max_tokens: int = 512):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.temperature = temperature
        self.max_tokens = max_tokens

    def __call__(self, messages: list[Message]) -> str:
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"content-type": "application/json"}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise JudgeError(f"the judge answered {exc.code}: {exc.read()[:300]!r}") from exc
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as exc:
            raise JudgeError(f"the judge at {self.url} failed: {exc}") from exc
        try:
            return payload["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError) as exc:
            raise JudgeError(f"the judge's reply has no message: {str(payload)[:300]}") from exc


class JudgeVerifier:
    """An LLM scores the output (the test command's stdout, or the agent's answer) against a rubric."""

    def __init__(self, client: JudgeClient, *, rubric: str = "", max_response_chars: int = 30_000):
        self.client = client
        self.rubric = rubric
        self.max_response_chars = max_response_chars

    def command(self, task: Task) -> str:
        return task.test_command

    def messages(self, task: Task, response: str) -> list[Message]:
        rubric = task.verifier.rubric or self.rubric or DEFAULT_RUBRIC
        if len(response) > self.max_response_chars:
            # Keep the end: an agent's conclusion (and a diff's last hunks) come last.
            response = "[... earlier output cut ...]\n" + response[-self.max_response_chars:]
        user = (f"<task>\n{task.instruction.strip()}\n</task>\n\n<rubric>\n{rubric.strip()}\n</rubric>\n\n"
                f"<response>\n{response}\n</response>")
        return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": user}]

    def grade(self, task: Task, result: CommandOutcome) -> Verdict:
        reply = self.client(self.messages(task, result.stdout))
        score = parse_judge_score(reply)
        return Verdict(score, details=f"judge score {score:g}", log=reply[-LOG_TAIL_CHARS:])


# -- choosing one --------------------------------------------------------------------------------

Verifier = TestsVerifier | ScriptVerifier | OutputVerifier | JudgeVerifier


def verifier_for(task: Task, *, judge: JudgeClient | None = None, partial_credit: bool = True) -> Verifier:
    kind = task.verifier.kind
    if kind == "tests":
        return TestsVerifier(partial_credit=partial_credit)
    if kind == "script":
        return ScriptVerifier()
    if kind in ("exact", "regex"):
        return OutputVerifier(kind)
    if judge is None:
        raise TaskError(f"task {task.id!r} is graded by an LLM judge; pass a judge client")
    return JudgeVerifier(judge)
