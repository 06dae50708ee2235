"""Task folders and repositories the task, orchestrator and eval tests write: a SWE-bench-style
git repository with a bug and its fix, and a Harbor-style task folder (Harbor's container paths,
as real tasks write them)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

ENV = {**os.environ}
ENV.pop("PYTEST_ADDOPTS", None)


def git(cwd: Path, *args: str) -> str:
    env = {**ENV, "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout


CALC_BUGGY = "def add(a, b):\n    return a - b\n\n\ndef neg(a):\n    return -a\n"
CALC_FIXED = "def add(a, b):\n    return a + b\n\n\ndef neg(a):\n    return -a\n"
TEST_NEG = "from calc import neg\n\n\ndef test_neg():\n    assert neg(2) == -2\n"
TEST_ADD = ("import pytest\nfrom calc import add\n\n\n@pytest.mark.parametrize('a, b, total', [(1, 2, 3), (0, 0, 0)])\n"
            "def test_add(a, b, total):\n    assert add(a, b) == total\n")


def make_swe_repo(tmp_path: Path) -> tuple[Path, str, str, str]:
    """A repository whose base commit has a bug, and a later commit (the fix) that must not leak."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "calc.py").write_text(CALC_BUGGY)
    (repo / "tests" / "test_neg.py").write_text(TEST_NEG)
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "base")
    base = git(repo, "rev-parse", "HEAD").strip()
    (repo / "calc.py").write_text(CALC_FIXED)
    gold = git(repo, "diff")
    (repo / "tests" / "test_add.py").write_text(TEST_ADD)
    git(repo, "add", "-A")
    test_patch = git(repo, "diff", "--cached", "--", "tests")
    git(repo, "commit", "-q", "-m", "the fix")
    return repo, base, gold, test_patch



# -- Harbor-style folders ----------------------------------------------------------------------

HARBOR_TOML = """\
version = "1.0"

[metadata]
author_name = "someone"
difficulty = "hard"
category = "file-operations"
tags = ["shell"]

[verifier]
timeout_sec = 45.0
env = { EXPECTED = "hello from the oracle" }

[agent]
timeout_sec = 900.0

[environment]
build_timeout_sec = 600.0
"""
# Harbor's container paths, as real tasks write them: /app, /tests, /logs/verifier, /solution.
TEST_SH = """\
#!/bin/bash
mkdir -p /logs/verifier
if [ "$(cat /app/out.txt 2>/dev/null)" = "$EXPECTED" ] && python3 /tests/check.py; then
  echo 1 > /logs/verifier/reward.txt
else
  echo 0 > /logs/verifier/reward.txt
fi
"""
CHECK_PY = "from pathlib import Path\n\nassert Path('/app/data/input.txt').read_text() == 'in\\n'\n"
SOLVE_SH = "#!/bin/bash\ncd /app\ncat '/solution/answer.txt' > /app/out.txt\n"


def write_harbor_task(folder: Path, *, reward_json: bool = False) -> Path:
    for sub in ("environment/data", "tests", "solution"):
        (folder / sub).mkdir(parents=True)
    (folder / "task.toml").write_text(HARBOR_TOML)
    (folder / "instruction.md").write_text("Write the expected greeting into /app/out.txt.\n")
    (folder / "environment" / "Dockerfile").write_text("FROM ubuntu:24.04\nWORKDIR /app\n")
    (folder / "environment" / "data" / "input.txt").write_text("in\n")
    test_sh = TEST_SH
    if reward_json:
        test_sh = test_sh.replace("echo 1 > /logs/verifier/reward.txt",
                                  """echo '{"reward": 1.0, "style": 0.5}' > /logs/verifier/reward.json""")
    (folder / "tests" / "test.sh").write_text(test_sh)
    (folder / "tests" / "check.py").write_text(CHECK_PY)
    (folder / "solution" / "solve.sh").write_text(SOLVE_SH)
    (folder / "solution" / "answer.txt").write_text("hello from the oracle\n")
    return folder


def malformed_dataset(root: Path) -> Path:
    """One sound Harbor task and three that each lack a file, next to a folder that is no task."""
    write_harbor_task(root / "sound")
    (write_harbor_task(root / "no-instruction") / "instruction.md").unlink()
    (write_harbor_task(root / "no-test-sh") / "tests" / "test.sh").unlink()
    shutil.rmtree(write_harbor_task(root / "no-solution") / "solution")
    (root / "notes").mkdir()  # neither task.toml nor instruction.md: not a task, and not a problem
    return root


# A Harbor task that takes /app as its working directory the way real ones do: the instruction
# says "in /app", the solution and the tests cd there, and the solution writes a file that itself
# names /app (so its path must be right where the tests run, not only in the scripts' text).
APP_INSTRUCTION = """\
In /app there is a program, greet.py, that prints a greeting. Create an executable script
/app/hello.sh that prints that greeting when run from any folder (it must change into /app
first).
"""
APP_TEST_SH = """\
#!/bin/bash
cd /app
mkdir -p /logs/verifier
if [ -x /app/hello.sh ] && [ "$(cd / && /app/hello.sh)" = "$(python3 greet.py)" ]; then
  echo 1 > /logs/verifier/reward.txt
else
  echo 0 > /logs/verifier/reward.txt
fi
"""
APP_SOLVE_SH = """\
#!/bin/bash
cd /app
cat > /app/hello.sh <<'EOF'
#!/bin/bash
cd /app && python3 greet.py
EOF
chmod +x /app/hello.sh
"""


def write_app_task(folder: Path) -> Path:
    for sub in ("environment", "tests", "solution"):
        (folder / sub).mkdir(parents=True)
    (folder / "task.toml").write_text('version = "1.0"\n\n[verifier]\ntimeout_sec = 60.0\n\n[agent]\n'
                                      "timeout_sec = 120.0\n")
    (folder / "instruction.md").write_text(APP_INSTRUCTION)
    (folder / "environment" / "Dockerfile").write_text("FROM python:3.12-slim\nWORKDIR /app\nCOPY greet.py .\n")
    (folder / "environment" / "greet.py").write_text("print('hello from greet.py')\n")
    (folder / "tests" / "test.sh").write_text(APP_TEST_SH)
    (folder / "solution" / "solve.sh").write_text(APP_SOLVE_SH)
    return folder
