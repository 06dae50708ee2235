"""What each sandbox kind costs a rollout: making a sandbox seeded with a task's workspace, one
command, and closing it, against the ``local`` kind in the same run (a ratio).

Each iteration times, interleaved so the machine's drift falls on every kind alike:

  create    make_sandbox(source=a workspace of ``--files`` files) until it is ready
  command   run("python3 -c 'print(1)'"): what each tool call of an agent pays on top of the tool
  close     kill everything and free it

``docker`` runs where its client reaches an engine (``--docker-cli``: .ci/run's podman through
tests/podman_docker; ``--docker-image``, made by tests/podman_image.sh).

    .venv/bin/python tests/bench/bench_sandbox_kinds.py [--files 200] [--iterations 10] \\
        [--docker-cli tests/podman_docker --docker-image localhost/arborl-sandbox-test:bookworm]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from arborl.rollout.sandboxes import Limits, bwrap_unavailable_reason, docker_unavailable_reason, make_sandbox

LIMITS = Limits(wall_s=300, command_s=60)
PHASES = ("create", "command", "close")


def make_workspace(folder: Path, files: int) -> None:
    for index in range(files):
        path = folder / f"pkg{index % 10}" / f"mod{index}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# module {index}\n" + "def f(x):\n    return x + 1\n" * 60)


def one_life(kind: str, top: Path, workspace: Path, options: dict[str, str]) -> dict[str, float]:
    staging = top / "staging"
    shutil.copytree(workspace, staging)  # the orchestrator's staged copy, given up to the sandbox
    started = time.perf_counter()
    sandbox = make_sandbox(kind, top / "sandboxes", name="bench", limits=LIMITS, source=staging, move_source=True,
                           **options)  # type: ignore[arg-type]
    created = time.perf_counter()
    result = sandbox.run("python3 -c 'print(1)'")
    ran = time.perf_counter()
    sandbox.close()
    closed = time.perf_counter()
    shutil.rmtree(staging, ignore_errors=True)
    assert result.stdout == "1\n", result
    return {"create": created - started, "command": ran - created, "close": closed - ran}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--iterations", type=int, default=10)
    parser.add_argument("--docker-cli", default="docker")
    parser.add_argument("--docker-image", default="debian:stable-slim")
    args = parser.parse_args()
    kinds: dict[str, dict[str, str]] = {"local": {}}
    if bwrap_unavailable_reason() is None:
        kinds["bwrap"] = {}
    docker_cli = str(Path(args.docker_cli).absolute()) if "/" in args.docker_cli else args.docker_cli
    if docker_unavailable_reason(docker_cli) is None:
        kinds["docker"] = {"image": args.docker_image, "docker_cli": docker_cli}
    else:
        print(f"docker: {docker_unavailable_reason(docker_cli)} (not measured)")
    top = Path(tempfile.mkdtemp(prefix="arborl-bench-kinds-"))
    top.chmod(0o755)
    workspace = top / "workspace"
    make_workspace(workspace, args.files)
    times: dict[str, dict[str, list[float]]] = {kind: {phase: [] for phase in PHASES} for kind in kinds}
    try:
        for kind, options in kinds.items():  # one untimed life each: caches, the image's first start
            one_life(kind, top, workspace, options)
        for iteration in range(args.iterations):
            for kind, options in kinds.items():
                for phase, seconds in one_life(kind, top, workspace, options).items():
                    times[kind][phase].append(seconds)
            print(f"iteration {iteration + 1}/{args.iterations} done", flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    median = {kind: {phase: statistics.median(values) for phase, values in phases.items()}
              for kind, phases in times.items()}
    print(f"\n{args.files} files, {args.iterations} iterations, median seconds (ratio to local)")
    print(f"{'kind':<8}" + "".join(f"{phase:>20}" for phase in PHASES))
    for kind, phases in median.items():
        cells = "".join(f"{phases[p]:>11.3f} ({phases[p] / median['local'][p]:>5.1f}x)" for p in PHASES)
        print(f"{kind:<8}{cells}")


if __name__ == "__main__":
    main()
