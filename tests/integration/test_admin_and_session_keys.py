"""Keys and admin routes as an attacker would try them, over real HTTP on loopback.

- A session key records into its own session only (and that session's auxiliary tries): naming
  another session by path or header is a 403, and nothing lands in the other session.
- Admin routes (and feedback) check the key before they look at the body: without a key, a body
  of the wrong shape, or not JSON at all, is a 401, so the caller learns nothing of the schema.
- Publishing weights: versions are 64-bit (a version above 2^31 is served and recorded exactly;
  2^63 is refused); a path that is not a checkpoint is a 400 saying why; the audit log's ``last``
  is bounded.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import httpx
import pytest

from conftest import LiveGateway, serve_live

ADMIN = "admin-token-for-tests-0123456789"
AUTH = {"authorization": f"Bearer {ADMIN}"}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
MESSAGES = {"model": "tiny", "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}


@pytest.fixture
def admin_gateway(tiny_model_dir: Path, tmp_path: Path):
    yield from serve_live(tiny_model_dir, tmp_path, admin_token=ADMIN)


def test_a_session_key_records_only_into_its_own_session(admin_gateway: LiveGateway):
    live = admin_gateway
    key = live.store.issue_session_key("sess-A")
    as_a = {"authorization": f"Bearer {key}"}
    own = httpx.post(live.v1 + "/chat/completions", json=CHAT, headers=as_a, timeout=60)
    assert own.status_code == 200 and own.headers["x-arborl-session"] == "sess-A"
    own_route = httpx.post(live.url + "/s/sess-A/v1/chat/completions", json=CHAT, headers=as_a, timeout=60)
    assert own_route.status_code == 200
    for url, headers in [
        (live.url + "/s/sess-B/v1/chat/completions", as_a),
        (live.v1 + "/chat/completions", {**as_a, "x-arborl-session": "sess-B"}),
        (live.url + "/s/sess-B/v1/responses", as_a),
    ]:
        body = CHAT if "chat" in url else {"model": "tiny", "input": "hi", "max_output_tokens": 2}
        refused = httpx.post(url, json=body, headers=headers, timeout=60)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["type"] == "permission_error"
    anthropic = httpx.post(live.url + "/s/sess-B/v1/messages", json=MESSAGES, headers={"x-api-key": key}, timeout=60)
    assert anthropic.status_code == 403 and anthropic.json()["error"]["type"] == "permission_error", anthropic.text
    assert live.store.calls("sess-B") == [] and len(live.store.calls("sess-A")) == 2


@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/admin/weights", {"bad": 1}),
    ("POST", "/admin/weights", b'{"path": '),
    ("POST", "/admin/learner", {"lr": "fast"}),
    ("POST", "/admin/rollback", {"version": "x"}),
    ("POST", "/admin/serving/pause", {"timeout_s": -1}),
    ("GET", "/admin/actions?last=banana", None),
    ("POST", "/admin/sessions/a..b/key", None),
    ("GET", "/admin/sessions/rollout-1/calls", None),
    ("POST", "/v1/feedback", {"session_id": 5, "reward": "high"}),
    ("POST", "/v1/feedback", b"not json"),
])
def test_admin_routes_check_the_key_before_the_body(admin_gateway: LiveGateway, method, path, body):
    content = body if isinstance(body, bytes) else json.dumps(body).encode() if body is not None else None
    response = httpx.request(method, admin_gateway.url + path, content=content, timeout=30,
                             headers={"content-type": "application/json"})
    assert response.status_code == 401, response.text
    assert "Field" not in response.text and "valid" not in response.json()["error"]["message"]


def test_empty_credentials_are_not_an_admin_key(admin_gateway: LiveGateway):
    for headers in ({}, {"authorization": "Bearer"}, {"x-api-key": ""}, {"authorization": "Bearer admin"}):
        assert httpx.get(admin_gateway.url + "/admin/policy", headers=headers).status_code == 401, headers


def test_a_rollout_worker_gets_session_keys_and_call_counts_over_the_admin_api(admin_gateway: LiveGateway):
    live = admin_gateway
    issued = httpx.post(live.url + "/admin/sessions/rollout-7/key", headers=AUTH, timeout=30)
    assert issued.status_code == 200 and issued.json()["session_id"] == "rollout-7"
    key = {"authorization": f"Bearer {issued.json()['api_key']}"}
    assert httpx.post(live.v1 + "/chat/completions", json=CHAT, headers=key, timeout=60).status_code == 200
    assert httpx.post(live.v1 + "/chat/completions", json=CHAT, headers=key, timeout=60).status_code == 200
    counted = httpx.get(live.url + "/admin/sessions/rollout-7/calls", headers=AUTH, timeout=30).json()
    assert counted["calls"] == 2 and counted["prompt_tokens"] > 0 and counted["refused"] == 0
    assert httpx.get(live.url + "/admin/sessions/nobody/calls", headers=AUTH, timeout=30).json()["calls"] == 0
    for path in ("/admin/sessions/a..b/key", "/admin/sessions/" + "x" * 129 + "/key"):
        refused = httpx.post(live.url + path, headers=AUTH, timeout=30)
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "session", refused.text


def _checkpoint(model_dir: Path, folder: Path) -> Path:
    """The tiny model's own weights as a checkpoint folder (what the learner publishes)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    folder.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    return folder


def test_versions_are_64_bit_end_to_end(admin_gateway: LiveGateway, tiny_model_dir: Path, tmp_path: Path):
    live = admin_gateway
    folder = _checkpoint(tiny_model_dir, tmp_path / "ckpt")
    too_big = httpx.post(live.url + "/admin/weights", json={"path": str(folder), "version": 2**63}, headers=AUTH)
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "version", too_big.text
    version = 2**31 + 7  # past int32: every completion failed after this before versions were 64-bit
    published = httpx.post(live.url + "/admin/weights", json={"path": str(folder), "version": version},
                           headers=AUTH, timeout=60)
    assert published.status_code == 200, published.text
    reply = httpx.post(live.url + "/s/big-version/v1/chat/completions", json=CHAT, timeout=60)
    assert reply.status_code == 200, reply.text
    (call,) = live.store.calls("big-version")
    assert call.completion_versions == [version] * call.completion_len
    assert httpx.get(live.url + "/admin/policy", headers=AUTH).json()["version"] == version
    rollback = httpx.post(live.url + "/admin/rollback", json={"version": 2**64}, headers=AUTH)
    assert rollback.status_code == 400, rollback.text


def test_publishing_what_is_not_a_checkpoint_is_a_400(admin_gateway: LiveGateway, tmp_path: Path):
    live = admin_gateway
    text = tmp_path / "notes.txt"
    text.write_text("these are not weights")
    noise = tmp_path / "noise.safetensors"
    noise.write_bytes(bytes(range(256)) * 64)
    database = tmp_path / "store.db"
    sqlite3.connect(database).execute("CREATE TABLE t (x)").connection.commit()
    empty = tmp_path / "empty"
    empty.mkdir()
    for version, path in enumerate([text, noise, database, empty], start=1):
        response = httpx.post(live.url + "/admin/weights", json={"path": str(path), "version": version},
                              headers=AUTH, timeout=60)
        assert response.status_code == 400, (path, response.text)
        assert response.json()["error"]["param"] == "path" and "safetensors" in response.json()["error"]["message"]
    assert live.engine.stats().policy_version == 0 and live.engine.healthy


@pytest.mark.parametrize("last", ["99999999999999999999999", "0", "-5", str(2**63)])
def test_the_audit_log_bounds_last(admin_gateway: LiveGateway, last: str):
    response = httpx.get(admin_gateway.url + f"/admin/actions?last={last}", headers=AUTH)
    assert response.status_code == 400 and response.json()["error"]["param"] == "last", response.text
    assert httpx.get(admin_gateway.url + "/admin/actions?last=10000", headers=AUTH).status_code == 200


def test_feedback_refuses_a_session_id_that_is_not_one(admin_gateway: LiveGateway):
    for session in ("../../etc", "a/b", "x" * 129, "bad\nid"):
        response = httpx.post(admin_gateway.url + "/v1/feedback", json={"session_id": session, "accept": True},
                              headers=AUTH)
        assert response.status_code == 400 and "session" in response.json()["error"]["message"], response.text
