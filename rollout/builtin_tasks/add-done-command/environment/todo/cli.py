"""todo: `python3 -m todo.cli add TITLE`, `python3 -m todo.cli list`."""

import argparse
import sys

from todo.store import TodoStore


def main(argv=None):
    parser = argparse.ArgumentParser(prog="todo")
    parser.add_argument("--file", default="todos.json")
    commands = parser.add_subparsers(dest="command", required=True)
    add = commands.add_parser("add")
    add.add_argument("title")
    commands.add_parser("list")
    args = parser.parse_args(argv)
    store = TodoStore(args.file)
    if args.command == "add":
        todo = store.add(args.title)
        print(f"added {todo['id']}")
    elif args.command == "list":
        for todo in store.load():
            mark = "x" if todo["done"] else " "
            print(f"[{mark}] {todo['id']} {todo['title']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
