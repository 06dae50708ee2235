from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_pngs_moved():
    assert sorted(p.name for p in ROOT.glob("*.png")) == []
    assert (ROOT / "images" / "cat.png").read_text() == "not really a png: cat\n"
    assert (ROOT / "images" / "dog.png").read_text() == "not really a png: dog\n"


def test_notes_stay():
    assert (ROOT / "notes.txt").read_text() == "pets\n"
