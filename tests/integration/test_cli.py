"""The CLI on a recorded run: trie list and trie show (text and HTML); configuration precedence."""

from __future__ import annotations

import json

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


def test_connect_refuses_unknown_scaffolds_and_absent_gateways(capsys):
    import pytest

    with pytest.raises(SystemExit, match="known: claude-code"):
        main(["connect", "vim", "--model", "m"])
    with pytest.raises(SystemExit, match="no gateway answers"):
        main(["connect", "claude-code", "--url", "http://127.0.0.1:9"])
