"""Messages -> the model's chat template -> prompt text and ids (DESIGN section 3).

Every dialect is first normalised to one chat form (``ChatMessage`` dicts below); this module
turns that form into the prompt the model was trained on. When the model's template knows
tools, it gets them natively. When it does not (SmolLM2's plain ChatML, for one), the tools are
described in the system block in the Hermes style and earlier tool calls and results are
written into the conversation the way the model's tool-call parser reads them.

Normalised messages (plain dicts, JSON-serialisable, stored with every call):
    {"role": "system" | "user" | "assistant" | "tool",
     "content": str,
     "tool_calls": [{"id": str, "name": str, "arguments": str}],   # assistant, optional
     "reasoning": str,                                              # assistant, optional
     "tool_call_id": str}                                           # tool
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Any

from .engines.base import ForcedToolCall, TokenizerLike
from .errors import InvalidRequest
from .json_nesting import MAX_JSON_DEPTH, nesting_exceeds
from .tool_parsers import ToolCallParser

ChatMessage = dict[str, Any]

HERMES_TOOL_PROMPT = """# Tools

You may call one or more functions to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>
{tools}
</tools>

For each function call, return the call in this format:
{example}"""

# The start of an assistant turn that commits the model to a tool call (tool_choice
# "required" / a named function): the text is put into the prompt, the model continues it.
_FORCED_CALL_PREFIX = {
    "hermes": ('<tool_call>\n{"name": "', '<tool_call>\n{{"name": "{name}", "arguments": '),
    "qwen3_coder": ("<tool_call>\n<function=", "<tool_call>\n<function={name}>\n"),
    "llama3_json": ('{"name": "', '{{"name": "{name}", "parameters": '),
}
# What the model must write after that opening for the call to parse (engines constrain their
# sampling to it): (after the name, arguments as a JSON object, the call's end). Qwen3-Coder's
# parameters are XML, so only its name is constrained.
_FORCED_CALL_REST = {
    "hermes": ('", "arguments": ', True, "}\n</tool_call>"),
    "qwen3_coder": (">\n", False, ""),
    "llama3_json": ('", "parameters": ', True, "}"),
}

_SENTINEL = "\x00arborl-turn-end\x00"

# Conversations the template is probed with (``ChatRenderer.composes``): tools, tool calls, tool
# results in a row, reasoning in an earlier turn, with and without a system message.
_PROBE_TOOLS = [{"type": "function", "function": {"name": "run", "description": "Run a command",
                                                   "parameters": {"type": "object",
                                                                  "properties": {"cmd": {"type": "string"}}}}}]
_PROBES: list[list[ChatMessage]] = [
    [{"role": "system", "content": "You are an agent."}, {"role": "user", "content": "Fix it."},
     {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "name": "run", "arguments": '{"cmd": "ls"}'},
                                                         {"id": "c2", "name": "run", "arguments": '{"cmd": "pwd"}'}]},
     {"role": "tool", "content": "a.py", "tool_call_id": "c1"}, {"role": "tool", "content": "/w", "tool_call_id": "c2"},
     {"role": "assistant", "content": "Done.", "reasoning": "It was fixed."}, {"role": "user", "content": "Thanks."},
     {"role": "assistant", "content": "Welcome."}, {"role": "user", "content": "Bye."}],
    [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello.", "reasoning": "Greet."},
     {"role": "user", "content": "Again."}],
]


@dataclass(frozen=True)
class RenderedPrompt:
    text: str
    # Text already in the prompt that the model's output continues (a forced tool call, or an
    # opened <think>); the parsers see it in front of the generated text.
    forced_prefix: str = ""
    starts_in_reasoning: bool = False
    forced_call: ForcedToolCall | None = None  # what the completion must begin with (tool_choice forces a call)


class ChatRenderer:
    def __init__(self, tokenizer: TokenizerLike, tool_parser: ToolCallParser):
        self.tokenizer = tokenizer
        self.tool_parser = tool_parser
        template = getattr(tokenizer, "chat_template", None) or ""
        if not template:
            raise ValueError("the tokenizer has no chat template")
        self.native_tools = "tools" in template

    @cached_property
    def _longest_token_chars(self) -> int | None:
        """The most characters of text one token stands for (None: the tokenizer does not say).

        A vocabulary entry is written with at least one character per byte or character it
        covers (byte-level BPE maps each byte to one character; SentencePiece writes the text),
        so its length bounds what it covers; special tokens are their own text.
        """
        vocab = getattr(self.tokenizer, "get_vocab", None)
        return max((len(token) for token in vocab()), default=None) if vocab else None

    def fewest_tokens(self, text: str) -> int:
        """A lower bound on the tokens ``text`` encodes to, without encoding it (0: no bound known).

        Used to refuse a prompt far beyond the context before spending seconds and memory on
        tokenising megabytes. The margin of 4 covers normalisers that compose several characters
        into one (NFC) before the vocabulary is applied.
        """
        longest = self._longest_token_chars
        return len(text) // (4 * longest) if longest else 0

    def encode(self, text: str) -> list[int]:
        # JSON can carry lone UTF-16 surrogates ("\ud800") that no tokenizer accepts: make them U+FFFD.
        text = text.encode("utf-8", "surrogatepass").decode("utf-8", "replace")
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def render(
        self,
        messages: list[ChatMessage],
        tools: list[dict[str, Any]] | None = None,
        *,
        add_generation_prompt: bool = True,
        tool_choice: str | dict[str, Any] | None = None,
        enable_thinking: bool | None = None,
    ) -> RenderedPrompt:
        """The prompt text for ``messages``; ``tools`` are OpenAI function schemas.

        ``enable_thinking`` is passed to templates that switch reasoning on and off (Qwen3);
        None leaves the template's default.
        """
        if tool_choice == "none":
            tools = None
        extra = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        if self.native_tools:
            text = self._apply(self._native_messages(messages), tools, add_generation_prompt, **extra)
        else:
            text = self._apply(self._hermes_messages(messages, tools), None, add_generation_prompt, **extra)
        forced, forced_call = "", None
        if add_generation_prompt and tools:
            forced = self._forced_prefix(tool_choice)
            forced_call = self._forced_call(tool_choice, tools) if forced else None
        starts_in_reasoning = add_generation_prompt and text.rstrip().endswith("<think>")
        return RenderedPrompt(text + forced, forced, starts_in_reasoning, forced_call)

    @cached_property
    def composes(self) -> bool:
        """Whether the template writes a conversation as its messages' texts one after another,
        so that what follows an assistant reply renders from the messages after it alone
        (ChatML-like templates do; Qwen3's, which drops the reasoning of earlier turns, does not).
        Probed once, on conversations with tools, tool calls, tool results and reasoning, split
        after each assistant message."""
        try:
            for tools in (None, _PROBE_TOOLS):
                for conversation in _PROBES:
                    whole = self.render(conversation, tools).text
                    for k in range(1, len(conversation)):
                        if conversation[k - 1]["role"] != "assistant":
                            continue
                        head = self.render(conversation[:k], tools, add_generation_prompt=False).text
                        tail = self.render_after(conversation[0], conversation[k:], tools)
                        if tail is None or head + tail.text != whole:
                            return False
        except Exception:  # noqa: BLE001 - a template that cannot render the probes: render whole
            return False
        return True

    def render_after(
        self,
        first: ChatMessage,
        after: list[ChatMessage],
        tools: list[dict[str, Any]] | None = None,
        *,
        tool_choice: str | dict[str, Any] | None = None,
        enable_thinking: bool | None = None,
    ) -> RenderedPrompt | None:
        """What the template writes for ``after`` (and the generation prompt) in a conversation
        that starts with ``first``: the end of any such conversation when ``composes``. None if the
        template does not write ``first`` alone as the start of ``first`` and ``after``."""
        head = self.render([first], tools, add_generation_prompt=False, tool_choice=tool_choice,
                           enable_thinking=enable_thinking).text
        whole = self.render([first, *after], tools, tool_choice=tool_choice, enable_thinking=enable_thinking)
        if not whole.text.startswith(head):
            return None
        return replace(whole, text=whole.text[len(head):])

    @cached_property
    def turn_suffix(self) -> str:
        """What the template writes after an assistant message's content (``<|im_end|>\\n``)."""
        probe = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _SENTINEL}]
        text = self._apply(probe, None, add_generation_prompt=False)
        return text[text.index(_SENTINEL) + len(_SENTINEL) :]

    def _apply(self, messages: list[ChatMessage], tools, add_generation_prompt: bool, **extra: Any) -> str:
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": add_generation_prompt, **extra}
        if tools:
            kwargs["tools"] = tools
        return self.tokenizer.apply_chat_template(messages, **kwargs)  # type: ignore[attr-defined]

    def _forced_prefix(self, tool_choice: str | dict[str, Any] | None) -> str:
        required, named = _FORCED_CALL_PREFIX.get(self.tool_parser.name, _FORCED_CALL_PREFIX["hermes"])
        if tool_choice == "required":
            return required
        if isinstance(tool_choice, dict):
            return named.format(name=tool_choice["function"]["name"])
        return ""

    def _forced_call(self, tool_choice: str | dict[str, Any] | None, tools: list[dict[str, Any]]) -> ForcedToolCall:
        after_name, json_arguments, closer = _FORCED_CALL_REST.get(self.tool_parser.name, _FORCED_CALL_REST["hermes"])
        if isinstance(tool_choice, dict):  # the prompt names the tool already: only its arguments remain
            return ForcedToolCall((), "", json_arguments, closer)
        names = tuple(tool["function"]["name"] for tool in tools)
        return ForcedToolCall(names, after_name, json_arguments, closer)

    @staticmethod
    def _native_messages(messages: list[ChatMessage]) -> list[ChatMessage]:
        out = []
        for message in messages:
            item: dict[str, Any] = {"role": message["role"], "content": message.get("content", "")}
            if message.get("tool_calls"):
                item["tool_calls"] = [
                    {
                        "id": call["id"],
                        "type": "function",
                        "function": {"name": call["name"], "arguments": _arguments_object(call)},
                    }
                    for call in message["tool_calls"]
                ]
            if message.get("reasoning"):
                item["reasoning_content"] = message["reasoning"]
            if message.get("tool_call_id"):
                item["tool_call_id"] = message["tool_call_id"]
            out.append(item)
        return out

    def _hermes_messages(self, messages: list[ChatMessage], tools: list[dict[str, Any]] | None) -> list[ChatMessage]:
        """Tools described in the system block; calls and results written as the model writes them."""
        out: list[ChatMessage] = []
        for message in messages:
            role, content = message["role"], message.get("content", "")
            if role == "assistant" and message.get("tool_calls"):
                calls = [
                    self.tool_parser.format_call(call["name"], _arguments_object(call))
                    for call in message["tool_calls"]
                ]
                content = "\n".join(([content] if content else []) + calls)
                out.append({"role": "assistant", "content": content})
            elif role == "tool":
                response = f"<tool_response>\n{content}\n</tool_response>"
                if out and out[-1]["role"] == "user" and out[-1].get("_tool_results"):
                    out[-1]["content"] += "\n" + response
                else:
                    out.append({"role": "user", "content": response, "_tool_results": True})
            else:
                out.append({"role": role, "content": content})
        if tools:
            example = self.tool_parser.format_call("function_name", {"argument": "value"})
            block = HERMES_TOOL_PROMPT.format(
                tools="\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools), example=example
            )
            if out and out[0]["role"] == "system":
                out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + block}
            else:
                out.insert(0, {"role": "system", "content": block})
        return [{k: v for k, v in m.items() if not k.startswith("_")} for m in out]


def _arguments_object(call: dict[str, Any]) -> dict[str, Any] | str:
    """An earlier tool call's arguments as the object the template writes (the text, if not JSON).

    The arguments are JSON inside a string, which the request body's nesting limit does not see:
    the same limit is applied here, before they are parsed.
    """
    arguments = call["arguments"]
    if isinstance(arguments, dict):
        return arguments
    if nesting_exceeds(arguments):
        raise InvalidRequest(f"the arguments of tool call {call['id']!r} nest arrays and objects more than "
                             f"{MAX_JSON_DEPTH} levels deep (the gateway's limit)", param="messages")
    try:
        value = json.loads(arguments)
    except (TypeError, ValueError):
        return arguments
    return value if isinstance(value, dict) else arguments


class ConversationPrompt:
    """One request's prompt, rendered no further than needed: a call late in a long session
    renders what it added, not the whole conversation again (DESIGN section 11).

    ``whole``: the conversation rendered (what a fresh tokenisation encodes), on first use.
    ``after(k)``: the text the template writes after ``messages[:k + 1]`` (an earlier reply the
    session's trie holds), generation prompt included; None when the template does not write the
    conversation as an extension of that reply ending with ``turn_suffix`` (stitching then
    tokenises afresh). When the template composes (``ChatRenderer.composes``) it is rendered from
    the messages after the reply alone; otherwise it is cut from ``whole``.
    ``ending``: the prompt's last render, which knows the forced prefix and call and whether the
    prompt opens the model's reasoning (these depend only on the prompt's end).
    """

    def __init__(self, renderer: ChatRenderer, messages: list[ChatMessage], tools: list[dict[str, Any]] | None,
                 *, tool_choice: str | dict[str, Any] | None = None, enable_thinking: bool | None = None):
        self.renderer, self.messages, self.tools = renderer, messages, tools
        self._options: dict[str, Any] = {"tool_choice": tool_choice, "enable_thinking": enable_thinking}
        self._tail: RenderedPrompt | None = None

    @cached_property
    def whole(self) -> RenderedPrompt:
        return self.renderer.render(self.messages, self.tools, **self._options)

    @property
    def ending(self) -> RenderedPrompt:
        return self._tail if self._tail is not None and "whole" not in self.__dict__ else self.whole

    def after(self, k: int) -> str | None:
        renderer, through, suffix = self.renderer, self.messages[: k + 1], self.renderer.turn_suffix
        enable_thinking = self._options["enable_thinking"]
        if renderer.composes:
            # the reply's own text, as the template writes it after the conversation's first message
            reply = renderer.render(through[:1] + through[1:][-1:], self.tools, add_generation_prompt=False,
                                    enable_thinking=enable_thinking).text
            tail = renderer.render_after(through[0], self.messages[k + 1 :], self.tools, **self._options)
            if tail is None or not reply.endswith(suffix):
                return None
            self._tail = tail
            return tail.text
        rendered = renderer.render(through, self.tools, add_generation_prompt=False,
                                   enable_thinking=enable_thinking).text
        if not self.whole.text.startswith(rendered) or not rendered.endswith(suffix):
            return None
        return self.whole.text[len(rendered):]
