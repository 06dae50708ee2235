from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_deduplicated_in_order():
    assert (ROOT / "emails.txt").read_text().split() == [
        "ana@example.org", "bo@example.org", "cy@example.org", "di@example.org"]
