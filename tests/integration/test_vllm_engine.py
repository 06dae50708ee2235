"""The ``vllm`` engine against a real vLLM server (the CPU build, in its own venv; tests/vllm_server.py).

What is recorded is what vLLM sampled: the ids and logprobs of a call equal what the server
returns for the same prompt ids when asked directly. A conversation stitches across turns;
every dialect streams from it; a checkpoint published while clients stream swaps in without a
failed request, every call on one version, and no KV of the old weights serves the new ones.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
import vllm_server
from engine_checks import cold_first_logprob, perturbed_checkpoint, stream_calls

from arborl.gateway.app import create_app
from arborl.gateway.engines.base import EngineError, FromPath
from arborl.gateway.engines.vllm_server import VllmEngine
from arborl.gateway.settings import GatewaySettings
from arborl.rollout.store import SqliteTrajectoryStore, TrajectoryStore
from conftest import ServerThread, free_port

pytestmark = pytest.mark.slow
ADMIN = "vllm-admin-token-0123456789"
AUTH = {"authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
def vllm(vllm_tiny64: tuple[str, Path]) -> tuple[str, Path]:
    return vllm_tiny64


@pytest.fixture
def gateway(vllm: tuple[str, Path], tmp_path: Path) -> Iterator[tuple[str, TrajectoryStore, VllmEngine]]:
    url, model = vllm
    engine = VllmEngine(url, model, model_name="tiny64", max_running=8)
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    settings = GatewaySettings(admin_token=ADMIN, any_model_name=True)
    with ServerThread(create_app(engine, store, settings), settings=settings) as gateway_url:
        yield gateway_url, store, engine
    store.close()


def _direct(url: str, model: Path, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """What the vLLM server itself samples greedily for ``prompt_ids``."""
    body = {"model": model.name, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "logprobs": 1,
            "return_token_ids": True, "skip_special_tokens": False}
    choice = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]
    return choice["token_ids"], choice["logprobs"]["token_logprobs"]


def test_recorded_ids_and_logprobs_are_the_engines_own(vllm, gateway):
    url, model = vllm
    gateway_url, store, _ = gateway
    reply = httpx.post(gateway_url + "/s/direct/v1/chat/completions", timeout=60, json={
        "model": "tiny64", "messages": [{"role": "user", "content": "Say something."}],
        "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    [call] = store.calls("direct")
    prompt, completion = store.call_tokens(call)
    ids, logprobs = _direct(url, model, prompt, len(completion))
    assert completion == ids and call.token_exact
    assert call.completion_logprobs == pytest.approx(logprobs, abs=1e-5)
    assert reply.json()["usage"]["completion_tokens"] == len(completion)


def test_every_dialect_streams_from_the_server(gateway):
    gateway_url, store, _ = gateway
    client = openai.OpenAI(base_url=gateway_url + "/s/chat/v1", api_key="x")
    chunks = list(client.chat.completions.create(model="tiny64", messages=[{"role": "user", "content": "hi"}],
                                                 max_tokens=6, stream=True, temperature=0.7, seed=3))
    assert any(chunk.choices and chunk.choices[0].finish_reason for chunk in chunks)
    with anthropic.Anthropic(base_url=gateway_url + "/s/messages", api_key="x").messages.stream(
            model="tiny64", max_tokens=6, messages=[{"role": "user", "content": "hi"}]) as stream:
        message = stream.get_final_message()
    assert message.stop_reason in ("end_turn", "max_tokens")
    response = openai.OpenAI(base_url=gateway_url + "/s/responses/v1", api_key="x").responses.create(
        model="tiny64", input="hi", max_output_tokens=6)
    assert response.status == "completed" or response.incomplete_details is not None
    for session in ("chat", "messages", "responses"):
        [call] = store.calls(session)
        assert call.status == "ok" and call.token_exact and 1 <= call.completion_len <= 6


def test_a_ten_turn_conversation_stitches_without_a_break(gateway):
    gateway_url, store, _ = gateway
    client = openai.OpenAI(base_url=gateway_url + "/s/turns/v1", api_key="x")
    messages = [{"role": "system", "content": "You are terse."}]
    for turn in range(10):
        messages.append({"role": "user", "content": f"step {turn}: go on"})
        reply = client.chat.completions.create(model="tiny64", messages=messages, max_tokens=5, temperature=0)
        messages.append({"role": "assistant", "content": reply.choices[0].message.content})
    calls = store.calls("turns")
    assert len(calls) == 10 and [c.branch_reason for c in calls] == [None] * 10
    assert all(c.stitched_from == calls[i].id for i, c in enumerate(calls[1:]))


def test_checkpoints_published_while_clients_stream_swap_in_without_a_failure(vllm, gateway, tmp_path):
    url, model = vllm
    gateway_url, store, engine = gateway
    probe = [1, 504, 3145, 28, 12, 9]
    before = _direct(url, model, probe, 1)[1]
    changed = perturbed_checkpoint(model, tmp_path / "changed")

    async def run() -> list[list[int]]:
        clients = [asyncio.create_task(stream_calls(gateway_url, f"swap-{c}", 4, model="tiny64", max_tokens=16,
                                                    temperature=1.0)) for c in range(8)]
        async with httpx.AsyncClient(timeout=120) as admin:
            for version, checkpoint in ((1, changed), (2, model), (3, changed)):
                await asyncio.sleep(0.5)
                published = await admin.post(gateway_url + "/admin/weights", headers=AUTH,
                                              json={"path": str(checkpoint), "version": version})
                assert published.status_code == 200, published.text
        return await asyncio.gather(*clients)

    statuses = asyncio.run(run())
    assert all(status == 200 for client in statuses for status in client), statuses
    assert engine.stats().policy_version == 3
    for c in range(8):
        for call in store.calls(f"swap-{c}"):
            assert call.status == "ok" and len(set(call.completion_versions)) == 1  # one version per call
        versions = [call.completion_versions[0] for call in store.calls(f"swap-{c}")]
        assert versions == sorted(versions)
    # The probe's KV was cached under the original weights: after the swaps it is a cold prefill
    # under the changed ones, and the original weights give back exactly what they gave.
    assert before[0] == pytest.approx(cold_first_logprob(model, probe), abs=1e-4)
    after = _direct(url, model, probe, 1)[1]
    assert after[0] == pytest.approx(cold_first_logprob(changed, probe), abs=1e-4)
    assert after[0] != pytest.approx(before[0], abs=1e-3)
    published = httpx.post(gateway_url + "/admin/weights", headers=AUTH, json={"path": str(model), "version": 4})
    assert published.status_code == 200
    assert _direct(url, model, probe, 1)[1] == pytest.approx(before, abs=1e-6)


def test_a_checkpoint_is_served_before_the_engine_starts(vllm, tmp_path):
    """What a gateway restarting on a trained run does first (``restore_served_version``)."""
    url, model = vllm
    engine = VllmEngine(url, model, model_name="tiny64")
    probe = [1, 504, 3145, 28, 12, 9]
    changed = perturbed_checkpoint(model, tmp_path / "changed")
    asyncio.run(engine.load_weights(FromPath(changed, 7)))
    assert engine.stats().policy_version == 7
    assert _direct(url, model, probe, 1)[1][0] == pytest.approx(cold_first_logprob(changed, probe), abs=1e-4)
    asyncio.run(engine.load_weights(FromPath(model, 8)))  # the next tests' server serves its own weights again
    assert _direct(url, model, probe, 1)[1][0] == pytest.approx(cold_first_logprob(model, probe), abs=1e-4)


def test_a_server_that_does_not_answer_stops_the_engine_at_start_with_its_address(tiny_model_dir):
    port = free_port()
    engine = VllmEngine(f"http://127.0.0.1:{port}", tiny_model_dir, model_name="tiny64")
    with pytest.raises(EngineError, match=f"127.0.0.1:{port} did not answer GET /v1/models"):
        asyncio.run(engine.start())
    assert not engine.healthy


def test_arborl_serve_starts_its_vllm_servers_and_stops_them(vllm, tmp_path):
    """``engine.launch`` with ``engine.replicas: 2``: the gateway starts two servers (on the port
    of ``engine.url`` and the next; logs in the run folder), serves from both behind its router,
    and stops them when it stops."""
    _, model = vllm
    python = vllm_server.vllm_python()
    vllm_port, gateway_port = _free_port_pair(), free_port()
    config = tmp_path / "arborl.yaml"
    config.write_text(f"engine:\n  kind: vllm\n  launch: true\n  replicas: 2\n  python: {python}\n"
                      f"  model: {model}\n  url: http://127.0.0.1:{vllm_port}\n  dtype: float32\n"
                      f"  max_model_len: 2048\n  max_running: 4\n")
    run_dir = tmp_path / "run"
    gateway = subprocess.Popen([sys.executable, "-m", "arborl.ops.cli", "serve", "--config", str(config),
                                "--run-dir", str(run_dir), "--port", str(gateway_port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{gateway_port}"
    ports = (vllm_port, vllm_port + 1)
    try:
        deadline = time.monotonic() + 900
        while not _answers(url + "/readyz"):
            assert gateway.poll() is None, gateway.stdout.read() if gateway.stdout else ""
            assert time.monotonic() < deadline, "the gateway did not start its vLLM servers in 15 minutes"
            time.sleep(1)
        for session in ("one", "two"):  # two new sessions: one on each replica
            reply = httpx.post(f"{url}/s/{session}/v1/chat/completions", timeout=60, json={
                "model": model.name, "messages": [{"role": "user", "content": f"hi {session}"}], "max_tokens": 4})
            assert reply.status_code == 200, reply.text
        replicas = httpx.get(url + "/readyz").json()["replicas"]
        assert [r["name"] for r in replicas] == [f"http://127.0.0.1:{port}" for port in ports]
        assert [r["sessions"] for r in replicas] == [1, 1]
        for i in range(2):
            assert "Application startup complete" in (run_dir / f"vllm-{i}.log").read_text()
    finally:
        gateway.send_signal(signal.SIGINT)
        gateway.wait(60)
    for port in ports:
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5)


def _free_port_pair() -> int:
    """A port whose next one is free too (the second replica's)."""
    import socket

    while True:
        port = free_port()
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
