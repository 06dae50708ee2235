from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_three_lines():
    assert (ROOT / "notes.txt").read_text().split() == ["first", "second", "third"]
