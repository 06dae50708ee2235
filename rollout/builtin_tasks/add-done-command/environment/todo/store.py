import json
from pathlib import Path


class TodoStore:
    """Todos kept in a JSON file: a list of {"id": int, "title": str, "done": bool}."""

    def __init__(self, path):
        self.path = Path(path)

    def load(self):
        return json.loads(self.path.read_text()) if self.path.exists() else []

    def save(self, todos):
        self.path.write_text(json.dumps(todos, indent=2))

    def add(self, title):
        todos = self.load()
        todo = {"id": max((t["id"] for t in todos), default=0) + 1, "title": title, "done": False}
        todos.append(todo)
        self.save(todos)
        return todo
