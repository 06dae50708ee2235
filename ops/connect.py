"""``arborl connect SCAFFOLD``: the configuration that points an agent at a running gateway."""

from __future__ import annotations

import secrets
import shlex
from pathlib import Path

import httpx

from arborl.scaffold_adapters.base import GatewayTarget
from arborl.scaffold_adapters.registry import get_adapter


def new_session_id(scaffold: str) -> str:
    """A session of its own for one configuration of a scaffold that names no session itself."""
    return f"{scaffold}-{secrets.token_hex(6)}"


def served_model(url: str, api_key: str) -> str | None:
    """The model a running gateway serves (the first of GET /v1/models), or None if unreachable."""
    try:
        response = httpx.get(url.rstrip("/") + "/v1/models", headers={"authorization": f"Bearer {api_key}"},
                             timeout=2.0)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, KeyError, IndexError, ValueError):
        return None


def connect_text(scaffold: str, target: GatewayTarget, write_home: Path | None = None) -> str:
    """Shell lines to paste (env exports, then the files or where they were written, then a run line)."""
    adapter = get_adapter(scaffold)
    setup = adapter.setup(target)
    lines = [f"# {adapter.name} -> arborl at {target.root} (model {target.model!r}, {adapter.dialect} API)"]
    if adapter.install_hint:
        lines.append(f"# install (the tested version): {adapter.install_hint}")
    if target.session_id and adapter.names_its_session is None:
        lines.append(f"# every call goes to session {target.session_id} ({adapter.name} names no session of its "
                     "own): run `arborl connect` again for the next task, so each task gets its own trie")
    if setup.env:
        lines.append(setup.shell_exports())
    if write_home is not None:
        for path in setup.write(write_home):
            lines.append(f"# wrote {path}")
    else:
        for relative, text in setup.files.items():
            lines.append(f"# write ~/{relative} (or rerun with --write-home DIR):")
            folder, file = shlex.quote(str(Path(relative).parent)), shlex.quote(relative)
            lines.append(f"mkdir -p ~/{folder} && cat > ~/{file} <<'ARBORL'")
            lines.append(text.rstrip("\n"))
            lines.append("ARBORL")
    lines.append("# then, in your project: " + shlex.join(adapter.command("describe your task here")))
    lines.extend(f"# note: {note}" for note in setup.notes)
    return "\n".join(lines)
