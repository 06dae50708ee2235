"""arborl's built-in task set, shipped with the package in ``rollout/builtin_tasks/``.

One folder per task in the Harbor-like layout (task_loaders/harbor.py) with arborl's ``[arborl]``
table: ``environment/`` the starting workspace, ``tests/`` hidden pytest files merged into the
workspace's ``tests/`` after the agent exits (including fresh copies of any visible tests, so an
agent that edits them gains nothing), FAIL_TO_PASS / PASS_TO_PASS ids in task.toml, and the
reference in ``solution/files/`` (files written over the workspace) or ``solution/solve.sh``.

The set is small Python repositories with bugs to fix and features to add, and file and shell
chores, split into ``train`` and ``heldout`` and spread from one-line file creation to multi-file
changes; and code questions (``predict-output-*``: what does this program print?), graded by a
regex on the agent's answer: its first line ends with the output, or its first fenced block
(after any that repeat the program) holds exactly the output. Those are within reach of a
135M-parameter model, which solves almost none of the rest.
"""

from __future__ import annotations

from pathlib import Path

from ..tasks import Task
from .harbor import load_harbor_dir

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "builtin_tasks"


def load_builtin(*, split: str | None = None) -> list[Task]:
    return load_harbor_dir(BUILTIN_DIR, split=split, source="builtin")
