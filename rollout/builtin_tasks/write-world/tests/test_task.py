from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_world_txt():
    assert (ROOT / "world.txt").read_text().strip() == "world"
