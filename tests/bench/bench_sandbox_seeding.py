"""What the sandbox protocol costs a rollout's set-up: seeding a workspace and a scaffold's home
through the protocol against writing them into a process sandbox's host folders.

The orchestrator no longer touches a sandbox's paths (a container's are not on this machine): it
materialises a task in a staging folder of its own and the sandbox seeds its workspace from it
(``make_sandbox(source=...)``), and a scaffold's configuration goes in with ``copy_in(...,
into="home")``. Before, both were written straight into the host folders and handed to the
sandbox's uid. Each iteration times, interleaved, for a task workspace of ``--files`` files:

  workspace, in place   make_sandbox, materialise into ``sandbox.workspace``, hand_over, run("true")
  workspace, staged     materialise into staging, make_sandbox(source=staging, move_source=True) (the
                        orchestrator's way: a rename on one filesystem), remove staging, run("true")
  home, in place        write 3 config files into ``sandbox.home``, hand_over
  home, copy_in         write them into a staging folder, copy_in(into="home")

    .venv/bin/python tests/bench/bench_sandbox_seeding.py [--files 2000] [--iterations 20] [--kind local]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

from arborl.rollout.sandboxes import Limits, bwrap_unavailable_reason, make_sandbox

LIMITS = Limits(wall_s=120, command_s=60)
CONFIG = {".tool/config.toml": "model = 'policy'\n" * 20, ".tool/auth.json": '{"key": "k"}', ".gitconfig": "[user]\n"}


def make_repo(folder: Path, files: int) -> None:
    """A task's repository: ``files`` Python files of ~4 KiB in nested packages."""
    for index in range(files):
        path = folder / f"pkg{index % 20}" / f"sub{index % 7}" / f"mod{index}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# module {index}\n" + "def f(x):\n    return x + 1\n" * 120)


def materialize(repo: Path, dest: Path) -> None:
    shutil.copytree(repo, dest, symlinks=True, dirs_exist_ok=True)  # what a FolderSource task does


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--kind", default="local", choices=["local", "bwrap"])
    args = parser.parse_args()
    if args.kind == "bwrap" and bwrap_unavailable_reason():
        sys.exit(f"bwrap: {bwrap_unavailable_reason()}")
    top = Path(tempfile.mkdtemp(prefix="arborl-bench-seeding-"))
    top.chmod(0o755)
    repo = top / "repo"
    make_repo(repo, args.files)
    size_mb = sum(path.stat().st_size for path in repo.rglob("*") if path.is_file()) / 2**20
    times: dict[str, list[float]] = {"workspace, in place": [], "workspace, staged": [],
                                     "home, in place": [], "home, copy_in": []}
    try:
        for iteration in range(args.iterations + 1):  # the first round warms the page cache
            started = time.perf_counter()
            # a process sandbox: its host folders are there to write into
            box = make_sandbox(args.kind, top / "sandboxes", name="inplace", limits=LIMITS)
            materialize(repo, box.workspace)
            box.hand_over()
            assert box.run("true").ok
            in_place = time.perf_counter() - started
            started = time.perf_counter()
            for relative, text in CONFIG.items():
                (box.home / relative).parent.mkdir(parents=True, exist_ok=True)
                (box.home / relative).write_text(text)
            box.hand_over()
            home_in_place = time.perf_counter() - started
            box.close()

            started = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=top) as staging:
                materialize(repo, Path(staging) / "workspace")
                box = make_sandbox(args.kind, top / "sandboxes", name="staged", limits=LIMITS,
                                   source=Path(staging) / "workspace", move_source=True)
            assert box.run("true").ok
            staged = time.perf_counter() - started
            started = time.perf_counter()
            with tempfile.TemporaryDirectory(dir=top) as staging:
                for relative, text in CONFIG.items():
                    (Path(staging) / relative).parent.mkdir(parents=True, exist_ok=True)
                    (Path(staging) / relative).write_text(text)
                box.copy_in(Path(staging), ".", into="home")
            home_copy_in = time.perf_counter() - started
            assert box.run('cat "$HOME/.gitconfig"').stdout == "[user]\n"
            box.close()
            if iteration:
                for name, seconds in zip(times, (in_place, staged, home_in_place, home_copy_in), strict=True):
                    times[name].append(seconds)
            print(f"\r{iteration}/{args.iterations}", end="", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(top, ignore_errors=True)
    print(f"\n\n{args.kind} sandbox, a workspace of {args.files} files ({size_mb:.1f} MiB), "
          f"median of {args.iterations} interleaved runs\n")
    print("| step | median | vs in place |")
    print("| --- | --- | --- |")
    for name, values in times.items():
        base = statistics.median(times["workspace, in place" if name.startswith("workspace") else "home, in place"])
        print(f"| {name} | {statistics.median(values) * 1000:.1f} ms | {statistics.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
