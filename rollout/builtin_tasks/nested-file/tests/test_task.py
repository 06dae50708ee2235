from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_output_result():
    assert (ROOT / "output" / "result.txt").read_text().strip() == "ok"
