"""The replica router (gateway/engines/replica_router.py) over real engines: two embedded ones,
and a vLLM engine whose server is not there (a replica that is down).

Sessions stay on the replica that holds their prefix and new ones spread; a group's shared first
prompt goes to one replica; a replica that is down is out of rotation, says why in /readyz and
/metrics, and the other serves; publishing reaches every replica, rolling or all at once; a
checkpoint no replica can load leaves every one serving its old version. Killing a replica
mid-stream is tested against real vLLM servers (test_vllm_replicas.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import torch

from arborl.gateway.app import create_app
from arborl.gateway.engines.embedded import EmbeddedEngine
from arborl.gateway.engines.replica_router import ReplicaRouter
from arborl.gateway.engines.vllm_server import VllmEngine
from arborl.gateway.settings import GatewaySettings
from arborl.rollout.store import SqliteTrajectoryStore
from conftest import ServerThread, free_port

ADMIN = "router-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {ADMIN}"}


def _serve(router: ReplicaRouter, tmp_path: Path) -> Iterator[tuple[str, SqliteTrajectoryStore]]:
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    settings = GatewaySettings(admin_token=ADMIN)
    with ServerThread(create_app(router, store, settings), settings=settings) as url:
        yield url, store
    store.close()


@pytest.fixture
def two_embedded(tiny_model_dir: Path) -> ReplicaRouter:
    return ReplicaRouter([EmbeddedEngine(tiny_model_dir, model_name="tiny") for _ in range(2)], names=["a", "b"],
                         health_interval_s=0.2)


def _turn(url: str, session: str, messages: list[dict]) -> dict:
    reply = httpx.post(f"{url}/s/{session}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply.json()


def _converse(url: str, session: str, turns: int, router: ReplicaRouter) -> set[str | None]:
    """``turns`` turns of one conversation; the replicas its calls went to."""
    messages = [{"role": "user", "content": f"Task {session}: list the files, then fix the bug."}]
    where = set()
    for n in range(turns):
        answer = _turn(url, session, messages)["choices"][0]["message"]
        messages += [{"role": "assistant", "content": answer["content"] or ""},
                     {"role": "user", "content": f"Step {n} done. Go on."}]
        where.add(router.replica_for(session))
    return where


def _metrics(url: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics").text):
        for sample in family.samples:
            out[sample.name + "".join(f"{{{v}}}" for v in sample.labels.values())] = sample.value
    return out


def test_sessions_stay_on_their_replica_reuse_its_cache_and_spread(two_embedded, tmp_path):
    for url, _ in _serve(two_embedded, tmp_path):
        placed = [_converse(url, f"s{i}", 3, two_embedded) for i in range(4)]
        assert all(len(where) == 1 for where in placed), placed  # each session on one replica
        assert sorted(next(iter(w)) for w in placed) == ["a", "a", "b", "b"]  # and the load spread
        replicas = {r.name: r for r in two_embedded.stats().replicas}
        for replica in replicas.values():  # turns 2 and 3 of each session reused its prefix
            assert replica.sessions == 2 and replica.cached_prompt_tokens > 0
        metrics = _metrics(url)
        for name in ("a", "b"):
            assert metrics[f"arborl_replica_in_rotation{{{name}}}"] == 1
            assert 0 < metrics[f"arborl_replica_prefix_cache_hit_rate{{{name}}}"] < 1
            assert metrics[f"arborl_replica_sessions{{{name}}}"] == 2
        ready = httpx.get(url + "/readyz").json()
        assert ready["ready"] and [r["name"] for r in ready["replicas"]] == ["a", "b"]


def test_a_groups_shared_first_prompt_goes_to_one_replica(two_embedded, tmp_path):
    for url, _ in _serve(two_embedded, tmp_path):
        _converse(url, "other", 1, two_embedded)  # one replica busier in sessions
        task = [{"role": "user", "content": "Fix the failing test in utils/strings.py"}]
        for member in range(4):
            _turn(url, f"group-{member}", task)
        assert len({two_embedded.replica_for(f"group-{m}") for m in range(4)}) == 1


def _changed_checkpoint(model_dir: Path, folder: Path) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    changed = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for parameter in changed.parameters():
            parameter.mul_(1.5)
    changed.save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("publish", ["rolling", "all"])
def test_a_version_is_published_into_every_replica(tiny_model_dir, tmp_path, publish):
    router = ReplicaRouter([EmbeddedEngine(tiny_model_dir, model_name="tiny") for _ in range(2)],
                           names=["a", "b"], publish=publish)
    checkpoint = _changed_checkpoint(tiny_model_dir, tmp_path / "changed")
    for url, store in _serve(router, tmp_path):
        for i in range(2):
            _turn(url, f"before-{i}", [{"role": "user", "content": f"hello {i}"}])
        published = httpx.post(url + "/admin/weights", headers=AUTH, json={"path": str(checkpoint), "version": 1},
                               timeout=60)
        assert published.status_code == 200, published.text
        assert [r.policy_version for r in router.stats().replicas] == [1, 1]
        for i in range(2):  # both sessions' replicas now sample version 1
            _turn(url, f"before-{i}", [{"role": "user", "content": f"hello {i}"}])
            assert store.calls(f"before-{i}")[-1].completion_versions[0] == 1
        assert {router.replica_for("before-0"), router.replica_for("before-1")} == {"a", "b"}
        assert httpx.get(url + "/readyz").json()["policy_version"] == 1


def test_a_checkpoint_no_replica_can_load_leaves_all_serving(two_embedded, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    for url, _ in _serve(two_embedded, tmp_path):
        published = httpx.post(url + "/admin/weights", headers=AUTH, json={"path": str(broken), "version": 1})
        assert published.status_code == 400, published.text
        assert all(r.in_rotation and r.policy_version == 0 for r in two_embedded.stats().replicas)
        _turn(url, "after", [{"role": "user", "content": "still there?"}])


def test_a_replica_that_is_down_is_out_and_the_other_serves(tiny_model_dir, tmp_path):
    # A vLLM engine whose server is not there (nothing listens on its port), and an embedded one.
    down = VllmEngine(f"http://127.0.0.1:{free_port()}", tiny_model_dir, model_name="tiny")
    router = ReplicaRouter([down, EmbeddedEngine(tiny_model_dir, model_name="tiny")], names=["down", "up"],
                           health_interval_s=0.2)
    checkpoint = _changed_checkpoint(tiny_model_dir, tmp_path / "changed")
    for url, store in _serve(router, tmp_path):
        ready = httpx.get(url + "/readyz").json()
        assert ready["ready"], ready
        out = ready["replicas"][0]
        assert not out["in_rotation"] and "did not start" in out["why_out"]
        for i in range(3):
            _turn(url, f"s{i}", [{"role": "user", "content": "hi"}])
            assert router.replica_for(f"s{i}") == "up"
        published = httpx.post(url + "/admin/weights", headers=AUTH, json={"path": str(checkpoint), "version": 1},
                               timeout=60)
        assert published.status_code == 200, published.text  # the replica that serves took it
        down_stats, up_stats = router.stats().replicas
        assert up_stats.policy_version == 1 and up_stats.in_rotation
        assert down_stats.policy_version == 0 and "the update to version 1 failed" in str(down_stats.why_out)
        assert _metrics(url)["arborl_replica_in_rotation{down}"] == 0
        assert all(call.status == "ok" for i in range(3) for call in store.calls(f"s{i}"))
