"""The builtin agent's reading of small models' tool calls (the loop itself runs against a live
gateway in tests/integration/test_orchestrator.py)."""

from __future__ import annotations

import json

import pytest

from arborl.scaffold_adapters.builtin import TOOLS, clip, fenced_shell, parse_tool_call


def raw(name: str, arguments) -> dict:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": "call_1", "type": "function", "function": {"name": name, "arguments": text}}


def test_well_formed_calls_pass_through():
    call = parse_tool_call(raw("edit", {"path": "a.py", "old": "x", "new": "y"}))
    assert (call.id, call.name, call.arguments, call.problem) == ("call_1", "edit", {"path": "a.py", "old": "x",
                                                                                     "new": "y"}, "")
    assert parse_tool_call(raw("submit", {})).arguments == {}
    assert parse_tool_call(raw("submit", {"answer": "42"})).arguments == {"answer": "42"}


@pytest.mark.parametrize(("name", "arguments", "expected_name", "expected"), [
    ("shell", {"cmd": "ls"}, "bash", {"command": "ls"}),
    ("Bash", {"command": "ls"}, "bash", {"command": "ls"}),
    ("cat", {"file_path": "a.py"}, "read_file", {"path": "a.py"}),
    ("create_file", {"filename": "a.py", "file_text": "x"}, "write_file", {"path": "a.py", "content": "x"}),
    ("str_replace", {"path": "a.py", "old_str": "x", "new_str": "y"}, "edit", {"path": "a.py", "old": "x", "new": "y"}),
    ("finish", {"result": "done"}, "submit", {"answer": "done"}),
])
def test_near_miss_names_are_understood(name, arguments, expected_name, expected):
    call = parse_tool_call(raw(name, arguments))
    assert (call.name, call.arguments, call.problem) == (expected_name, expected, "")


def test_arguments_that_are_not_json():
    assert parse_tool_call(raw("bash", "ls -la")).arguments == {"command": "ls -la"}  # one argument: the raw text
    assert parse_tool_call(raw("bash", json.dumps("pwd"))).arguments == {"command": "pwd"}  # a JSON string
    broken = parse_tool_call(raw("write_file", '{"path": "a.py", "content": "x'))
    assert "not valid JSON" in broken.problem
    assert "must be a JSON object" in parse_tool_call(raw("write_file", "[1, 2]")).problem
    # a non-string value is passed on as JSON text, not dropped
    assert parse_tool_call(raw("write_file", {"path": "a.json", "content": {"k": 1}})).arguments["content"] == '{"k": 1}'


def test_unknown_tools_and_missing_arguments_are_explained():
    assert "no tool named 'rm_rf'" in parse_tool_call(raw("rm_rf", {})).problem
    assert "needs the argument(s) content" in parse_tool_call(raw("write_file", {"path": "a"})).problem
    assert "needs the argument(s) path, old, new" in parse_tool_call(raw("edit", {})).problem


def test_fenced_blocks_and_clipping():
    assert fenced_shell("Run this:\n```bash\nls -la\n```\nthen that") == "ls -la"
    assert fenced_shell("```sh\npytest -q\n```") == "pytest -q"
    assert fenced_shell("It prints:\n```\nTrue\n```") is None  # a bare fence quotes output, not a command
    assert fenced_shell("no code here") is None and fenced_shell("```bash\n\n```") is None
    text = "a" * 100 + "b" * 100
    clipped = clip(text, 60)
    assert clipped.startswith("a" * 40) and clipped.endswith("b" * 20) and "140 characters cut" in clipped
    assert clip("short", 60) == "short"


def test_every_tool_is_declared_with_its_required_arguments():
    declared = {tool["function"]["name"]: tool["function"]["parameters"]["required"] for tool in TOOLS}
    assert declared == {"bash": ["command"], "read_file": ["path"], "write_file": ["path", "content"],
                        "edit": ["path", "old", "new"], "submit": []}
