"""arborl's own agent: a small Chat Completions loop with five tools, run in-process.

The agent sends the conversation to the gateway's ``/v1/chat/completions`` with the tools
``bash``, ``read_file``, ``write_file``, ``edit`` and ``submit``, runs each tool call through a
``CommandRunner`` (the rollout's sandbox), appends the results as ``tool`` messages, and stops
when the model calls ``submit``, at the turn limit, or at the deadline.

It is written for small models, whose tool calls are often imperfect. What it tolerates:

- arguments that are not valid JSON: a one-argument tool (``bash``, ``read_file``) takes the raw
  text as that argument; otherwise the model is told what was wrong and tries again;
- near-miss names, for tools (``shell``, ``cat``, ``str_replace``, ``finish``, ...) and arguments
  (``cmd``, ``file_path``, ``old_str``, ...);
- no tool call at all but a fenced ```bash (or sh, shell, console) block in the text: the block runs
  as a ``bash`` call (a bare ``` block does not: small models quote output in them);
- a tool call the gateway could not parse (``<tool_call>`` or a JSON ``name`` left in the text):
  the model is told so and tries again (the turn still counts).

A reply with no tool call and no command ends the run, its text the final answer, as a reply
without tool calls ends Claude Code's or Codex's turn: a small model that answers in prose
stops there instead of being prodded through its remaining turns.

The deadline and a stop end a model call at once, whatever the server does (accepts and never
answers, or answers its headers and then nothing): each call runs as a task on an event loop of
the agent's own, and the agent checks the deadline and ``should_stop`` every ``STOP_POLL_S``
while it waits, cancelling the task when either says so. Cancelling closes the connection, which
is how the gateway learns to cancel the generation. Only a tool command can hold the agent past
its deadline, and by at most one second (its timeout is cut to the time left, at least 1 s).

Every turn is one model call, so ``max_turns`` bounds the calls. A tool's output is cut to its
head and tail beyond ``max_output_chars``, so one ``cat`` of a large file does not fill a small
model's context. File tools run as commands too (``cat``, a ``bash`` that writes stdin), so the
sandbox's uid does every read and write, never the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import httpx

from .base import CommandOutcome, GatewayTarget

# How often a model call that is under way checks the deadline and the stop.
STOP_POLL_S = 0.1
# Connecting (and sending the request) must not take longer than this; the answer may take as long
# as the deadline allows.
CONNECT_TIMEOUT_S = 30.0
_T = TypeVar("_T")

# Why a run ended (the same words as arborl.rollout.results).
SUBMITTED, TURN_LIMIT, TIME_LIMIT = "submitted", "turn_limit", "time_limit"
AGENT_ERROR, STOPPED = "agent_error", "stopped"

SYSTEM_PROMPT = """You are a coding agent working in a repository (your current directory).
Do the task with the tools: bash runs a shell command, read_file shows a file, write_file writes
a whole file, edit replaces one exact piece of text in a file. Check your work by running it.
When the task is done, call submit (with your final answer if the task asks for one).
Without a tool call, write one shell command in a ```bash block: it runs, and you see its output.
For example, to list the files reply with:
```bash
ls
```"""

UNPARSED_CALL = ("Your tool call could not be read: call a tool with JSON arguments, or write one shell command in "
                 "a ```bash block.")
# What a tool call the gateway's parser missed leaves in the text.
_CALL_LEFTOVER = re.compile(r'<tool_call>|<function=|"name"\s*:\s*"[A-Za-z_]+"\s*,\s*"(?:arguments|parameters)"')


def _function(name: str, description: str, properties: dict[str, str], required: Sequence[str]) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {
                "type": "object",
                "properties": {key: {"type": "string", "description": text} for key, text in properties.items()},
                "required": list(required),
            },
        },
    }


TOOLS: list[dict[str, Any]] = [
    _function("bash", "Run a shell command in the repository and see its exit code and output.",
              {"command": "the command"}, ["command"]),
    _function("read_file", "Show the contents of a file.", {"path": "the file, relative to the repository"}, ["path"]),
    _function("write_file", "Write a whole file (created if missing, replaced if present).",
              {"path": "the file", "content": "the complete new contents"}, ["path", "content"]),
    _function("edit", "Replace one exact occurrence of old with new in a file.",
              {"path": "the file", "old": "text now in the file, exactly", "new": "the replacement"},
              ["path", "old", "new"]),
    _function("submit", "Finish: the task is done.", {"answer": "your final answer, if the task asks for one"}, []),
]

# Names small models reach for instead of the real ones.
TOOL_ALIASES = {
    "shell": "bash", "run": "bash", "execute": "bash", "run_command": "bash", "terminal": "bash", "sh": "bash",
    "cat": "read_file", "open": "read_file", "open_file": "read_file", "view": "read_file", "read": "read_file",
    "write": "write_file", "create_file": "write_file", "create": "write_file", "save_file": "write_file",
    "str_replace": "edit", "replace": "edit", "edit_file": "edit", "str_replace_editor": "edit",
    "finish": "submit", "done": "submit", "final_answer": "submit", "answer": "submit", "complete": "submit",
}  # fmt: skip
ARGUMENT_ALIASES = {
    "command": ("command", "cmd", "script", "code", "bash"),
    "path": ("path", "file", "filename", "file_path", "filepath", "name"),
    "content": ("content", "contents", "text", "code", "file_text", "data"),
    "old": ("old", "old_str", "old_string", "old_text", "search", "find"),
    "new": ("new", "new_str", "new_string", "new_text", "replace", "replacement"),
    "answer": ("answer", "result", "output", "final_answer", "summary", "message", "text"),
}
REQUIRED = {"bash": ("command",), "read_file": ("path",), "write_file": ("path", "content"),
            "edit": ("path", "old", "new"), "submit": ()}  # fmt: skip
# Only a block marked as shell runs: small models put program output and prose in bare fences.
_FENCED_SHELL = re.compile(r"```(?:bash|sh|shell|console)[ \t]*\n(.*?)```", re.DOTALL)


class CommandRunner(Protocol):
    """Where the agent's commands run (a rollout's sandbox): a string runs through bash, a
    sequence as an argv, in the repository."""

    def run(self, command: str | Sequence[str], *, timeout_s: float | None = None,
            stdin: str | None = None) -> CommandOutcome: ...


class AgentError(RuntimeError):
    """The gateway could not be reached or refused the agent's request."""

    def __init__(self, message: str, *, calls: int):
        super().__init__(message)
        self.calls = calls  # model calls that had succeeded before it


@dataclass(frozen=True)
class AgentRun:
    ended_by: str  # SUBMITTED, TURN_LIMIT, TIME_LIMIT, AGENT_ERROR or STOPPED
    turns: int  # model calls made
    tools_s: float  # seconds spent running tool calls
    answer: str  # submit's answer, else the last assistant text
    error: str = ""


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: dict[str, str]
    problem: str = ""  # why the call cannot run as given; sent back to the model instead


def parse_tool_call(raw: Mapping[str, Any]) -> ToolCall:
    """One OpenAI ``tool_calls`` entry as a runnable call, forgiving the usual small-model slips."""
    function = raw.get("function") or {}
    call_id = str(raw.get("id") or "call")
    given = str(function.get("name") or "").strip()
    name = given if given in REQUIRED else TOOL_ALIASES.get(given.lower(), given.lower())
    if name not in REQUIRED:
        known = ", ".join(REQUIRED)
        return ToolCall(call_id, given, {}, f"there is no tool named {given!r}; the tools are {known}")
    text = function.get("arguments")
    arguments: Any
    if isinstance(text, Mapping):
        arguments = text
    else:
        try:
            arguments = json.loads(text or "{}")
        except json.JSONDecodeError as exc:
            if len(REQUIRED[name]) == 1 and text and text.strip():
                return ToolCall(call_id, name, {REQUIRED[name][0]: text.strip()})
            return ToolCall(call_id, name, {}, f"the arguments are not valid JSON ({exc.msg}); send a JSON object")
    if isinstance(arguments, str) and len(REQUIRED[name]) == 1:
        arguments = {REQUIRED[name][0]: arguments}
    if not isinstance(arguments, Mapping):
        return ToolCall(call_id, name, {}, "the arguments must be a JSON object")
    resolved = _resolve_arguments(name, arguments)
    missing = [key for key in REQUIRED[name] if key not in resolved]
    if missing:
        return ToolCall(call_id, name, resolved, f"{name} needs the argument(s) {', '.join(missing)}")
    return ToolCall(call_id, name, resolved)


def _resolve_arguments(name: str, arguments: Mapping[str, Any]) -> dict[str, str]:
    wanted = REQUIRED[name] if name != "submit" else ("answer",)
    resolved: dict[str, str] = {}
    for key in wanted:
        for alias in ARGUMENT_ALIASES[key]:
            if alias in arguments and arguments[alias] is not None:
                value = arguments[alias]
                resolved[key] = value if isinstance(value, str) else json.dumps(value)
                break
    return resolved


def fenced_shell(text: str) -> str | None:
    """The first fenced shell block in a reply, for a model that wrote its command as text."""
    match = _FENCED_SHELL.search(text or "")
    return match.group(1).strip() or None if match else None


def clip(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    head = limit * 2 // 3
    tail = limit - head
    return f"{text[:head]}\n[... {len(text) - limit} characters cut ...]\n{text[-tail:]}"


class BuiltinAgent:
    def __init__(
        self,
        target: GatewayTarget,
        runner: CommandRunner,
        *,
        max_turns: int = 30,
        deadline: float | None = None,  # time.monotonic() value
        command_timeout_s: float = 60.0,
        max_tokens: int = 1024,
        temperature: float | None = None,
        max_output_chars: int = 3000,
        transport: httpx.AsyncBaseTransport | None = None,
        log: Callable[[str], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ):
        self.target = target
        self.runner = runner
        self.max_turns = max_turns
        self.deadline = deadline
        self.command_timeout_s = command_timeout_s
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.max_output_chars = max_output_chars
        self._transport = transport  # tests substitute the network
        self._log = log or (lambda line: None)
        self._should_stop = should_stop or (lambda: False)

    def run(self, instruction: str) -> AgentRun:
        # One event loop and one client for the whole run: connections are reused between turns,
        # and every model call is a task the loop can cancel (see the module docstring).
        with asyncio.Runner() as loop:
            http = httpx.AsyncClient(timeout=httpx.Timeout(CONNECT_TIMEOUT_S, read=None), transport=self._transport)
            try:
                return self._turns(instruction, lambda messages, turns: loop.run(
                    self._until_cut(self._complete(http, messages, turns))))
            finally:
                loop.run(http.aclose())

    def _turns(self, instruction: str,
               complete: Callable[[list[dict[str, Any]], int], dict[str, Any] | None]) -> AgentRun:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": instruction},
        ]
        turns, tools_s, answer = 0, 0.0, ""
        while True:
            if self._should_stop():
                return AgentRun(STOPPED, turns, tools_s, answer)
            if turns >= self.max_turns:
                return AgentRun(TURN_LIMIT, turns, tools_s, answer)
            if self._seconds_left() <= 0:
                return AgentRun(TIME_LIMIT, turns, tools_s, answer)
            try:
                message = complete(messages, turns)
            except AgentError as exc:
                if turns == 0:
                    raise
                return AgentRun(AGENT_ERROR, turns, tools_s, answer, error=str(exc))
            if message is None:  # cut short: the next check says why
                continue
            turns += 1
            messages.append(_assistant_echo(message))
            text = message.get("content") or ""
            answer = text or answer
            started = time.monotonic()
            submitted = self._act(message, messages)
            tools_s += time.monotonic() - started
            if submitted is not None:
                return AgentRun(SUBMITTED, turns, tools_s, submitted or answer)

    # -- one turn -------------------------------------------------------------------------------

    async def _until_cut(self, work: Coroutine[Any, Any, _T]) -> _T | None:
        """``work``'s result, or None once a stop or the deadline cut it off (cancelled: its
        connection closes). Checked every ``STOP_POLL_S``, and exactly at the deadline."""
        task = asyncio.ensure_future(work)
        try:
            while True:
                left = self._seconds_left()
                if self._should_stop() or left <= 0:
                    return None
                done, _ = await asyncio.wait({task}, timeout=min(STOP_POLL_S, left))
                if done:
                    return task.result()
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _complete(self, http: httpx.AsyncClient, messages: list[dict[str, Any]],
                        turns: int) -> dict[str, Any]:
        """One model call, streamed (the stream is what a cut closes)."""
        body: dict[str, Any] = {"model": self.target.model, "messages": messages, "tools": TOOLS,
                                "max_tokens": self.max_tokens, "stream": True}
        if self.temperature is not None:
            body["temperature"] = self.temperature
        url = self.target.openai_base_url + "/chat/completions"
        headers = {"authorization": f"Bearer {self.target.api_key}"}
        for attempt in range(8):
            try:
                async with http.stream("POST", url, json=body, headers=headers) as response:
                    if response.status_code == 429 and attempt < 7:  # the gateway's queue is full: back off
                        await response.aclose()
                        await asyncio.sleep(min(0.25 * 2**attempt, 5.0))
                        continue
                    if response.status_code != 200:
                        text = (await response.aread()).decode(errors="replace")
                        raise AgentError(f"the gateway answered {response.status_code}: {text[:500]}", calls=turns)
                    message = await self._read_stream(response)
            except httpx.HTTPError as exc:
                raise AgentError(f"the gateway could not be reached: {exc}", calls=turns) from exc
            self._log(f"turn {turns + 1}: finish={message.pop('finish_reason', None)} "
                      f"{json.dumps(message, ensure_ascii=False)[:2000]}")
            return message
        raise AgentError("the gateway stayed busy (429)", calls=turns)

    @staticmethod
    async def _read_stream(response: httpx.Response) -> dict[str, Any]:
        """The assistant message a Chat Completions stream builds up."""
        content: list[str] = []
        calls: dict[int, dict[str, Any]] = {}
        finish = None
        async for line in response.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise AgentError(f"the gateway failed the call: {chunk['error']}", calls=0)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                content.append(delta.get("content") or "")
                for part in delta.get("tool_calls") or ():
                    call = calls.setdefault(part.get("index", len(calls)), {
                        "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                    call["id"] = part.get("id") or call["id"]
                    function = part.get("function") or {}
                    call["function"]["name"] += function.get("name") or ""
                    call["function"]["arguments"] += function.get("arguments") or ""
                finish = choice.get("finish_reason") or finish
        message: dict[str, Any] = {"role": "assistant", "content": "".join(content) or None, "finish_reason": finish}
        if calls:
            message["tool_calls"] = [calls[index] for index in sorted(calls)]
        return message

    def _act(self, message: Mapping[str, Any], messages: list[dict[str, Any]]) -> str | None:
        """Run the reply's tool calls and append their results; the submit answer ("" for none)
        when the model submitted, else None."""
        raw_calls = message.get("tool_calls") or []
        if not raw_calls:
            text = message.get("content") or ""
            command = fenced_shell(text)
            if command is None:
                if _CALL_LEFTOVER.search(text):
                    messages.append({"role": "user", "content": UNPARSED_CALL})
                    return None
                return text  # an answer in prose: the run ends with it
            messages.append({"role": "user", "content": "Output of your command:\n" + self._bash(command)})
            return None
        submitted: str | None = None
        for raw in raw_calls:
            call = parse_tool_call(raw)
            if call.problem:
                output = f"error: {call.problem}"
            elif call.name == "submit":
                submitted = call.arguments.get("answer", "")
                output = "submitted"
            else:
                output = self._run_tool(call)
            self._log(f"  {call.name} -> {output[:1000]}")
            messages.append({"role": "tool", "tool_call_id": call.id, "content": output})
        return submitted

    def _run_tool(self, call: ToolCall) -> str:
        args = call.arguments
        if call.name == "bash":
            return self._bash(args["command"])
        if call.name == "read_file":
            result = self._command(["cat", "--", args["path"]])
            return clip(result.stdout, self.max_output_chars) if result.exit_code == 0 else _failure(result)
        if call.name == "write_file":
            return self._write(args["path"], args["content"])
        return self._edit(args["path"], args["old"], args["new"])

    def _bash(self, command: str) -> str:
        result = self._command(command)
        output = clip(_output(result), self.max_output_chars)
        if result.exit_code is None:
            return f"the command was stopped after {self._timeout():.0f} s\n" + output
        return f"exit code {result.exit_code}\n" + output

    def _write(self, path: str, content: str) -> str:
        script = 'mkdir -p -- "$(dirname -- "$1")" && cat > "$1"'
        result = self._command(["bash", "-c", script, "write_file", path], stdin=content)
        return f"wrote {path} ({len(content)} characters)" if result.exit_code == 0 else _failure(result)

    def _edit(self, path: str, old: str, new: str) -> str:
        current = self._command(["cat", "--", path])
        if current.exit_code != 0:
            return _failure(current)
        count = current.stdout.count(old) if old else 0
        if count != 1:
            where = "does not occur" if count == 0 else f"occurs {count} times"
            return f"error: old {where} in {path}; give text that occurs exactly once"
        return self._write(path, current.stdout.replace(old, new, 1)).replace("wrote", "edited", 1)

    def _command(self, command: str | Sequence[str], *, stdin: str | None = None) -> CommandOutcome:
        return self.runner.run(command, timeout_s=self._timeout(), stdin=stdin)

    def _timeout(self) -> float:
        return max(1.0, min(self.command_timeout_s, self._seconds_left()))

    def _seconds_left(self) -> float:
        return float("inf") if self.deadline is None else self.deadline - time.monotonic()


def _assistant_echo(message: Mapping[str, Any]) -> dict[str, Any]:
    """The reply as the next request carries it back: exactly what the gateway returned, so the
    rendered history matches the tokens the policy produced."""
    echo: dict[str, Any] = {"role": "assistant", "content": message.get("content")}
    if message.get("tool_calls"):
        echo["tool_calls"] = message["tool_calls"]
    return echo


def _output(result: CommandOutcome) -> str:
    return result.stdout + (("\n" if result.stdout and not result.stdout.endswith("\n") else "") + result.stderr
                            if result.stderr else "")


def _failure(result: CommandOutcome) -> str:
    return f"error (exit code {result.exit_code}): {(result.stderr or result.stdout).strip()[:500]}"
