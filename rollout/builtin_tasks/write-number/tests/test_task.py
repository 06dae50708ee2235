from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_answer_txt():
    assert (ROOT / "answer.txt").read_text().strip() == "42"
