import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_prints_hello_world():
    done = subprocess.run([sys.executable, "hello.py"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                    check=False)
    assert done.returncode == 0
    assert done.stdout.strip() == "Hello, world!"
