from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


TEXT = "The quick brown fox\njumps over the lazy dog.\n"


def test_backup_matches():
    assert (ROOT / "backup.txt").read_text() == TEXT


def test_original_kept():
    assert (ROOT / "original.txt").read_text() == TEXT
