from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_renamed():
    assert (ROOT / "final.md").read_text() == "# Plan\n\n- write\n- review\n"
    assert not (ROOT / "draft.md").exists()
