from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_build_is_a_directory():
    assert (ROOT / "build").is_dir()
