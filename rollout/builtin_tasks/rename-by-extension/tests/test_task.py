from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_txt_renamed_to_log():
    logs = ROOT / "logs"
    assert sorted(p.name for p in logs.glob("*.txt")) == []
    assert {p.name: p.read_text() for p in logs.glob("*.log")} == {
        "a.log": "alpha\n", "b.log": "beta\n", "c.log": "gamma\n"}


def test_readme_kept():
    assert (ROOT / "logs" / "readme.md").read_text() == "# logs\n"
