from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_sorted():
    assert (ROOT / "sorted.txt").read_text().split() == ["alice", "bob", "carol", "mallory", "trent"]


def test_names_unchanged():
    assert (ROOT / "names.txt").read_text() == "mallory\nalice\ntrent\nbob\ncarol\n"
