"""Harbor-style task folders (laude-institute/harbor, formerly terminal-bench), run without Docker.

A task folder::

    task.toml         version, [metadata] difficulty/category/tags, [agent] timeout_sec,
                      [verifier] timeout_sec and env, optional [arborl] (below)
    instruction.md    what the agent is told
    environment/      the workspace: its contents are copied (a Dockerfile or compose file in it
                      is left out; arborl does not build the image, so a task whose environment
                      must be built needs a sandbox that provides it)
    tests/test.sh     the verification script, writing a reward to /logs/verifier/reward.txt (a
                      number) or reward.json ({"reward": x, ...}); other files in tests/ with it
    solution/solve.sh the reference solution (an oracle runs it)

Harbor tasks take ``/app`` as their working directory (the instruction says "in /app", the
tests and the solution ``cd /app``): a task's ``workdir`` is ``/app``, so the ``bwrap`` sandbox
puts the workspace there, and under ``local`` (which cannot) the agent's instruction names the
workspace's real folder instead (``Task.instruction_in``). The oracle's solution and the tests
run inside the sandbox, so they see the workspace where the agent did.

Without Docker there is no /tests, /solution or /logs: the hidden tests are installed at
``.arborl/tests/`` in the workspace, the solution at ``.arborl/solution/``, and just before they
run, every text file in those folders has the absolute paths Harbor's container uses rewritten
(with sed, so it also works in single-quoted heredocs) to the real ones:

    /logs/verifier -> $PWD/.arborl/logs/verifier   (also exported as $ARBORL_VERIFIER_DIR)
    /tests         -> $PWD/.arborl/tests
    /solution      -> $PWD/.arborl/solution
    /app           -> $PWD                          (Harbor's conventional working directory)

A path is rewritten only where it starts a path (after a quote, space, '=', '(' ...), so
``/data/app`` stays. Under ``bwrap`` $PWD is /app itself, so /app stays /app; a sandbox that can
bind-mount the other paths may do so instead, and the rewrite then points at the same files.
Files of ``environment/`` are not rewritten: the agent gets them as the task wrote them.

arborl's extension, ``[arborl]`` in task.toml (all optional):

    id = "..."                            default: the folder's name
    split = "train" | "heldout"           default "train"
    verifier = "tests" | "script" | "exact" | "regex" | "judge"
                                          default "script" when tests/test.sh exists, else "tests"
    fail_to_pass = [...], pass_to_pass = [...]   pytest node ids, for verifier = "tests"
    test_command = "..."                  default: pytest over the files of those ids
    expected = "..."                      for exact / regex;  rubric = "..." for judge

With verifier = "tests", tests/ is merged into the workspace's own tests/ folder instead (so
hidden pytest files sit next to the visible ones and node ids read ``tests/test_x.py::test_y``).
A reference may also be ``solution/files/`` (files written over the workspace) or
``solution/patch.diff``.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Any

from ..tasks import (
    ARBORL_DIR,
    DEFAULT_AGENT_TIMEOUT_S,
    DEFAULT_VERIFY_TIMEOUT_S,
    SPLITS,
    VERIFIER_DIR,
    FolderOverlay,
    FolderSource,
    InlineFiles,
    Overlay,
    Patch,
    ShellScript,
    Task,
    TaskError,
    VerifierSpec,
    pytest_command,
    select_split,
)

WORKDIR = "/app"  # Harbor's working directory (its images' WORKDIR)
TESTS_DIR = f"{ARBORL_DIR}/tests"
SOLUTION_DIR = f"{ARBORL_DIR}/solution"
# Harbor's container paths and where they live in a workspace ("" is the workspace itself).
CONTAINER_PATHS: tuple[tuple[str, str], ...] = (
    ("/logs/verifier", VERIFIER_DIR),
    ("/tests", TESTS_DIR),
    ("/solution", SOLUTION_DIR),
    (WORKDIR, ""),
)
ENVIRONMENT_EXCLUDE = ("Dockerfile", "docker-compose.yaml", "docker-compose.yml", ".dockerignore")


def localize_paths(folder: str) -> str:
    """A shell command that rewrites Harbor's container paths in every file under ``folder``
    (relative to the workspace, which must be the working directory) to real paths."""
    expressions = []
    for container, local in CONTAINER_PATHS:
        target = "$PWD" + (f"/{local}" if local else "")
        # The separator before the path is kept (\1); the character after must end a path
        # component (\2, kept). Run twice: matches next to each other share a separator.
        expr = rf"s#(^|[^[:alnum:]_./-]){container}([^[:alnum:]_.-]|$)#\1{target}\2#g"
        expressions += ["-e", f'"{expr}"', "-e", f'"{expr}"']
    quoted = shlex.quote(folder)
    return (f"find {quoted} -type f -size -1024k -exec grep -Iq . {{}} \\; "
            f"-exec sed -E -i {' '.join(expressions)} {{}} +")


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TaskError(f"{path}: {exc}") from exc


def _table(config: dict[str, Any], name: str, path: Path) -> dict[str, Any]:
    table = config.get(name, {})
    if not isinstance(table, dict):
        raise TaskError(f"{path}: [{name}] must be a table")
    return table


def _ids(value: Any, what: str, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise TaskError(f"{path}: {what} must be a list of pytest node ids")
    return tuple(value)


def _timeout(table: dict[str, Any], default: float, what: str, path: Path) -> float:
    value = table.get("timeout_sec", default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise TaskError(f"{path}: [{what}] timeout_sec must be a positive number")
    return float(value)


def _reference(folder: Path) -> Overlay | None:
    solution = folder / "solution"
    if (solution / "solve.sh").is_file():
        return ShellScript(f"{localize_paths(SOLUTION_DIR)} && bash {SOLUTION_DIR}/solve.sh",
                           files=solution, files_dest=SOLUTION_DIR)
    if (solution / "patch.diff").is_file():
        return Patch((solution / "patch.diff").read_text())
    if (solution / "files").is_dir():
        return FolderOverlay(solution / "files")
    return None


def load_harbor_task(folder: Path, *, source: str = "") -> Task:
    """One task folder. Every error names the folder and the file that is missing or wrong."""
    folder = Path(folder)
    toml_path = folder / "task.toml"
    if not toml_path.is_file():
        raise TaskError(f"{folder}: no task.toml")
    config = _read_toml(toml_path)
    metadata = _table(config, "metadata", toml_path)
    agent = _table(config, "agent", toml_path)
    verifier = _table(config, "verifier", toml_path)
    ours = _table(config, "arborl", toml_path)
    instruction_path = folder / "instruction.md"
    if not instruction_path.is_file():
        raise TaskError(f"{folder}: no instruction.md (what the agent is told)")

    tests = folder / "tests"
    has_script = (tests / "test.sh").is_file()
    fail_to_pass = _ids(ours.get("fail_to_pass", []), "fail_to_pass", toml_path)
    pass_to_pass = _ids(ours.get("pass_to_pass", []), "pass_to_pass", toml_path)
    if "verifier" not in ours and not has_script and not fail_to_pass:
        raise TaskError(f"{folder}: no tests/test.sh (the script that writes the reward), and task.toml names no "
                        "[arborl] fail_to_pass tests to grade by instead")
    kind = ours.get("verifier", "script" if has_script else "tests")
    hidden: Overlay | None = None
    if kind == "script":
        if not has_script:
            raise TaskError(f"{folder}: no tests/test.sh, which the script verifier runs")
        env = verifier.get("env", {})
        if not isinstance(env, dict):
            raise TaskError(f"{toml_path}: [verifier] env must be a table")
        exports = "".join(f"export {name}={shlex.quote(str(value))}; " for name, value in env.items()
                          if str(name).isidentifier())
        default_command = f"{exports}{localize_paths(TESTS_DIR)} && bash {TESTS_DIR}/test.sh"
        hidden = FolderOverlay(tests, TESTS_DIR)
    else:
        default_command = pytest_command((*fail_to_pass, *pass_to_pass), isolated=True) if fail_to_pass else ""
        if tests.is_dir():
            hidden = FolderOverlay(tests, "tests")

    environment = folder / "environment"
    workspace = FolderSource(environment, ENVIRONMENT_EXCLUDE) if environment.is_dir() else InlineFiles(())
    split = ours.get("split", "train")
    if split not in SPLITS:
        raise TaskError(f"{toml_path}: split {split!r} is not one of {', '.join(SPLITS)}")
    extra = {key: value for key, value in metadata.items() if key not in ("difficulty", "category")}
    agent_timeout_s = _timeout(agent, DEFAULT_AGENT_TIMEOUT_S, "agent", toml_path)
    verify_timeout_s = _timeout(verifier, DEFAULT_VERIFY_TIMEOUT_S, "verifier", toml_path)
    reference = _reference(folder)
    try:  # the task model's own checks name the task, not the folder: add it
        return Task(
            id=str(ours.get("id", folder.name)),
            instruction=instruction_path.read_text(),
            workspace=workspace,
            verifier=VerifierSpec(kind, expected=str(ours.get("expected", "")), rubric=str(ours.get("rubric", ""))),
            test_command=str(ours.get("test_command", default_command)),
            fail_to_pass=fail_to_pass,
            pass_to_pass=pass_to_pass,
            hidden_tests=hidden,
            reference=reference,
            agent_timeout_s=agent_timeout_s,
            verify_timeout_s=verify_timeout_s,
            split=split,
            difficulty=str(metadata.get("difficulty", "medium")),
            domain=str(metadata.get("category", "")),
            source=source or str(folder.parent),
            metadata=extra,
            origin=str(folder),
            reference_at="solution/solve.sh",
            workdir=WORKDIR,
        )
    except TaskError as exc:
        raise TaskError(f"{folder}: {exc}") from exc


def is_task_folder(folder: Path) -> bool:
    """A folder meant as a task: it has a task.toml or an instruction.md (one without the other is
    a malformed task, reported as such, not a folder to pass over)."""
    return (folder / "task.toml").is_file() or (folder / "instruction.md").is_file()


def load_harbor_dir(root: Path, *, split: str | None = None, source: str = "",
                    problems: list[TaskError] | None = None) -> list[Task]:
    """Every task folder directly under ``root`` (or ``root`` itself if it is one), sorted by name.

    A malformed task raises its ``TaskError`` (naming its folder and the file at fault), unless
    ``problems`` is given: then the error is appended there, the task skipped, and the rest load."""
    root = Path(root)
    if is_task_folder(root):
        folders = [root]
    else:
        folders = sorted(child for child in root.iterdir() if child.is_dir() and is_task_folder(child))
        if not folders:
            raise TaskError(f"{root} holds no task folders (each needs task.toml and instruction.md)")
    tasks = []
    for folder in folders:
        try:
            tasks.append(load_harbor_task(folder, source=source or str(root)))
        except TaskError as exc:
            if problems is None:
                raise
            problems.append(exc)
    ids = [task.id for task in tasks]
    duplicates = sorted({task_id for task_id in ids if ids.count(task_id) > 1})
    if duplicates:
        raise TaskError(f"{root}: duplicate task ids {duplicates}")
    return select_split(tasks, split)
