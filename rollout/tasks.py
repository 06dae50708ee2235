"""The task model: one frozen description of a task that every loader produces (DESIGN section 6).

A task is what a rollout needs to start and to be graded:

- ``instruction``: what the agent is told;
- ``workspace``: where its starting files come from (a folder, a tarball, a local git repository
  at a base commit, or files held in memory), materialised into an empty folder by
  ``task.materialize(dest)``;
- ``hidden_tests``: files the agent never sees, put into the workspace by
  ``task.install_hidden_tests(workspace)`` only after the agent has exited, so it can neither
  read nor edit them;
- ``test_command``: a shell command run in the workspace (its working directory) to verify;
- ``fail_to_pass`` / ``pass_to_pass``: pytest node ids, as in SWE-bench;
- ``verifier``: how the command's outcome becomes a reward (``rollout/verifiers.py``);
- ``reference``: an oracle's solution, applied by ``task.apply_reference(workspace)``;
- ``workdir``: the absolute folder the task's own text takes as its working directory (Harbor's
  ``/app``), if any. A sandbox that can put the workspace there does (``bwrap``); otherwise the
  agent gets ``task.instruction_in(folder)``, which names the folder the workspace really is.

Invariants:

- ``task.content_hash()`` changes whenever anything that decides a rollout's result changes:
  the task's fields and the bytes of every file it draws on (workspace, hidden tests, reference;
  a git source by its resolved commit). Where it was loaded from does not count.
- Tasks are immutable values; materialising, installing tests and applying the reference only
  write inside the folder they are given.
- A workspace from a git source is a fresh repository with exactly one commit (the base), so no
  later history (which may hold the fix) leaks to the agent.
- Everything arborl itself adds to a workspace lives under ``.arborl/`` (``ARBORL_DIR``):
  Harbor-style test folders, the verifier's reward files, a reference's support files.
"""

from __future__ import annotations

import fnmatch
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, Literal

Split = Literal["train", "heldout"]
SPLITS: tuple[Split, ...] = ("train", "heldout")
VerifierKind = Literal["tests", "script", "exact", "regex", "judge"]
VERIFIER_KINDS: tuple[VerifierKind, ...] = ("tests", "script", "exact", "regex", "judge")

ARBORL_DIR = ".arborl"
# Where a task's own verification script writes its reward, relative to the workspace (Harbor's
# /logs/verifier is mapped here; see task_loaders/harbor.py). The script verifier also exports it
# as $ARBORL_VERIFIER_DIR.
VERIFIER_DIR = f"{ARBORL_DIR}/logs/verifier"

DEFAULT_AGENT_TIMEOUT_S = 600.0
DEFAULT_VERIFY_TIMEOUT_S = 120.0


class TaskError(ValueError):
    """A task definition that cannot be used: a missing field, a bad value, an unreadable file."""


class WorkspaceError(RuntimeError):
    """Materialising a workspace or applying files to it failed (a patch that does not apply,
    a reference script that exits non-zero, a destination that is not empty)."""


# -- where files come from -------------------------------------------------------------------


def _relative(path: str) -> PurePosixPath:
    """A path that stays inside the folder it is joined to (no absolute paths, no '..')."""
    pure = PurePosixPath(path)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise TaskError(f"path {path!r} must be relative and stay inside the workspace")
    return pure


@dataclass(frozen=True)
class InlineFiles:
    """Text files held in memory: relative path -> content. Used as a workspace (HumanEval's
    stub) and as an overlay (hidden tests, files a reference solution writes)."""

    files: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, files: Mapping[str, str]) -> InlineFiles:
        for path in files:
            _relative(path)
        return cls(tuple(sorted(files.items())))

    def write(self, root: Path) -> None:
        for path, text in self.files:
            target = root / _relative(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(text)


@dataclass(frozen=True)
class FolderSource:
    """A folder whose contents become the workspace (symlinks are copied as links)."""

    path: Path
    exclude: tuple[str, ...] = ()  # glob patterns of names to leave out, e.g. Dockerfile


@dataclass(frozen=True)
class TarballSource:
    """A tar archive (any compression tarfile reads) whose members become the workspace."""

    path: Path


@dataclass(frozen=True)
class GitSource:
    """A local git repository at a base commit."""

    repo: Path
    commit: str


WorkspaceSource = FolderSource | TarballSource | GitSource | InlineFiles


@dataclass(frozen=True)
class FolderOverlay:
    """A folder copied into the workspace at ``dest``, merging with what is there."""

    path: Path
    dest: str = "."


@dataclass(frozen=True)
class Patch:
    """A unified diff (``git diff`` format, paths prefixed a/ and b/) applied at the workspace root."""

    text: str


@dataclass(frozen=True)
class ShellScript:
    """A bash script run in the workspace. ``files``, when given, is copied to ``files_dest``
    first (a Harbor ``solution/`` folder next to its ``solve.sh``) and removed afterwards."""

    text: str
    files: Path | None = None
    files_dest: str = f"{ARBORL_DIR}/solution"
    timeout_s: float = 300.0


Overlay = InlineFiles | FolderOverlay | Patch | ShellScript


@dataclass(frozen=True)
class VerifierSpec:
    """How a task is graded. ``expected`` is the text (exact) or pattern (regex) the output must
    match; ``rubric`` is what an LLM judge scores against (judge)."""

    kind: VerifierKind = "tests"
    expected: str = ""
    rubric: str = ""

    def __post_init__(self) -> None:
        if self.kind not in VERIFIER_KINDS:
            raise TaskError(f"unknown verifier {self.kind!r}; expected one of {', '.join(VERIFIER_KINDS)}")


# -- the task ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Task:
    id: str
    instruction: str
    workspace: WorkspaceSource
    verifier: VerifierSpec = VerifierSpec()
    test_command: str = ""
    fail_to_pass: tuple[str, ...] = ()
    pass_to_pass: tuple[str, ...] = ()
    hidden_tests: Overlay | None = None
    reference: Overlay | None = None
    agent_timeout_s: float = DEFAULT_AGENT_TIMEOUT_S
    verify_timeout_s: float = DEFAULT_VERIFY_TIMEOUT_S
    split: Split = "train"
    difficulty: str = "medium"
    domain: str = ""
    source: str = ""  # the dataset it came from: "builtin", "humaneval", a file or folder path
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    # Where it was defined (a Harbor task's folder, FILE:LINE of a JSONL record) and where its
    # reference solution would be (a Harbor task's "solution/solve.sh"): what a message about a
    # malformed task names. Neither is part of what the task is.
    origin: str = field(default="", compare=False)
    reference_at: str = field(default="", compare=False)
    workdir: str = ""  # see the module docstring

    def __post_init__(self) -> None:
        if not self.id:
            raise TaskError("a task needs an id")
        if not self.instruction.strip():
            raise TaskError(f"task {self.id!r} has an empty instruction")
        if self.split not in SPLITS:
            raise TaskError(f"task {self.id!r}: split {self.split!r} is not one of {', '.join(SPLITS)}")
        if self.verifier.kind == "tests" and not self.fail_to_pass:
            # SWE-bench scores an empty FAIL_TO_PASS as resolved; a task nothing can fail is no task.
            raise TaskError(f"task {self.id!r} is graded by tests but lists no FAIL_TO_PASS test")
        if self.verifier.kind in ("tests", "script") and not self.test_command.strip():
            raise TaskError(f"task {self.id!r} is graded by {self.verifier.kind} but has no test command")
        if self.agent_timeout_s <= 0 or self.verify_timeout_s <= 0:
            raise TaskError(f"task {self.id!r}: timeouts must be positive")
        if self.workdir and not PurePosixPath(self.workdir).is_absolute():
            raise TaskError(f"task {self.id!r}: workdir {self.workdir!r} must be an absolute path")

    @functools.cached_property
    def _content_hash(self) -> str:
        digest = hashlib.sha256()
        fields = {"id": self.id, "instruction": self.instruction, "verifier": [self.verifier.kind,
                  self.verifier.expected, self.verifier.rubric], "test_command": self.test_command,
                  "fail_to_pass": self.fail_to_pass, "pass_to_pass": self.pass_to_pass,
                  "agent_timeout_s": self.agent_timeout_s, "verify_timeout_s": self.verify_timeout_s,
                  "split": self.split, "difficulty": self.difficulty, "domain": self.domain, "workdir": self.workdir,
                  "metadata": self.metadata}
        _feed(digest, "task", json.dumps(fields, sort_keys=True, default=str))
        for name, part in (("workspace", self.workspace), ("hidden_tests", self.hidden_tests),
                           ("reference", self.reference)):
            _feed(digest, name, type(part).__name__)
            if part is not None:
                _hash_part(digest, part)
        return digest.hexdigest()

    def content_hash(self) -> str:
        """A digest of everything about the task that decides a rollout's result (see the module
        docstring); read once per task value, its files included."""
        return self._content_hash

    def instruction_in(self, workspace: str) -> str:
        """The instruction for an agent whose workspace is the folder ``workspace``: where the
        task's ``workdir`` is not that folder, every path under it names the same file there."""
        if not self.workdir or self.workdir == workspace:
            return self.instruction
        return relocate_path(self.instruction, self.workdir, workspace)

    def materialize(self, dest: Path) -> Path:
        """Write the starting workspace into ``dest`` (created if missing, else must be empty)."""
        dest = Path(dest)
        if dest.exists() and any(dest.iterdir()):
            raise WorkspaceError(f"{dest} is not empty")
        dest.mkdir(parents=True, exist_ok=True)
        source = self.workspace
        if isinstance(source, InlineFiles):
            source.write(dest)
        elif isinstance(source, FolderSource):
            _copy_folder(source.path, dest, exclude=source.exclude)
        elif isinstance(source, TarballSource):
            _extract_tarball(source.path, dest)
        elif isinstance(source, GitSource):
            _checkout_fresh(source.repo, source.commit, dest)
        else:  # pragma: no cover - the union is closed
            raise TaskError(f"task {self.id!r}: unknown workspace source {source!r}")
        return dest

    def install_hidden_tests(self, workspace: Path) -> None:
        """Put the hidden tests into the workspace; call only after the agent has exited."""
        if self.hidden_tests is not None:
            apply_overlay(self.hidden_tests, Path(workspace))

    def apply_reference(self, workspace: Path) -> None:
        """Do what an oracle agent would: apply the reference solution to a materialised workspace."""
        if self.reference is None:
            raise TaskError(f"task {self.id!r} has no reference solution")
        apply_overlay(self.reference, Path(workspace))


# -- hashing what a task is made of ------------------------------------------------------------


def _feed(digest: Any, label: str, value: str | bytes) -> None:
    """Length-prefixed, so no two different sequences of parts feed the same bytes."""
    data = value.encode("utf-8", "surrogateescape") if isinstance(value, str) else value
    digest.update(f"{label}:{len(data)}:".encode())
    digest.update(data)


def _hash_part(digest: Any, part: WorkspaceSource | Overlay) -> None:
    if isinstance(part, InlineFiles):
        _feed(digest, "files", json.dumps(part.files))
    elif isinstance(part, FolderSource):
        _hash_folder(digest, part.path, part.exclude)
    elif isinstance(part, TarballSource):
        _hash_file(digest, part.path)
    elif isinstance(part, GitSource):
        _feed(digest, "commit", _resolved_commit(part.repo, part.commit))
    elif isinstance(part, FolderOverlay):
        _feed(digest, "dest", part.dest)
        _hash_folder(digest, part.path, ())
    elif isinstance(part, Patch):
        _feed(digest, "patch", part.text)
    elif isinstance(part, ShellScript):
        _feed(digest, "script", json.dumps([part.text, part.files_dest, part.timeout_s]))
        if part.files is not None:
            _hash_folder(digest, part.files, ())


def _hash_file(digest: Any, path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            _feed(digest, "bytes", hashlib.file_digest(handle, "sha256").digest())
    except OSError as exc:  # materialising will fail on it too, and say so
        _feed(digest, "unreadable", str(exc))


def _hash_folder(digest: Any, top: Path, exclude: Iterable[str]) -> None:
    """Names, kinds, executable bits and contents under ``top``, in a fixed order, leaving out
    what materialising leaves out (``exclude`` names, matched as shutil.ignore_patterns does)."""
    patterns = tuple(exclude)
    for folder, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not any(fnmatch.fnmatch(d, p) for p in patterns))
        for name in sorted(f for f in files if not any(fnmatch.fnmatch(f, p) for p in patterns)):
            path = Path(folder) / name
            _feed(digest, "name", str(path.relative_to(top)))
            if path.is_symlink():
                _feed(digest, "link", os.readlink(path))
                continue
            _feed(digest, "mode", "x" if os.access(path, os.X_OK) else "-")
            _hash_file(digest, path)
        for name in dirs:
            _feed(digest, "dir", str((Path(folder) / name).relative_to(top)))


def _resolved_commit(repo: Path, commit: str) -> str:
    """The commit id ``commit`` names (a branch or tag moves; an id does not)."""
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{commit}^{{commit}}"], cwd=repo,
                              capture_output=True, text=True, env=_git_env(), check=False, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return commit
    return done.stdout.strip() or commit


# -- applying files ----------------------------------------------------------------------------


def apply_overlay(overlay: Overlay, workspace: Path) -> None:
    if isinstance(overlay, InlineFiles):
        overlay.write(workspace)
    elif isinstance(overlay, FolderOverlay):
        dest = workspace / _relative(overlay.dest) if overlay.dest not in ("", ".") else workspace
        _copy_folder(overlay.path, dest)
    elif isinstance(overlay, Patch):
        apply_patch(overlay.text, workspace)
    elif isinstance(overlay, ShellScript):
        _run_script(overlay, workspace)
    else:  # pragma: no cover - the union is closed
        raise TaskError(f"unknown overlay {overlay!r}")


def apply_patch(text: str, workspace: Path) -> None:
    """Apply a unified diff at the workspace root: ``git apply`` (which also works outside a git
    repository), then GNU ``patch`` with some fuzz for diffs git finds too strict, as SWE-bench does."""
    if not text.strip():
        return
    with tempfile.NamedTemporaryFile("w", suffix=".diff", delete=False) as handle:
        handle.write(text if text.endswith("\n") else text + "\n")
        diff = handle.name
    try:
        attempts = [
            ["git", "apply", "--whitespace=nowarn", "-p1", diff],
            ["patch", "--batch", "--forward", "--fuzz=5", "-p1", "-i", diff],
        ]
        errors = []
        for argv in attempts:
            if shutil.which(argv[0]) is None:
                errors.append(f"{argv[0]}: not installed")
                continue
            done = subprocess.run(argv, cwd=workspace, capture_output=True, text=True, env=_git_env(workspace),
                                  check=False)
            if done.returncode == 0:
                return
            errors.append(f"{argv[0]}: {(done.stderr or done.stdout).strip()}")
        raise WorkspaceError("the patch does not apply:\n" + "\n".join(errors))
    finally:
        os.unlink(diff)


def _run_script(script: ShellScript, workspace: Path) -> None:
    support = None
    if script.files is not None:
        support = workspace / _relative(script.files_dest)
        _copy_folder(script.files, support)
    try:
        env = {**os.environ, "ARBORL_WORKSPACE": str(workspace)}
        try:
            done = subprocess.run(["bash", "-c", script.text], cwd=workspace, capture_output=True, text=True,
                                  timeout=script.timeout_s, env=env, stdin=subprocess.DEVNULL, check=False)
        except subprocess.TimeoutExpired as exc:
            raise WorkspaceError(f"the script ran past {script.timeout_s:g} s") from exc
        if done.returncode != 0:
            raise WorkspaceError(f"the script exited {done.returncode}:\n{(done.stdout + done.stderr)[-4000:]}")
    finally:
        if support is not None:
            shutil.rmtree(support, ignore_errors=True)
            _remove_empty_parents(support.parent, workspace)


def _remove_empty_parents(folder: Path, stop: Path) -> None:
    while folder != stop and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


def _copy_folder(src: Path, dest: Path, *, exclude: Iterable[str] = ()) -> None:
    if not src.is_dir():
        raise WorkspaceError(f"{src} is not a folder")
    ignore = shutil.ignore_patterns(*exclude) if exclude else None
    shutil.copytree(src, dest, symlinks=True, ignore=ignore, dirs_exist_ok=True)


def _extract_tarball(path: Path, dest: Path) -> None:
    try:
        with tarfile.open(path) as archive:
            # The "data" filter refuses absolute paths, '..', devices and links leaving dest.
            archive.extractall(dest, filter="data")
    except (OSError, tarfile.TarError) as exc:
        raise WorkspaceError(f"cannot extract {path}: {exc}") from exc


def _git_env(folder: Path | None = None) -> dict[str, str]:
    """A fixed identity and no user or system configuration: the same result on every machine.
    With ``folder``, git looks for a repository in ``folder`` only, never above it, so a workspace
    inside someone's checkout is not read through that repository (its attributes, its index)."""
    env = {**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "GIT_CONFIG_GLOBAL": os.devnull,
           "GIT_AUTHOR_NAME": "arborl", "GIT_AUTHOR_EMAIL": "arborl@localhost",
           "GIT_COMMITTER_NAME": "arborl", "GIT_COMMITTER_EMAIL": "arborl@localhost",
           "GIT_TERMINAL_PROMPT": "0",
           # A workspace belongs to its sandbox's uid while arborl (root) writes it: without this,
           # git refuses a repository another user owns ("dubious ownership").
           "GIT_CONFIG_COUNT": "1", "GIT_CONFIG_KEY_0": "safe.directory", "GIT_CONFIG_VALUE_0": "*"}
    if folder is not None:
        env["GIT_CEILING_DIRECTORIES"] = str(Path(folder).resolve().parent)
    return env


def _git(args: list[str], cwd: Path, *, stdout_bytes: bool = False, contained: bool = True
         ) -> subprocess.CompletedProcess:
    env = _git_env(cwd if contained else None)
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, env=env, text=not stdout_bytes, check=False)
    if done.returncode != 0:
        stderr = done.stderr.decode(errors="replace") if stdout_bytes else done.stderr
        raise WorkspaceError(f"git {' '.join(shlex.quote(a) for a in args)} failed in {cwd}: {stderr.strip()}")
    return done


def _checkout_fresh(repo: Path, commit: str, dest: Path) -> None:
    """The tree of ``repo`` at ``commit`` as a new one-commit repository in ``dest``."""
    if shutil.which("git") is None:
        raise WorkspaceError("git is not installed; it is needed for git workspace sources")
    archive = _git(["archive", "--format=tar", commit], repo, stdout_bytes=True, contained=False).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(dest, filter="data")
    _git(["init", "-q"], dest)
    _git(["add", "-A"], dest)
    _git(["commit", "-q", "--allow-empty", "--no-verify", "-m", f"base {commit[:12]}"], dest)


# -- shared by loaders -------------------------------------------------------------------------


def relocate_path(text: str, old: str, new: str) -> str:
    """``text`` with the absolute path ``old`` replaced by ``new`` where it starts a path (not
    after a letter, digit, '_', '.', '/' or '-', so ``/data/app`` stays) and ends a component
    (``/app/x`` moves, ``/apple`` and ``/app.py`` stay): the rule of the Harbor loader's script
    rewriting (``task_loaders.harbor.localize_paths``), except that prose may end a sentence
    with the path (``... in /app.`` moves)."""
    pattern = re.compile(rf"(?<![A-Za-z0-9_./-]){re.escape(old)}(?![A-Za-z0-9_-]|\.[A-Za-z0-9_])")
    return pattern.sub(lambda match: new, text)


def pytest_command(test_ids: Iterable[str], *, isolated: bool = False) -> str:
    """A pytest run over the files of ``test_ids``, reporting every outcome (``-rA``), and
    continuing past a file that fails to import so the other files' results still count.

    ``isolated`` is for tasks whose tests need nothing from the workspace but its modules (the
    built-in set, HumanEval): the agent's workspace cannot steer the run, since no conftest.py
    (``--noconftest``), ini file (``-c /dev/null``), installed plugin or workspace module named
    like one pytest imports (``python3 -I``, the workspace joins sys.path only once pytest is
    loaded) takes part. A workspace conftest.py that marks every test passed would otherwise be
    an easy reward to learn. Without plugins it also starts about ten times faster where heavy
    ones are installed. A repository's own tests (SWE-bench) may need its configuration, so that
    run is not isolated."""
    files = " ".join(shlex.quote(path) for path in sorted({test_id.split("::", 1)[0] for test_id in test_ids}))
    if not isolated:
        return f"python3 -m pytest -rA -p no:cacheprovider --continue-on-collection-errors {files}"
    return ("PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 python3 -I -m pytest -rA -p no:cacheprovider -c /dev/null "
            f'--rootdir=. --noconftest -o "pythonpath=$PWD" --continue-on-collection-errors {files}')


def select_split(tasks: list[Task], split: str | None) -> list[Task]:
    if split is None:
        return tasks
    if split not in SPLITS:
        raise TaskError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return [task for task in tasks if task.split == split]
