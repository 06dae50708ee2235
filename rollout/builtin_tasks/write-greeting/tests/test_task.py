from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_greeting_txt():
    assert (ROOT / "greeting.txt").read_text().strip() == "good morning"
