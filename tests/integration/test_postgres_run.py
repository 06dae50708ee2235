"""A run whose store is a PostgreSQL database: the gateway records into it, and the commands
that read a run (``arborl trie``, ``arborl report``) read it from another run folder, as a
third process on another machine would. Bad store URLs are refused with a message."""

from __future__ import annotations

from pathlib import Path

import openai
import pytest

from arborl.ops.cli import main
from arborl.ops.config import ConfigError, load_config
from arborl.ops.local_gateway import start_local_gateway
from arborl.rollout.store import RunLedger, open_read_model


def test_a_gateway_on_postgres_is_read_from_another_run_folder(postgres_dsn, tiny_model_dir, run_root, capsys):
    config = load_config(None, {"engine": {"model": str(tiny_model_dir)}, "store": {"url": postgres_dsn}})
    gateway = start_local_gateway(config, run_root / "gateway-run")
    try:
        assert gateway.store.location.startswith("postgresql://")
        client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="arborl",
                               default_headers={"x-arborl-session": "pg-session"})
        for _ in range(2):
            client.chat.completions.create(model=gateway.engine.model_name, max_tokens=4,
                                           messages=[{"role": "user", "content": "hello"}])
        RunLedger(gateway.store).commit_step(1, 1, "ckpt/1", [], {"loss": 0.1})
    finally:
        gateway.stop()
        gateway.store.close()

    elsewhere = run_root / "watcher"  # no store file here: everything comes from the database
    main(["trie", "list", "--run-dir", str(elsewhere), "--store", postgres_dsn])
    assert "pg-session\t2 calls" in capsys.readouterr().out
    main(["trie", "show", "pg-session", "--run-dir", str(elsewhere), "--store", postgres_dsn])
    assert "pg-session" in capsys.readouterr().out
    elsewhere.mkdir()
    main(["report", "--run-dir", str(elsewhere), "--store", postgres_dsn])
    assert Path(capsys.readouterr().out.strip()).is_file()
    with open_read_model(elsewhere, store_url=postgres_dsn) as model:
        assert model.exists() and model.latest_trained_version() == 1
    assert not (elsewhere / "store.sqlite").exists()


def test_bad_store_urls_are_refused_plainly(run_root):
    with pytest.raises(ConfigError, match="store.url"):
        load_config(None, {"store": {"url": "mysql://db/x"}})
    with pytest.raises(SystemExit, match="cannot reach the store at postgresql://nobody@127.0.0.1:1/none") as caught:
        main(["trie", "list", "--run-dir", str(run_root), "--store", "postgresql://nobody:hunter2@127.0.0.1:1/none"])
    assert "hunter2" not in str(caught.value)  # never the password
    with pytest.raises(SystemExit, match="a store URL starts with postgresql://"):
        main(["trie", "list", "--run-dir", str(run_root), "--store", "sqlite:///tmp/x"])
