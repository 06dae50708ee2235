"""The gateway's own settings (the CLI's configuration builds these).

Every key a client or operator presents is checked against these settings, so each configured key
(``admin_token``, every value of ``admin_keys``, every entry of ``api_keys``) is at least
MIN_KEY_CHARS characters with no whitespace or control characters: an empty or short key would
let a request with no key, or a guessed one, in. An error names the field and the key's name or
index, never the key itself (hide_input_in_errors keeps pydantic from echoing it).
"""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MIN_KEY_CHARS = 16


def _a_real_key(key: str) -> str:
    # The messages describe the key, never quote it: they end up in logs and terminals.
    if len(key) < MIN_KEY_CHARS:
        raise ValueError(f"a key of {len(key)} characters; keys need at least {MIN_KEY_CHARS}")
    if any(char.isspace() or not char.isprintable() for char in key):
        raise ValueError("a key with whitespace or a control character in it")
    return key


Key = Annotated[str, AfterValidator(_a_real_key)]


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)  # typos are errors; keys are never echoed

    host: str = "127.0.0.1"
    port: int = 8000
    # Names clients may use for the served model, besides the engine's own model name.
    model_aliases: list[str] = Field(default_factory=list)
    # Serve the policy under whatever model name a request asks for (the name asked for is
    # recorded with the call): an agent pointed at the URL alone asks for its vendor's models
    # (Claude Code: claude-opus-..., and claude-haiku-... for side calls). Off, an unknown name is
    # a 404 (a gateway in front of several models). `arborl serve` and `arborl up` turn it on.
    any_model_name: bool = False
    # When non-empty, requests need one of these keys (or a session key arborl issued).
    api_keys: list[Key] = Field(default_factory=list)
    admin_token: Key | None = None  # the operator key, logged as "admin"
    admin_keys: dict[str, Key] = Field(default_factory=dict)  # more operator keys: name -> key (the log names them)
    max_body_bytes: int = 32 << 20
    # Requests allowed to wait for an engine slot; beyond it, 429 (OpenAI) / 529 (Anthropic).
    max_waiting: int = 256
    # An operator's cap on completion length, applied to every request's max_tokens.
    max_tokens_cap: int | None = None
    tool_parser: str | None = None  # hermes | qwen3_coder | llama3_json; None picks by model family
    # A stream with nothing to send for this long sends its dialect's keep-alive (Anthropic's
    # ping, an SSE comment in OpenAI's dialects), so agents with a read timeout wait out a long prefill.
    stream_keepalive_s: float = Field(default=5.0, gt=0)
    # The HTTP server's limits (ops/http_server.py). A connection that has not sent a request's
    # line and headers within header_timeout_s, or sends more than max_header_bytes of them, is
    # closed; an idle keep-alive connection closes after keep_alive_timeout_s; past
    # max_connections open connections, new requests get 503.
    header_timeout_s: float = Field(default=10.0, gt=0)
    max_header_bytes: int = Field(default=64 << 10, ge=1024)
    keep_alive_timeout_s: int = Field(default=5, ge=1)
    max_connections: int = Field(default=2048, ge=1)

    def capped_max_tokens(self, requested: int) -> int:
        """A request's max_tokens after the operator's cap."""
        return min(requested, self.max_tokens_cap) if self.max_tokens_cap else requested
