from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_count():
    assert (ROOT / "count.txt").read_text().strip() == "7"
