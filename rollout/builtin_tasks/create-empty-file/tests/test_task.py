from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_done_exists_and_is_empty():
    done = ROOT / "DONE"
    assert done.is_file()
    assert done.read_text().strip() == ""
