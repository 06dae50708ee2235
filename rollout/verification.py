"""Grading a rollout inside its sandbox, after the agent has exited.

The agent's processes are killed first (a background job must not rewrite the tests as they
run), then the task's hidden tests are put into the workspace *by the sandbox's own uid*: files
are staged on the host and streamed in with ``copy_in``, a patch is applied and a script run by a
command inside the sandbox. The host never writes into a workspace the agent has had, so a
symlink the agent left there (``tests -> /etc``) cannot turn the installation into a write
outside it. Then the verifier's command runs in the sandbox and its output is graded.
"""

from __future__ import annotations

import shlex
import tempfile
from collections.abc import Mapping
from pathlib import Path

from .sandboxes import Sandbox, SandboxError
from .tasks import ARBORL_DIR, FolderOverlay, InlineFiles, Overlay, Patch, ShellScript, Task
from .verifiers import BrokenVerifier, CommandOutput, Verdict, Verifier, VerifierError, verifier_for

OVERLAY_PATCH = f"{ARBORL_DIR}/overlay.diff"
OVERLAY_SCRIPT = f"{ARBORL_DIR}/overlay.sh"


class VerificationError(RuntimeError):
    """Grading could not run (the sandbox failed, a judge was unreachable): not the agent's doing."""


class VerifierFailed(VerificationError):
    """Grading ran, and the task's own verifier gave no reward (``verifiers.BrokenVerifier``):
    not the agent's doing either, and told apart so a report can show a dataset's broken tasks."""


def install_hidden_tests(task: Task, sandbox: Sandbox) -> str:
    """Put ``task.hidden_tests`` into the sandbox's workspace; returns "" or, when the agent's
    changes stop them from installing (say, a test patch no longer applies), why not."""
    if task.hidden_tests is None:
        return ""
    return apply_in_sandbox(task.hidden_tests, sandbox, what="the hidden tests")


def apply_in_sandbox(overlay: Overlay, sandbox: Sandbox, *, what: str, env: Mapping[str, str] | None = None) -> str:
    """Apply ``overlay`` to the workspace from inside the sandbox, as its uid and where its
    commands see the workspace (a script that writes ``/app`` paths under ``bwrap`` writes the
    /app the tests will read). Returns "" or why it did not apply, naming it as ``what``. The
    hidden tests go in this way, and so does the oracle's reference solution."""
    with tempfile.TemporaryDirectory(prefix="arborl-overlay-") as staging:
        return _install(overlay, sandbox, Path(staging), what, env)


def _install(overlay: Overlay, sandbox: Sandbox, staging: Path, what: str, env: Mapping[str, str] | None) -> str:
    if isinstance(overlay, InlineFiles):
        overlay.write(staging)
        sandbox.copy_in(staging, ".")
        return ""
    if isinstance(overlay, FolderOverlay):
        sandbox.copy_in(overlay.path, overlay.dest or ".")
        return ""
    if isinstance(overlay, Patch):
        diff = staging / "overlay.diff"
        diff.write_text(overlay.text if overlay.text.endswith("\n") else overlay.text + "\n")
        sandbox.copy_in(diff, OVERLAY_PATCH)
        patch = shlex.quote(OVERLAY_PATCH)
        # as tasks.apply_patch: git apply, then GNU patch with fuzz, as SWE-bench does
        result = sandbox.run(f"git apply --whitespace=nowarn -p1 {patch} || patch --batch --forward --fuzz=5 -p1 "
                             f"-i {patch}; status=$?; rm -f {patch}; exit $status", timeout_s=120, env=env)
        return "" if result.ok else f"{what} do not apply: {(result.stdout + result.stderr)[-2000:]}"
    if isinstance(overlay, ShellScript):
        script = staging / "overlay.sh"
        script.write_text(overlay.text)
        sandbox.copy_in(script, OVERLAY_SCRIPT)
        if overlay.files is not None:
            sandbox.copy_in(overlay.files, overlay.files_dest)
        support = shlex.quote(overlay.files_dest) if overlay.files is not None else ""
        result = sandbox.run(f"bash {shlex.quote(OVERLAY_SCRIPT)}; status=$?; rm -rf {shlex.quote(OVERLAY_SCRIPT)} "
                             f"{support}; exit $status", timeout_s=overlay.timeout_s, env=env)
        if result.timed_out:
            return f"the script of {what} ran past {overlay.timeout_s:g} s"
        return "" if result.ok else f"the script of {what} failed: {(result.stdout + result.stderr)[-2000:]}"
    raise VerificationError(f"unknown overlay {overlay!r}")  # pragma: no cover - the union is closed


def verify_in_sandbox(task: Task, sandbox: Sandbox, *, answer: str = "", verifier: Verifier | None = None) -> Verdict:
    """Grade the workspace (or, for an output or judge task without a command, ``answer``)."""
    verifier = verifier or verifier_for(task)
    try:
        sandbox.kill_all()
        problem = install_hidden_tests(task, sandbox)
        if problem:
            return Verdict(reward=0.0, details=problem)
        command = verifier.command(task)
        outcome = (sandbox.run(command, timeout_s=task.verify_timeout_s) if command
                   else CommandOutput(exit_code=0, stdout=answer))
        return verifier.grade(task, outcome)
    except BrokenVerifier as exc:
        raise VerifierFailed(str(exc)) from exc
    except (SandboxError, VerifierError, OSError) as exc:
        raise VerificationError(f"{type(exc).__name__}: {exc}") from exc
