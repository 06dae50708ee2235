from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_word_count():
    assert (ROOT / "words.txt").read_text().strip() == "15"
