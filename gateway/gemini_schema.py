"""Request models of the Gemini API (``:generateContent``, ``:streamGenerateContent``, ``:countTokens``).

Field names are Google's camelCase (``systemInstruction``, ``functionCall``, ``maxOutputTokens``);
the snake_case spelling of each is accepted too, as Google's REST API accepts both (the proto JSON
mapping). Unknown fields (``safetySettings``, ``cachedContent``, ``labels``, a part's
``thoughtSignature``) are accepted and ignored, and so are structured-output requests
(``responseMimeType``, ``responseSchema``, ``responseJsonSchema``): the model is not constrained to
them. Content the model cannot take (``inlineData``, ``fileData``, code execution parts) is refused
with a 400 when the contents are normalised.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from .tool_schemas import TOOL_NAME_PATTERN


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", alias_generator=to_camel, populate_by_name=True)


class FunctionCall(_Open):
    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]
    args: dict[str, Any] = Field(default_factory=dict)
    id: str | None = None


class FunctionResponse(_Open):
    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]
    response: dict[str, Any] = Field(default_factory=dict)
    id: str | None = None


class Part(_Open):
    """One part: Google's ``data`` oneof (text, functionCall, functionResponse, ...) plus flags."""

    text: str | None = None
    thought: bool | None = None
    function_call: FunctionCall | None = None
    function_response: FunctionResponse | None = None


class Content(_Open):
    # "function" is the role older clients give the turn that carries functionResponse parts.
    role: Literal["user", "model", "function"] | None = None
    parts: Annotated[list[Part], Field(min_length=1)]


class SystemInstruction(_Open):
    role: str | None = None  # ignored, as Google ignores it
    parts: list[Part] = Field(default_factory=list)


class FunctionDeclaration(_Open):
    name: Annotated[str, Field(pattern=TOOL_NAME_PATTERN)]
    description: str | None = None
    parameters: dict[str, Any] | None = None  # Google's OpenAPI-subset Schema ("type": "OBJECT", ...)
    parameters_json_schema: dict[str, Any] | None = None  # plain JSON Schema (what Gemini CLI sends)


class Tool(_Open):
    """Function declarations; Google's own tools (``googleSearch``, ``codeExecution``, ...) run at
    Google, not here, and are ignored."""

    function_declarations: list[FunctionDeclaration] | None = None


class FunctionCallingConfig(_Open):
    mode: Literal["MODE_UNSPECIFIED", "AUTO", "ANY", "NONE", "VALIDATED"] | None = None
    allowed_function_names: list[str] | None = None


class ToolConfig(_Open):
    function_calling_config: FunctionCallingConfig | None = None


class ThinkingConfig(_Open):
    include_thoughts: bool | None = None
    thinking_budget: int | None = None  # 0 turns thinking off; -1 lets the model decide


class GenerationConfig(_Open):
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    top_k: Annotated[int, Field(ge=0)] | None = None
    max_output_tokens: Annotated[int, Field(ge=1)] | None = None
    stop_sequences: Annotated[list[Annotated[str, Field(min_length=1)]], Field(max_length=16)] | None = None
    candidate_count: Annotated[int, Field(ge=1)] | None = None
    seed: int | None = None
    thinking_config: ThinkingConfig | None = None


class GenerateContentRequest(_Open):
    contents: Annotated[list[Content], Field(min_length=1)]
    system_instruction: SystemInstruction | None = None
    tools: list[Tool] | None = None
    tool_config: ToolConfig | None = None
    generation_config: GenerationConfig | None = None


class CountTokensRequest(_Open):
    """Either ``contents`` alone or a whole ``generateContentRequest`` (system and tools counted too)."""

    contents: list[Content] | None = None
    generate_content_request: GenerateContentRequest | None = None
