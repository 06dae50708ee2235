from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_total():
    assert abs(float((ROOT / "total.txt").read_text().strip()) - 20.0) < 1e-6
