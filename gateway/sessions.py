"""Which session a request belongs to (DESIGN section 2).

In order: the ``/s/{session_id}/`` path prefix, the ``x-arborl-session`` header, an API key
arborl issued for a session, the scaffold's own session id (Claude Code's
``X-Claude-Code-Session-Id`` header, OpenCode's ``X-Session-Id`` or, for its sub-agents,
``x-parent-session-id``, Codex's ``client_metadata.session_id``), and otherwise
one anonymous session per API key.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InvalidRequest

_VALID_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
_BRANCH_CHARS = re.compile(r"[^A-Za-z0-9._\-]")


@dataclass(frozen=True)
class SessionIdentity:
    id: str
    identified_by: str  # path | header | session_key | claude_code | session_header | codex | metadata | anonymous
    # Why the call was made (scaffold_adapters.base.Purpose). Auxiliary calls and sub-agents get
    # their own trie, ``{session}:{branch}``, so the main agent's path stays one unbroken line.
    purpose: str = "main"

    def for_purpose(self, kind: str, branch: str | None) -> SessionIdentity:
        if branch is None:
            return SessionIdentity(self.id, self.identified_by, kind)
        branch = _BRANCH_CHARS.sub("_", branch)
        return SessionIdentity(f"{self.id}:{branch}"[:128], self.identified_by, kind)


def check_session_id(session_id: str, where: str) -> str:
    """A session id names files and URLs later (trie exports, ``/s/{id}``): 1-128 characters of
    a safe set, and never ``..``."""
    if not _VALID_ID.fullmatch(session_id) or ".." in session_id:
        raise InvalidRequest(
            f"invalid session id in {where}: use 1-128 characters from A-Z a-z 0-9 . _ : - (no '..')",
            param="session",
        )
    return session_id


def identify_session(
    *,
    path_session: str | None,
    headers: Mapping[str, str],
    api_key: str | None,
    body: Mapping[str, Any] | None,
    session_for_key: Callable[[str], str | None],
) -> SessionIdentity:
    if path_session:
        return SessionIdentity(check_session_id(path_session, "the path"), "path")
    if header := headers.get("x-arborl-session"):
        return SessionIdentity(check_session_id(header, "x-arborl-session"), "header")
    if api_key and (keyed := session_for_key(api_key)):
        return SessionIdentity(keyed, "session_key")
    if header := headers.get("x-claude-code-session-id"):
        return SessionIdentity(check_session_id("claude-" + header, "X-Claude-Code-Session-Id"), "claude_code")
    # OpenCode: a sub-agent's calls name their parent, so they file under the parent's session
    # (the scaffold adapter then puts them in their own ``:agent-<id>`` trie).
    for name in ("x-parent-session-id", "x-session-id"):
        if header := headers.get(name):
            return SessionIdentity(check_session_id(header, name), "session_header")
    for field, source in (("client_metadata", "codex"), ("metadata", "metadata")):
        meta = (body or {}).get(field)
        if isinstance(meta, Mapping) and isinstance(meta.get("session_id"), str):
            return SessionIdentity(check_session_id(meta["session_id"], f"{field}.session_id"), source)
    digest = hashlib.sha256((api_key or "").encode()).hexdigest()[:16]
    return SessionIdentity(f"anon-{digest}", "anonymous")
