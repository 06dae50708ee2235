from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_renamed():
    assert (ROOT / "new_name.txt").read_text() == "contents stay the same\n"
    assert not (ROOT / "old_name.txt").exists()
