"""Agent CLIs as rollout scaffolds: the orchestrator configures the CLI through its adapter, runs
it headless inside a sandbox, counts its calls against the turn limit, and grades the workspace.

A scripted engine plays the policy, in the CLI's own tool vocabulary.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from agent_cli import scripted_gateway
from arborl.gateway.tool_parsers import get_parser
from arborl.rollout.orchestrator import Orchestrator, eval_plans
from arborl.rollout.sandboxes import bwrap_unavailable_reason
from arborl.rollout.settings import RolloutSettings
from arborl.rollout.store import RunLedger
from arborl.rollout.tasks import InlineFiles, Task, VerifierSpec

HERMES = get_parser("hermes")
CHECK = 'if [ "$(cat hello.txt)" = hi ]; then echo 1; else echo 0; fi > "$ARBORL_VERIFIER_DIR/reward.txt"'
TASK = Task("hello-file", "Create a file hello.txt containing the word hi.", InlineFiles.of({"README": "x\n"}),
            VerifierSpec("script"), test_command=CHECK)
KINDS = ["local", pytest.param("bwrap", marks=pytest.mark.skipif(bool(bwrap_unavailable_reason()),
                                                                  reason=str(bwrap_unavailable_reason())))]


def claude_writes_hello(prompt: str) -> str:
    if "<tools>" not in prompt:
        return "ok"  # a side call without tools
    cwd = re.search(r"(?:Primary working directory|CWD): (\S+)", prompt)
    if prompt.count("<tool_response>") == 0 and cwd:
        return HERMES.format_call("Write", {"file_path": f"{cwd.group(1)}/hello.txt", "content": "hi\n"})
    return "Done."


def claude_loops(prompt: str) -> str:
    if "<tools>" not in prompt:
        return "ok"
    time.sleep(2.0)  # a model's time per call, long against POLL_S: the limit is checked every POLL_S
    return HERMES.format_call("Bash", {"command": "echo again", "description": "Say again"})


@pytest.mark.e2e("claude")
@pytest.mark.parametrize("kind", KINDS)
def test_claude_code_rollout_in_a_sandbox(kind, tiny_model_dir, run_root):
    with scripted_gateway(tiny_model_dir, run_root, claude_writes_hello) as gateway:
        orchestrator = Orchestrator(RunLedger(gateway.store), run_root / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(sandbox=kind, agent_timeout_s=120))
        [result] = orchestrator.run(eval_plans([TASK], ["claude-code"], 1))
        log = (run_root / "run" / result.log).read_text()
        assert (result.status, result.reward, result.ended_by) == ("done", 1.0, "submitted"), log
        assert result.turns == 2 and result.prompt_tokens > 0
        calls = orchestrator.ledger.training_calls(result.session_id)
        assert [call.purpose for call in calls] == ["main", "main"]
        gateway.store.close()


def mini_writes_hello(prompt: str) -> str:
    if prompt.count("<tool_response>") == 0:
        return HERMES.format_call("bash", {"command": "echo hi > hello.txt"})
    return HERMES.format_call("bash", {"command": "echo COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT"})


@pytest.mark.e2e("mini")
@pytest.mark.parametrize("kind", KINDS)
def test_mini_swe_agent_rollout_in_a_sandbox(kind, tiny_model_dir, run_root):
    # Its venv lives under /opt: the bwrap sandbox shows it because the orchestrator exposes a
    # CLI's install prefix.
    with scripted_gateway(tiny_model_dir, run_root, mini_writes_hello) as gateway:
        orchestrator = Orchestrator(RunLedger(gateway.store), run_root / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(sandbox=kind, agent_timeout_s=120))
        [result] = orchestrator.run(eval_plans([TASK], ["mini-swe-agent"], 1))
        log = (run_root / "run" / result.log).read_text()
        assert (result.status, result.reward, result.ended_by, result.turns) == ("done", 1.0, "submitted", 2), log
        gateway.store.close()


# Gemini CLI and Qwen Code (its fork) share their tools; Qwen Code's write_file takes absolute paths only.
WORKSPACE = re.compile(r"(?:I'm currently working in the directory: |Workspace Directories:\*\*\n  - )(\S+)")


def gemini_family_writes_hello(prompt: str) -> str:
    if "<tools>" not in prompt:
        return "ok"
    workspace = WORKSPACE.search(prompt)
    if prompt.count("<tool_response>") == 0 and workspace:
        return HERMES.format_call("write_file", {"file_path": f"{workspace.group(1)}/hello.txt", "content": "hi\n"})
    return "Done."


@pytest.mark.parametrize(("scaffold", "dialect"), [
    pytest.param("gemini-cli", "gemini", marks=pytest.mark.e2e("gemini")),
    pytest.param("qwen-code", "openai_chat", marks=pytest.mark.e2e("qwen")),
])
@pytest.mark.parametrize("kind", KINDS)
def test_gemini_cli_family_rollout_in_a_sandbox(kind, scaffold, dialect, tiny_model_dir, run_root):
    with scripted_gateway(tiny_model_dir, run_root, gemini_family_writes_hello) as gateway:
        orchestrator = Orchestrator(RunLedger(gateway.store), run_root / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(sandbox=kind, agent_timeout_s=120))
        [result] = orchestrator.run(eval_plans([TASK], [scaffold], 1))
        log = (run_root / "run" / result.log).read_text()
        assert (result.status, result.reward, result.ended_by, result.turns) == ("done", 1.0, "submitted", 2), log
        calls = orchestrator.ledger.training_calls(result.session_id)
        assert [(call.purpose, call.dialect) for call in calls] == [("main", dialect)] * 2
        gateway.store.close()


def opencode_family_writes_hello(prompt: str) -> str:
    if "<tools>" not in prompt:
        return "Hello file"  # the title call
    cwd = re.search(r"Working directory: (\S+)", prompt)
    if prompt.count("<tool_response>") == 0 and cwd:
        return HERMES.format_call("write", {"filePath": f"{cwd.group(1)}/hello.txt", "content": "hi\n"})
    return "Done."


@pytest.mark.parametrize("scaffold", [
    pytest.param("opencode", marks=pytest.mark.e2e("opencode")),
    pytest.param("kilocode", marks=pytest.mark.e2e("kilo")),
])
@pytest.mark.parametrize("kind", KINDS)
def test_opencode_family_rollout_in_a_sandbox(kind, scaffold, tiny_model_dir, run_root):
    with scripted_gateway(tiny_model_dir, run_root, opencode_family_writes_hello) as gateway:
        orchestrator = Orchestrator(RunLedger(gateway.store), run_root / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(sandbox=kind, agent_timeout_s=120))
        [result] = orchestrator.run(eval_plans([TASK], [scaffold], 1))
        log = (run_root / "run" / result.log).read_text()
        assert (result.status, result.reward, result.ended_by) == ("done", 1.0, "submitted"), log
        calls = orchestrator.ledger.training_calls(result.session_id)
        assert [call.purpose for call in calls] == ["main", "main"]  # the title call is not trained on
        gateway.store.close()


def openclaw_writes_hello(prompt: str) -> str:
    if "<tools>" not in prompt:
        return "ok"
    cwd = re.search(r"Working directory: (\S+)", prompt)
    if prompt.count("<tool_response>") == 0 and cwd:
        return HERMES.format_call("write", {"path": f"{cwd.group(1)}/hello.txt", "content": "hi\n"})
    return "Done."


@pytest.mark.e2e("openclaw")
@pytest.mark.parametrize("kind", KINDS)
def test_openclaw_rollout_in_a_sandbox(kind, tiny_model_dir, run_root):
    # Its Node 24 and its package live under /opt/openclaw: the bwrap sandbox shows that prefix.
    with scripted_gateway(tiny_model_dir, run_root, openclaw_writes_hello) as gateway:
        orchestrator = Orchestrator(RunLedger(gateway.store), run_root / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(sandbox=kind, agent_timeout_s=120))
        [result] = orchestrator.run(eval_plans([TASK], ["openclaw"], 1))
        log = (run_root / "run" / result.log).read_text()
        assert (result.status, result.reward, result.ended_by, result.turns) == ("done", 1.0, "submitted", 2), log
        gateway.store.close()


def aider_writes_hello(prompt: str) -> str:
    return "I will create it.\n\nhello.txt\n```\nhi\n```\n"  # aider's "whole" edit format, its default here


@pytest.mark.e2e("aider")
@pytest.mark.parametrize("kind", KINDS)
def test_aider_rollout_in_a_sandbox(kind, tiny_model_dir, run_root):
    with scripted_gateway(tiny_model_dir, run_root, aider_writes_hello) as gateway:
        orchestrator = Orchestrator(RunLedger(gateway.store), run_root / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(sandbox=kind, agent_timeout_s=120))
        [result] = orchestrator.run(eval_plans([TASK], ["aider"], 1))
        log = (run_root / "run" / result.log).read_text()
        assert (result.status, result.reward, result.ended_by, result.turns) == ("done", 1.0, "submitted", 1), log
        gateway.store.close()


@pytest.mark.e2e("claude")
def test_a_cli_is_stopped_at_the_turn_limit(tiny_model_dir, run_root):
    with scripted_gateway(tiny_model_dir, run_root, claude_loops) as gateway:
        orchestrator = Orchestrator(RunLedger(gateway.store), run_root / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(max_turns=3, agent_timeout_s=120))
        [result] = orchestrator.run(eval_plans([TASK], ["claude-code"], 1))
        assert (result.status, result.ended_by, result.reward) == ("done", "turn_limit", 0.0)
        assert result.turns == 3  # the fourth call, under way when the CLI was stopped, is not a turn
        gateway.store.close()


def test_a_cli_that_is_not_installed_is_an_infrastructure_failure(tiny_model_dir, run_root, monkeypatch):
    from arborl.scaffold_adapters.registry import get_adapter

    adapter = get_adapter("opencode")
    monkeypatch.setattr(type(adapter), "executable", "arborl-no-such-cli")
    with scripted_gateway(tiny_model_dir, run_root, lambda prompt: "") as gateway:
        orchestrator = Orchestrator(RunLedger(gateway.store), Path(run_root) / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(infra_retries=1))
        [result] = orchestrator.run(eval_plans([TASK], ["opencode"], 1))
        assert (result.status, result.attempts) == ("infra_failed", 2)
        assert "before its first model call" in result.details
        gateway.store.close()


@pytest.mark.e2e("claude")
def test_a_prompt_the_model_cannot_hold_is_graded_not_retried(tiny_model_dir, run_root):
    # Claude Code's system prompt and tools are about 20k tokens: a small model's context cannot
    # hold them. The gateway refuses the request (and notes the refusal); that is the model's
    # limit, not broken infrastructure, so the rollout is graded (0), not retried.
    with scripted_gateway(tiny_model_dir, run_root, claude_writes_hello) as gateway:
        gateway.app.app.state.gateway.engine.context_length = 2048
        orchestrator = Orchestrator(RunLedger(gateway.store), run_root / "run", gateway.url, "tiny",
                                    settings=RolloutSettings(agent_timeout_s=120))
        [result] = orchestrator.run(eval_plans([TASK], ["claude-code"], 1))
        assert (result.status, result.attempts, result.reward, result.ended_by) == ("done", 1, 0.0, "agent_error")
        assert orchestrator.ledger.call_stats(result.session_id).refused >= 1
        gateway.store.close()
