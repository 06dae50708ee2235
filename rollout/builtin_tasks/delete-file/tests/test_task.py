from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_temp_log_deleted():
    assert not (ROOT / "temp.log").exists()


def test_keep_txt_kept():
    assert (ROOT / "keep.txt").read_text() == "important\n"
