"""The builtin agent's reading of small models' tool calls, and its deadline and stop against a
server that never answers (the loop itself runs against a live gateway in
tests/integration/test_orchestrator.py)."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from arborl.scaffold_adapters.base import GatewayTarget
from arborl.scaffold_adapters.builtin import (
    STOPPED,
    TIME_LIMIT,
    TOOLS,
    BuiltinAgent,
    clip,
    fenced_shell,
    parse_tool_call,
)


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
    parsed = parse_tool_call(raw("write_file", {"path": "a.json", "content": {"k": 1}}))
    assert parsed.arguments["content"] == '{"k": 1}'


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


# -- the deadline and a stop end a model call at once, whatever the server does ------------------


class SilentServer:
    """A TCP server that reads a request and then answers with ``answer`` (maybe nothing) and
    nothing more, keeping the connection open: a gateway stuck in a long prefill, or dead after
    its headers. ``got_request`` is set once a request arrived; ``closed_by_client`` once the
    client hung up (how the gateway learns to cancel the generation)."""

    def __init__(self, answer: bytes = b""):
        self.answer = answer
        self.got_request = threading.Event()
        self.closed_by_client = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self._connections.append(connection)
            threading.Thread(target=self._handle, args=(connection,), daemon=True).start()

    def _handle(self, connection: socket.socket) -> None:
        received = b""
        try:
            while b"\r\n\r\n" not in received:
                chunk = connection.recv(65536)
                if not chunk:
                    return
                received += chunk
            self.got_request.set()
            connection.sendall(self.answer)
            while connection.recv(65536):  # wait for the client to hang up
                pass
            self.closed_by_client.set()
        except OSError:
            pass

    def close(self) -> None:
        self._listener.close()
        for connection in self._connections:
            connection.close()


class NoCommands:
    def run(self, command, *, timeout_s=None, stdin=None):  # pragma: no cover - never reached
        raise AssertionError("no model reply, so no command")


HEADERS_ONLY = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"


def run_in_thread(agent: BuiltinAgent) -> tuple[threading.Thread, list]:
    outcome: list = []
    thread = threading.Thread(target=lambda: outcome.append(agent.run("do it")), daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("answer", [b"", HEADERS_ONLY], ids=["no-answer", "headers-then-nothing"])
def test_the_deadline_ends_a_model_call_the_server_never_answers(answer):
    server = SilentServer(answer)
    try:
        target = GatewayTarget(f"http://127.0.0.1:{server.port}", "key", "tiny")
        agent = BuiltinAgent(target, NoCommands(), deadline=time.monotonic() + 1.0)
        thread, outcome = run_in_thread(agent)
        thread.join(timeout=30)  # a 1 s deadline: generously bounded
        assert not thread.is_alive(), "the agent waited on the server past its deadline"
        assert (outcome[0].ended_by, outcome[0].turns) == (TIME_LIMIT, 0)
        assert server.closed_by_client.wait(10)  # the call was cut off, so the gateway can cancel it
    finally:
        server.close()


@pytest.mark.parametrize("answer", [b"", HEADERS_ONLY], ids=["no-answer", "headers-then-nothing"])
def test_a_stop_ends_a_model_call_the_server_never_answers(answer):
    server = SilentServer(answer)
    try:
        target = GatewayTarget(f"http://127.0.0.1:{server.port}", "key", "tiny")
        # no deadline: only the stop (Ctrl-C, SIGTERM) ends it, once the request is at the server
        agent = BuiltinAgent(target, NoCommands(), should_stop=server.got_request.is_set)
        thread, outcome = run_in_thread(agent)
        thread.join(timeout=30)
        assert not thread.is_alive(), "the agent ignored the stop while it waited on the server"
        assert (outcome[0].ended_by, outcome[0].turns) == (STOPPED, 0)
        assert server.closed_by_client.wait(10)
    finally:
        server.close()
