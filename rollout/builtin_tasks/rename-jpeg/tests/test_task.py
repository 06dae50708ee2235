from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_jpeg_renamed():
    photos = ROOT / "photos"
    assert list(photos.glob("*.jpeg")) == []
    assert {p.name: p.read_text() for p in photos.glob("*.jpg")} == {"beach.jpg": "beach\n",
                                                                     "hills.jpg": "hills\n"}


def test_index_kept():
    assert (ROOT / "photos" / "index.html").read_text() == "<ul></ul>\n"
