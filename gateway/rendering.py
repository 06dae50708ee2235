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
from dataclasses import dataclass
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
