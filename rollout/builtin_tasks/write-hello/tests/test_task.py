from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_hello_txt():
    assert (ROOT / "hello.txt").read_text().strip() == "hello"
