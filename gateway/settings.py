"""The gateway's own settings (the CLI's configuration builds these)."""

from __future__ import annotations

from pydantic import BaseModel, Field


class GatewaySettings(BaseModel):
    host: str = "127.0.0.1"
    port: int = 8000
    # Names clients may use for the served model, besides the engine's own model name.
    model_aliases: list[str] = Field(default_factory=list)
    # When non-empty, requests need one of these keys (or a session key arborl issued).
    api_keys: list[str] = Field(default_factory=list)
    admin_token: str | None = None  # the operator key, logged as "admin"
    admin_keys: dict[str, str] = Field(default_factory=dict)  # more operator keys: name -> key (the log names them)
    max_body_bytes: int = 32 << 20
    # Requests allowed to wait for an engine slot; beyond it, 429 (OpenAI) / 529 (Anthropic).
    max_waiting: int = 256
    # An operator's cap on completion length, applied to every request's max_tokens.
    max_tokens_cap: int | None = None
    tool_parser: str | None = None  # hermes | qwen3_coder | llama3_json; None picks by model family

    def capped_max_tokens(self, requested: int) -> int:
        """A request's max_tokens after the operator's cap."""
        return min(requested, self.max_tokens_cap) if self.max_tokens_cap else requested
