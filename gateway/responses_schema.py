"""Request model of OpenAI Responses (``POST /v1/responses``).

Every input item is typed by its ``type`` (a message when it has none), so a field of the wrong
shape (a ``call_id`` that is a list, a reasoning ``summary`` that is a string) is refused with a
400 naming it, before anything reads it. Items of types arborl does not serve (``web_search_call``
and the like) are kept as ``OtherItem`` and refused with their type named when normalised
(``responses_api.normalise_input``). Unknown fields are accepted and ignored.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Open):
    """A part of a message's or a reasoning item's content; only text parts are served."""

    type: str
    text: str | None = None


class MessageItem(_Open):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]


class FunctionCallItem(_Open):
    type: Literal["function_call"]
    call_id: str
    name: str
    arguments: str | None = None


class FunctionCallOutputItem(_Open):
    type: Literal["function_call_output"]
    call_id: str
    output: str | list[Any] | dict[str, Any] | None = None  # text, or content parts (sent as JSON)


class ReasoningItem(_Open):
    type: Literal["reasoning"]
    content: list[ContentPart] | None = None
    summary: list[ContentPart] | None = None


class OtherItem(_Open):
    """An item of a type arborl does not serve; refused, by type, when the input is normalised."""

    type: str


_ITEM_TYPES = ("message", "function_call", "function_call_output", "reasoning")


def _item_tag(item: Any) -> str:
    # Tags have a space, so error locations leave them out (app.validation_refusal): a bad
    # call_id is reported at input.3.call_id, not input.3.function_call_output.call_id.
    kind = item.get("type", "message") if isinstance(item, dict) else getattr(item, "type", None)
    return f"{kind if kind in _ITEM_TYPES else 'other'} item"


InputItem = Annotated[
    Annotated[MessageItem, Tag("message item")]
    | Annotated[FunctionCallItem, Tag("function_call item")]
    | Annotated[FunctionCallOutputItem, Tag("function_call_output item")]
    | Annotated[ReasoningItem, Tag("reasoning item")]
    | Annotated[OtherItem, Tag("other item")],
    Discriminator(_item_tag),
]


class FunctionChoice(_Open):
    type: Literal["function"]
    name: str


class Reasoning(_Open):
    effort: str | None = None
    summary: str | None = None


class ResponsesRequest(_Open):
    model: str
    input: str | Annotated[list[InputItem], Field(min_length=1)]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionChoice | None = None
    parallel_tool_calls: bool | None = None
    store: bool | None = None
    stream: bool | None = False
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    reasoning: Reasoning | None = None
    previous_response_id: str | None = None
    metadata: dict[str, Any] | None = None
    client_metadata: dict[str, Any] | None = None
