"""The CLI on a recorded run: trie list and trie show (text and HTML); configuration precedence."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import openai

from arborl.ops.cli import main
from arborl.ops.config import load_config


def test_trie_show_text_and_html(gateway, capsys, tmp_path):
    client = openai.OpenAI(base_url=gateway.url + "/s/cli-1/v1", api_key="test")
    messages = [{"role": "user", "content": "hi"}]
    for turn in range(3):
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=6, seed=turn)
        messages += [{"role": "assistant", "content": reply.choices[0].message.content},
                     {"role": "user", "content": "more"}]
    (gateway.run_dir / "run.json").write_text(json.dumps({"model_dir": str(gateway.engine.tokenizer.name_or_path)}))
    main(["trie", "list", "--run", str(gateway.run_dir)])
    assert "cli-1\t3 calls" in capsys.readouterr().out
    main(["trie", "show", "cli-1", "--run", str(gateway.run_dir)])
    text = capsys.readouterr().out
    assert "3 calls" in text and "versions=[0]" in text and "├──" not in text  # one chain
    main(["trie", "show", "cli-1", "--run", str(gateway.run_dir), "--html", str(tmp_path / "t.html")])
    assert "cli-1" in (tmp_path / "t.html").read_text()


def test_config_precedence(tmp_path):
    path = tmp_path / "arborl.yaml"
    path.write_text("engine:\n  model: /models/a\n  max_running: 4\ngateway:\n  port: 9000\n")
    config = load_config(path, {"gateway": {"port": 9100}}, environ={"ARBORL_ENGINE__MAX_RUNNING": "8"})
    assert config.engine.model == "/models/a"
    assert config.engine.max_running == 8  # env over file
    assert config.gateway.port == 9100  # flag over file
    toml = tmp_path / "arborl.toml"
    toml.write_text('[gateway]\nhost = "0.0.0.0"\n')
    assert load_config(toml, environ={}).gateway.host == "0.0.0.0"


def test_connect_asks_the_running_gateway_for_its_model(gateway, capsys, tmp_path):
    main(["connect", "claude-code", "--url", gateway.url, "--session", "work-1"])
    out = capsys.readouterr().out
    served = openai.OpenAI(base_url=gateway.v1, api_key="k").models.list().data[0].id
    assert f"export ANTHROPIC_BASE_URL={gateway.url}/s/work-1" in out
    assert f"export ANTHROPIC_MODEL={served}" in out and "claude -p" in out


def test_connect_refuses_unknown_scaffolds(capsys):
    import pytest

    from arborl.scaffold_adapters.registry import ADAPTERS

    with pytest.raises(SystemExit, match="unknown scaffold 'vim'; known: ") as refused:
        main(["connect", "vim", "--model", "m"])
    known = str(refused.value).split("known: ", 1)[1].split(", ")
    assert known == sorted(ADAPTERS)


def test_connect_without_a_gateway_still_points_the_agent_at_arborl(capsys, caplog):
    """`eval "$(arborl connect claude-code | grep ^export)"` must not silently set nothing (the agent
    would go to its vendor): the exports point at the configured address; stderr says why and names
    --url; no HTTP client log line gets in the way."""
    caplog.set_level(logging.INFO)
    main(["connect", "claude-code", "--url", "http://127.0.0.1:9"])
    captured = capsys.readouterr()
    exports = [line for line in captured.out.splitlines() if line.startswith("export ")]
    assert "export ANTHROPIC_BASE_URL=http://127.0.0.1:9" in exports, captured.out
    assert any(line.startswith("export ANTHROPIC_MODEL=") for line in exports)
    assert "no gateway answers" in captured.err and "--url" in captured.err
    assert not [r for r in caplog.records if r.name.startswith(("httpx", "httpcore"))]
    assert "npm install -g @anthropic-ai/claude-code@2.1.197" in captured.out


def test_connect_gives_a_scaffold_without_session_ids_a_session_per_configuration(gateway, capsys, tmp_path):
    """Cline names no session: each `arborl connect cline` files its runs under a new session."""
    sessions = []
    for _ in range(2):
        main(["connect", "cline", "--url", gateway.url, "--write-home", str(tmp_path)])
        out = capsys.readouterr().out
        settings = json.loads((tmp_path / ".cline/data/settings/providers.json").read_text())
        base = settings["providers"]["openai-compatible"]["settings"]["baseUrl"]
        assert base.startswith(gateway.url + "/s/cline-") and "run `arborl connect` again" in out, (base, out)
        sessions.append(base)
    assert sessions[0] != sessions[1]
    main(["connect", "claude-code", "--url", gateway.url])  # it names its own sessions: none imposed
    assert f"export ANTHROPIC_BASE_URL={gateway.url}\n" in capsys.readouterr().out


def test_the_install_hints_are_the_versions_ci_installs():
    from arborl.scaffold_adapters.registry import ADAPTERS

    ci = (Path(__file__).parents[2] / ".ci" / "run").read_text()
    for adapter in ADAPTERS.values():
        if adapter.npm_package:
            assert f"{adapter.npm_package}@{adapter.tested_version}" in ci, adapter.name
        elif adapter.pypi_package:
            assert f"{adapter.pypi_package}=={adapter.tested_version}" in ci, adapter.name


def test_a_session_whose_only_request_was_refused_shows_in_list_and_show(gateway, capsys):
    too_long = [{"role": "user", "content": "word " * 6000}]
    refused = openai.OpenAI(base_url=gateway.url + "/s/refused-1/v1", api_key="k", max_retries=0)
    try:
        refused.chat.completions.create(model="tiny", messages=too_long, max_tokens=2)
    except openai.BadRequestError:
        pass
    main(["trie", "list", "--run-dir", str(gateway.run_dir)])
    assert "refused-1\t0 calls, 1 refused" in capsys.readouterr().out
    main(["trie", "show", "refused-1", "--run-dir", str(gateway.run_dir)])
    shown = capsys.readouterr().out
    assert "refused before any token" in shown and "context_length" in shown, shown


def test_trie_show_takes_the_agents_own_session_id(gateway, capsys):
    """Claude Code's session X is stored as claude-X: `trie show X` finds it."""
    headers = {"x-claude-code-session-id": "5f1c2b7e-0000-4000-8000-000000000001"}
    reply = openai.OpenAI(base_url=gateway.v1, api_key="k", default_headers=headers)
    reply.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    main(["trie", "show", "5f1c2b7e-0000-4000-8000-000000000001", "--run-dir", str(gateway.run_dir)])
    assert "session claude-5f1c2b7e-0000-4000-8000-000000000001" in capsys.readouterr().out
    import pytest

    with pytest.raises(SystemExit, match="claude-X"):
        main(["trie", "show", "no-such-session", "--run-dir", str(gateway.run_dir)])


def test_every_command_takes_the_run_folder_as_run_dir():
    """One spelling, --run-dir, in every command that names a run folder (the old ones still parse)."""
    from arborl.ops.cli import _store_and_run_dir, parse_args

    for command in (["trie", "list"], ["trie", "show", "s"], ["train"], ["report"], ["ops", "status"],
                    ["eval", "--dataset", "builtin"], ["rollout", "--dataset", "builtin"], ["serve"], ["up"]):
        assert str(parse_args([*command, "--run-dir", "/tmp/somewhere"]).run_dir) == "/tmp/somewhere", command
    assert str(parse_args(["trie", "list", "--run", "/tmp/x"]).run_dir) == "/tmp/x"
    # train's older --store RUN is still the run folder; a database URL there is the store
    assert _store_and_run_dir(parse_args(["train", "--store", "/tmp/x"])) == ("", Path("/tmp/x"))
    assert _store_and_run_dir(parse_args(["train", "--store", "postgresql://u@h:1/db"])) == (
        "postgresql://u@h:1/db", Path("runs/default"))
    assert str(parse_args(["report", "/tmp/x"]).run) == "/tmp/x"  # the positional of before


def test_the_start_says_it_converts_the_model_only_when_it_will(tmp_path, tiny_model_dir):
    from arborl.gateway.engines.model_source import TINY_MODEL, needs_preparing

    assert needs_preparing(TINY_MODEL, cache_dir=tmp_path)  # an empty cache: it will be built
    assert not needs_preparing(TINY_MODEL, cache_dir=tiny_model_dir.parent)  # built already
    assert not needs_preparing(str(tiny_model_dir))  # a model folder is used as it is
