"""aider (`aider --message`), which speaks OpenAI Chat Completions through litellm, with no tools.

What it sends (version 0.86.2, observed against arborl): ``POST {OPENAI_API_BASE}/chat/completions``
from the ``openai`` Python SDK (``User-Agent: OpenAI/Python ...``, nothing of aider's own), no
``tools``: aider edits files from the text of the reply, in its edit format (``whole``: the file's
name, then its whole content fenced; ``diff``: SEARCH/REPLACE blocks). The conversation is the
edit format's system prompt, its worked example turns, then the task. It sends no session id:
give each run a ``/s/{session}`` base URL, as the orchestrator does.

- Turns: one ``--message`` is one turn, and aider exits after it. An edit that does not apply
  (a SEARCH block that matches nothing, a file it may not write) is its failed tool call: aider
  sends the reply back with a user message naming what failed ("# 1 SEARCH/REPLACE block failed
  to match!") and asks again, up to three times.
- Its history is rewritten between calls: the edit format's reminder is appended to the newest
  user message only, and the files in the chat are re-sent after the history. So every call after
  the first branches (``history_edited``) after the system prompt and worked examples it shares
  with the others; each call is a path of its own from there.
- Auxiliary calls: the commit message (only with auto-commits, off here) and the chat-history
  summary (when the history grows past its budget), both on the "weak model", recognised by their
  system prompts and filed in ``{session}:commit`` and ``{session}:summary``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .base import CallPurpose, GatewayTarget, ScaffoldAdapter, ScaffoldSetup
from .request_text import first_message_text

# How each of aider's auxiliary prompts begins (aider/prompts.py).
_SIDE_PROMPTS = {
    "You are an expert software engineer that generates concise, one-line Git commit messages": "commit",
    "*Briefly* summarize this partial conversation about programming": "summary",
}


class AiderAdapter(ScaffoldAdapter):
    name = "aider"
    executable = "aider"
    pypi_package = "aider-chat"
    tested_version = "0.86.2"
    names_its_session = None
    dialect = "chat"

    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        env = {
            "OPENAI_API_BASE": target.openai_base_url,
            "OPENAI_API_KEY": target.api_key,
            # litellm's "openai/" prefix: any OpenAI-compatible server, the model name passed as is
            "AIDER_MODEL": f"openai/{target.model}",
            "AIDER_WEAK_MODEL": f"openai/{target.model}",
            "AIDER_YES_ALWAYS": "true",  # headless: every question (create a file, run a command) is yes
            "AIDER_AUTO_COMMITS": "false",
            "AIDER_CHECK_UPDATE": "false",
            "AIDER_ANALYTICS_DISABLE": "true",
            "AIDER_SHOW_MODEL_WARNINGS": "false",  # it knows no context window for the served model
            "AIDER_PRETTY": "false",
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # litellm would fetch its price list from the web
        }
        notes = ["aider reads no tools from the reply: the policy must answer in aider's edit format "
                 "(`--edit-format whole` is the simplest for a small model)."]
        return ScaffoldSetup(env=env, notes=notes)

    def command(self, task: str) -> list[str]:
        return [self.executable, "--message", task, "--no-git"]

    def call_purpose(self, headers: Mapping[str, str], body: Mapping[str, Any]) -> CallPurpose | None:
        system = first_message_text(body, ("system",))
        for prompt, branch in _SIDE_PROMPTS.items():
            if system.startswith(prompt):
                return CallPurpose("side", branch=branch)
        return None  # its main calls carry nothing of aider's own: the default (main) holds
