"""SWE-bench-style instances from a JSONL file, one instance per line.

Fields (SWE-bench's names where it has them):

- ``instance_id``, ``problem_statement`` (the instruction): required.
- ``FAIL_TO_PASS`` (required, non-empty) and ``PASS_TO_PASS``: pytest node ids, either a list or
  a JSON-encoded list as SWE-bench publishes them.
- The repository snapshot, one of:
  ``workspace``: a folder, or a tarball (.tar, .tar.gz, .tgz, .tar.bz2, .tar.xz);
  ``repo_path`` (or ``repo`` when it names an existing local folder) with ``base_commit``: a local
  git repository checked out at that commit (as a fresh one-commit repository, see tasks.py).
  SWE-bench's own ``repo`` is a GitHub name; arborl does not clone: point ``repo_path`` at a clone.
  Relative paths are resolved against the JSONL file's folder.
- ``test_command`` (or ``test_cmd``): run in the workspace; default pytest over the files of the
  FAIL_TO_PASS and PASS_TO_PASS ids.
- ``patch``: the gold patch, the reference solution. ``test_patch``: the hidden tests, applied
  after the agent exits.
- Optional: ``split`` ("train" default, or "heldout"), ``difficulty`` (SWE-bench Verified's
  "<15 min fix" ... ">4 hours" map to easy / medium / hard), ``domain`` (default: ``repo``),
  ``agent_timeout_s``, ``verify_timeout_s``. Other fields are kept in ``task.metadata``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..tasks import (
    DEFAULT_AGENT_TIMEOUT_S,
    DEFAULT_VERIFY_TIMEOUT_S,
    FolderSource,
    GitSource,
    Patch,
    TarballSource,
    Task,
    TaskError,
    VerifierSpec,
    WorkspaceSource,
    pytest_command,
    select_split,
)

TARBALL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
# SWE-bench Verified's annotators' time estimates.
DIFFICULTY = {"<15 min fix": "easy", "15 min - 1 hour": "medium", "1-4 hours": "hard", ">4 hours": "hard"}
_KNOWN_FIELDS = {
    "instance_id", "problem_statement", "FAIL_TO_PASS", "PASS_TO_PASS", "workspace", "repo_path", "repo",
    "base_commit", "test_command", "test_cmd", "patch", "test_patch", "split", "difficulty", "domain",
    "agent_timeout_s", "verify_timeout_s",
}


def _test_ids(value: Any, what: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else []
        except json.JSONDecodeError as exc:
            raise TaskError(f"{where}: {what} is neither a list nor a JSON-encoded list: {exc}") from exc
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TaskError(f"{where}: {what} must be a list of test ids")
    return tuple(value)


def _snapshot(record: dict[str, Any], base: Path, where: str) -> WorkspaceSource:
    if record.get("workspace"):
        path = (base / record["workspace"]).resolve()
        if path.is_dir():
            return FolderSource(path)
        if path.is_file() and path.name.endswith(TARBALL_SUFFIXES):
            return TarballSource(path)
        raise TaskError(f"{where}: workspace {record['workspace']!r} is neither a folder nor a tarball")
    repo = record.get("repo_path")
    if repo is None and record.get("repo") and (base / record["repo"]).is_dir():
        repo = record["repo"]
    if repo is None:
        raise TaskError(f"{where}: no local repository snapshot; set 'workspace', or 'repo_path' and "
                        "'base_commit' (SWE-bench's 'repo' is a GitHub name: clone it and point repo_path at it)")
    path = (base / repo).resolve()
    if not path.is_dir():
        raise TaskError(f"{where}: repo_path {repo!r} is not a folder")
    commit = record.get("base_commit")
    if not commit or not isinstance(commit, str):
        raise TaskError(f"{where}: a git snapshot needs 'base_commit'")
    return GitSource(path, commit)


def _number(record: dict[str, Any], name: str, default: float, where: str) -> float:
    value = record.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskError(f"{where}: {name} must be a number")
    return float(value)


def task_from_record(record: dict[str, Any], *, base: Path, where: str, source: str = "") -> Task:
    """One SWE-bench-style instance; ``base`` resolves relative paths, ``where`` names it in errors."""
    for name in ("instance_id", "problem_statement"):
        if not isinstance(record.get(name), str) or not record[name]:
            raise TaskError(f"{where}: missing {name}")
    fail_to_pass = _test_ids(record.get("FAIL_TO_PASS"), "FAIL_TO_PASS", where)
    pass_to_pass = _test_ids(record.get("PASS_TO_PASS"), "PASS_TO_PASS", where)
    if not fail_to_pass:
        raise TaskError(f"{where}: FAIL_TO_PASS is empty")
    command = record.get("test_command") or record.get("test_cmd") or pytest_command((*fail_to_pass, *pass_to_pass))
    repo = record.get("repo")
    difficulty = record.get("difficulty", "medium")
    try:
        return Task(
            id=record["instance_id"],
            instruction=record["problem_statement"],
            workspace=_snapshot(record, base, where),
            verifier=VerifierSpec("tests"),
            test_command=str(command),
            fail_to_pass=fail_to_pass,
            pass_to_pass=pass_to_pass,
            hidden_tests=Patch(record["test_patch"]) if record.get("test_patch") else None,
            reference=Patch(record["patch"]) if record.get("patch") else None,
            agent_timeout_s=_number(record, "agent_timeout_s", DEFAULT_AGENT_TIMEOUT_S, where),
            verify_timeout_s=_number(record, "verify_timeout_s", DEFAULT_VERIFY_TIMEOUT_S, where),
            split=record.get("split", "train"),
            difficulty=DIFFICULTY.get(difficulty, str(difficulty)),
            domain=str(record.get("domain") or (repo if isinstance(repo, str) else "") or "swe"),
            source=source,
            metadata={key: value for key, value in record.items() if key not in _KNOWN_FIELDS},
            origin=where,
            reference_at="patch (the gold patch)",
        )
    except TaskError as exc:
        raise TaskError(f"{where}: {exc}") from exc


def _record_task(line: str, path: Path, where: str) -> Task:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskError(f"{where}: not JSON: {exc}") from exc
    if not isinstance(record, dict):
        raise TaskError(f"{where}: expected a JSON object")
    return task_from_record(record, base=path.parent, where=where, source=str(path))


def load_swebench_jsonl(path: Path, *, split: str | None = None, problems: list[TaskError] | None = None
                        ) -> list[Task]:
    """Every instance of the file. A malformed record raises its ``TaskError`` (naming FILE:LINE),
    unless ``problems`` is given: then it is appended there and the other records load."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise TaskError(f"cannot read {path}: {exc}") from exc
    tasks, seen = [], set()
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            task = _record_task(line, path, where)
        except TaskError as exc:
            if problems is None:
                raise
            problems.append(exc)
            continue
        if task.id in seen:
            raise TaskError(f"{where}: duplicate instance_id {task.id!r}")
        seen.add(task.id)
        tasks.append(task)
    return select_split(tasks, split)
