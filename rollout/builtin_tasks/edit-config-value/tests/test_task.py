from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _lines():
    return [line.strip() for line in (ROOT / "settings.ini").read_text().splitlines() if line.strip()]


def test_mode_is_release():
    assert "mode = release" in _lines()
    assert "mode = debug" not in _lines()


def test_other_lines_kept():
    lines = _lines()
    for line in ("[app]", "name = demo", "workers = 4"):
        assert line in lines
