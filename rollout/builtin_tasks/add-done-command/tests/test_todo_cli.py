import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def _todo(tmp_path, *args):
    done = subprocess.run([sys.executable, "-m", "todo.cli", "--file", str(tmp_path / "todos.json"), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)
    return done.returncode, done.stdout


def test_done_marks_a_todo(tmp_path):
    _todo(tmp_path, "add", "write tests")
    _todo(tmp_path, "add", "ship")
    assert _todo(tmp_path, "done", "2")[0] == 0
    assert _todo(tmp_path, "list")[1].splitlines() == ["[ ] 1 write tests", "[x] 2 ship"]


def test_done_unknown_id_fails(tmp_path):
    _todo(tmp_path, "add", "only one")
    assert _todo(tmp_path, "done", "7")[0] != 0
    assert _todo(tmp_path, "done", "1")[0] == 0


def test_add_and_list(tmp_path):
    assert _todo(tmp_path, "add", "first") == (0, "added 1\n")
    assert _todo(tmp_path, "list")[1] == "[ ] 1 first\n"
