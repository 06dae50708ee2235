from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_todo_txt():
    assert (ROOT / "todo.txt").read_text().strip() == "buy milk"
