"""A run whose store is a PostgreSQL database: the gateway records into it, and the commands
that read a run (``arborl trie``, ``arborl report``) read it from another run folder, as a
third process on another machine would. Bad store URLs are refused with a message."""

from __future__ import annotations

import json
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


ADMIN_KEY = "pg-run-admin-key-0123456789"


def test_rollouts_against_a_gateway_elsewhere_need_only_its_url_its_admin_key_and_the_database(
        postgres_dsn, tiny_model_dir, run_root, capsys):
    """A rollout worker with its own run folder: session keys and call counts come over the gateway's
    admin API, groups and rewards go to the shared database; no file of the gateway's is read."""
    from task_fixtures import write_harbor_task

    write_harbor_task(run_root / "tasks" / "greet-txt")
    config = load_config(None, {"engine": {"model": str(tiny_model_dir)}, "store": {"url": postgres_dsn},
                                "gateway": {"admin_token": ADMIN_KEY}})
    gateway = start_local_gateway(config, run_root / "gateway-run")
    worker = run_root / "worker-run"
    argv = ["rollout", "--dataset", str(run_root / "tasks"), "--scaffold", "builtin", "--group-size", "2",
            "--groups", "1", "--max-turns", "2", "--gateway", gateway.url, "--store", postgres_dsn,
            "--run-dir", str(worker)]
    try:
        with pytest.raises(SystemExit, match="give the gateway's admin key"):
            main(argv)
        with pytest.raises(SystemExit, match="refused GET /admin/policy: 401"):
            main([*argv, "--admin-token", "not-the-admin-key-at-all"])
        main([*argv, "--admin-token", ADMIN_KEY])
        assert "1 complete groups wait for the learner" in capsys.readouterr().out
    finally:
        gateway.stop()
        gateway.store.close()
    assert not (worker / "store.sqlite").exists()
    with open_read_model(run_root / "third", store_url=postgres_dsn) as model:
        assert model.exists()
    from arborl.rollout.store import PostgresTrajectoryStore

    store = PostgresTrajectoryStore(postgres_dsn)
    try:
        ledger = RunLedger(store)
        (group,) = ledger.pending_groups()
        rollouts = ledger.rollouts(group.id)
        assert len(rollouts) == 2 and all(r.reward is not None for r in rollouts)
        for rollout in rollouts:  # the gateway recorded each rollout's calls, counted over HTTP
            calls = store.calls(rollout.session_id)
            assert 1 <= len(calls) <= 2
            assert json.loads(rollout.outcome)["turns"] == len(calls)
    finally:
        store.close()
