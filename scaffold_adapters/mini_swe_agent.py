"""mini-swe-agent (`mini`, PyPI ``mini-swe-agent``), which speaks OpenAI Chat Completions through litellm.

What it sends (version 2.4.6 with litellm 1.105.3, observed against arborl): every call is a
non-streaming ``POST {api_base}/chat/completions`` that litellm makes through the OpenAI Python SDK
(``User-Agent: OpenAI/Python 2.x`` and the SDK's ``x-stainless-*`` headers, nothing of mini's
own). The body holds ``model``, ``messages`` and ``tools``, nothing else: no ``tool_choice``,
``max_tokens``, ``stream`` or sampling parameters. It makes no other request to the gateway (no
``/v1/models``) and, with `setup`'s environment, connects nowhere else.

- The default config (``mini.yaml``, which `command` names) uses native tool calling with a
  single ``bash`` tool (``{"command": str}``): a policy served by arborl calls it with hermes
  ``<tool_call>`` blocks, which the gateway turns into ``tool_calls``. mini's text-based mode
  (``mini_textbased.yaml``: a fenced ``mswea_bash_command`` block in the reply, no ``tools``)
  would work with arborl too; tool calls were chosen because they are what the gateway's parser
  and the other scaffolds' traffic already look like. The system prompt is "You are a helpful
  assistant that can interact with a computer."; the first user message is "Please solve this
  issue: <task>" followed by mini's workflow instructions and the machine's uname.
- Each command runs in a fresh ``/bin/sh -c`` (dash on Debian, whatever the tool's name says) in
  the working directory, with a 30 s timeout (mini's default); its result comes back as a
  ``tool`` message answering the call's id, whose content is a JSON object
  ``{"returncode": N, "output": "..."}``. History comes back as litellm returned it: content,
  tool-call ids and argument strings as sampled (plus litellm's
  ``provider_specific_fields: {"refusal": null}``), so every call stitches onto the previous one.
- A reply mini cannot use (no tool call, another tool's name, arguments without a ``command``) is
  left out of the history: the next request has a user message "Tool call error: ..." where the
  reply was, so it branches from the previous call's prompt (``history_edited``). Three in a row
  end the run (``RepeatedFormatError``).
- The run ends when a command's output starts with ``COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT`` (the
  prompt asks for ``echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT``); no call follows that one. It
  also ends at the step limit (``LimitsExceeded``). Either way ``mini`` exits 0 and saves the
  trajectory to ``~/.config/mini-swe-agent/last_mini_run.traj.json`` (``info.exit_status``).

mini makes no auxiliary calls (no title, summary, compaction or sub-agents), so `call_purpose`
recognises none of its calls and every one is a main call. Nothing in its requests tells them
apart from any other OpenAI SDK client's.

Headless and offline: ``MSWEA_CONFIGURED`` skips the first-run setup wizard (it prompts on the
terminal), ``LITELLM_LOCAL_MODEL_COST_MAP`` keeps litellm from downloading its model price list
from GitHub at import, and ``MSWEA_COST_TRACKING=ignore_errors`` keeps an unpriced model (every
served policy) from aborting the run after its first call. litellm finds the gateway through
``OPENAI_BASE_URL`` and ``OPENAI_API_KEY``: mini has no environment variable for its
``model_kwargs``, and a config file would have to be named by an absolute path, which `command`
does not know. mini's global config folder (``.env``, the trajectory, the prompt history) is
platformdirs' user config dir, ``$XDG_CONFIG_HOME/mini-swe-agent`` or
``~/.config/mini-swe-agent``: inside the sandbox's HOME. With stdin not a terminal,
prompt_toolkit prints "Warning: Input is not a terminal (fd=0)." to stderr; nothing waits on it.

litellm is pinned beside mini (``LITELLM_VERSION``, the newest that works): in 1.106.0 to
1.106.2 (what pip picks for mini 2.4.6 unpinned; later ones were not tried), ``litellm.completion``
with any ``tools`` imports its MCP gateway, which needs the optional ``mcp`` package, so every
call of mini fails with ``ModuleNotFoundError: No module named 'mcp'``, which mini retries with
backoff for minutes before it gives up.
"""

from __future__ import annotations

from .base import GatewayTarget, ScaffoldAdapter, ScaffoldSetup

TESTED_VERSION = "2.4.6"
LITELLM_VERSION = "1.105.3"  # see the module docstring: 1.106 breaks tool calls without mcp
DEFAULT_STEP_LIMIT = 250  # what mini's own SWE-bench config uses; mini.yaml has none


class MiniSweAgentAdapter(ScaffoldAdapter):
    name = "mini-swe-agent"
    executable = "mini"
    npm_package = None
    pypi_package = "mini-swe-agent"
    tested_version = TESTED_VERSION
    dialect = "chat"

    def __init__(self, step_limit: int = DEFAULT_STEP_LIMIT):
        self.step_limit = step_limit  # model calls per run; 0: none

    def setup(self, target: GatewayTarget) -> ScaffoldSetup:
        env = {
            # litellm's "openai/" provider: any model name, sent as is (without the prefix) to
            # an OpenAI-compatible base URL.
            "MSWEA_MODEL_NAME": f"openai/{target.model}",
            "OPENAI_BASE_URL": target.openai_base_url,  # litellm checks it before OPENAI_API_BASE
            "OPENAI_API_KEY": target.api_key,
            "MSWEA_CONFIGURED": "true",  # no first-run setup wizard
            "MSWEA_SILENT_STARTUP": "1",  # no version banner
            "MSWEA_COST_TRACKING": "ignore_errors",  # the served model has no price: cost 0, no abort
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no price-list download from GitHub at import
        }
        notes = [
            (
                f"Install with `pip install {self.pypi_package}=={TESTED_VERSION} "
                f"litellm=={LITELLM_VERSION}` "
                "(the tested versions; litellm 1.106 needs the mcp package for tool calls), "
                "ideally in a virtual environment of its own."
            ),
            (
                "The exports set OPENAI_BASE_URL and OPENAI_API_KEY, which every OpenAI client in that shell "
                "(and every command mini runs) then uses too."
            ),
            (
                "`-c mini.yaml` is resolved against the working directory first: a project with its own "
                "mini.yaml at its root gets that config instead of mini's built-in one."
            ),
        ]
        return ScaffoldSetup(env=env, notes=notes)

    def command(self, task: str) -> list[str]:
        # -y: yolo mode, every command runs without confirmation; --exit-immediately: no "new task?"
        # prompt when the agent submits; -l 0: no cost limit (a served model that litellm happens to
        # price would otherwise stop at $3). Naming a config with -c replaces the default one, so
        # mini.yaml comes first and the step limit is merged over it. A step limit ends the run
        # cleanly when stdin is not a terminal. "-t" takes the next argument whatever it starts
        # with, so a task beginning with "-" stays the task.
        return [
            self.executable, "-y", "--exit-immediately", "-l", "0",
            "-c", "mini.yaml", "-c", f"agent.step_limit={self.step_limit}",
            "-t", task,
        ]
