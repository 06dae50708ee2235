import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]



def _run(*args):
    done = subprocess.run([sys.executable, "shout.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_upper_flag():
    assert _run("--upper", "hi", "there") == "HI THERE"


def test_plain():
    assert _run("hi", "there") == "hi there"
