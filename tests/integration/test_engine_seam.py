"""The engine seam: what differs between engines is declared by the engine, never probed.

The gateway takes its tool syntax from ``engine.model_family`` and its weight updates from
``engine.weight_updates`` (typed: ``FromPath``, ``FromTensors``), whatever class the engine is:
an engine the gateway has never heard of gets the same treatment as the embedded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from transformers import AutoTokenizer

from arborl.gateway.app import Gateway, create_app
from arborl.gateway.engines.base import FromPath, FromTensors, WeightUpdateNotSupported
from arborl.gateway.engines.embedded import EmbeddedEngine
from arborl.gateway.settings import GatewaySettings
from arborl.gateway.upstream import UpstreamEngine
from arborl.rollout.store import SqliteTrajectoryStore
from conftest import ServerThread
from scripted_engine import ScriptedEngine

ADMIN = "seam-admin-token-0123456789"


class QwenCoderEngine(ScriptedEngine):
    """An engine of a kind the gateway knows nothing about, serving a Qwen3 coder model."""

    model_family = "qwen3_moe"


def test_the_tool_syntax_comes_from_the_engines_model_family(tiny_model_dir: Path, tmp_path: Path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    coder = Gateway(QwenCoderEngine(tokenizer, lambda _: "", model_name="Qwen3-Coder-30B-A3B"), store,
                    GatewaySettings())
    assert coder.renderer is not None and coder.renderer.tool_parser.name == "qwen3_coder"
    plain = Gateway(ScriptedEngine(tokenizer, lambda _: "", model_name="Qwen3-Coder-30B-A3B"), store,
                    GatewaySettings())
    assert plain.renderer is not None and plain.renderer.tool_parser.name == "hermes"  # no family declared
    store.close()


@dataclass(frozen=True)
class FromSomewhereElse:
    version: int


async def test_the_embedded_engine_declares_its_family_and_the_updates_it_takes(tiny_model_dir: Path,
                                                                                 tmp_path: Path):
    engine = EmbeddedEngine(tiny_model_dir)
    assert engine.model_family == "llama" and set(engine.weight_updates) == {FromPath, FromTensors}
    weights = {name: tensor.clone() for name, tensor in engine.model.state_dict().items()}
    await engine.load_weights(FromTensors(weights, 1))
    engine.model.save_pretrained(tmp_path / "checkpoint")
    await engine.load_weights(FromPath(tmp_path / "checkpoint", 2))
    assert engine.stats().policy_version == 2
    with pytest.raises(WeightUpdateNotSupported):
        await engine.load_weights(FromSomewhereElse(3))  # type: ignore[arg-type]
    assert engine.stats().policy_version == 2


def test_an_engine_without_weights_refuses_a_publish_with_a_400(tmp_path: Path):
    engine = UpstreamEngine("http://127.0.0.1:9/v1", model="elsewhere")
    assert engine.weight_updates == ()
    store = SqliteTrajectoryStore(tmp_path / "store.sqlite")
    (tmp_path / "checkpoint").mkdir()
    with ServerThread(create_app(engine, store, GatewaySettings(admin_token=ADMIN))) as url:
        response = httpx.post(url + "/admin/weights", json={"path": str(tmp_path / "checkpoint"), "version": 1},
                              headers={"authorization": f"Bearer {ADMIN}"})
    assert response.status_code == 400, response.text
    assert "forwards to an upstream" in response.json()["error"]["message"]
    store.close()


def test_server_engines_are_built_from_their_kind_one_per_url_behind_a_router(tiny_model_dir: Path,
                                                                                tmp_path: Path):
    """``engine.kind`` picks the engine class; several URLs make replicas behind a router; a
    replica count that does not match the URLs is refused before anything starts."""
    from arborl.gateway.engines.replica_router import ReplicaRouter
    from arborl.gateway.engines.sglang_server import SglangEngine
    from arborl.gateway.engines.vllm_server import VllmEngine
    from arborl.ops.config import load_config
    from arborl.ops.local_gateway import build_engine

    def built(engine: dict):
        return build_engine(load_config(overrides={"engine": {"model": str(tiny_model_dir), **engine}}, environ={}),
                            tmp_path)

    single = built({"kind": "vllm", "url": "http://127.0.0.1:9101"})
    assert isinstance(single.engine, VllmEngine) and single.engine.url == "http://127.0.0.1:9101"
    urls = "http://127.0.0.1:9101, http://127.0.0.1:9102/"
    router = built({"kind": "sglang", "url": urls, "routing": "round_robin", "publish": "all"}).engine
    assert isinstance(router, ReplicaRouter)
    assert (router.routing, router.publish) == ("round_robin", "all")
    assert [r.name for r in router.stats().replicas] == ["http://127.0.0.1:9101", "http://127.0.0.1:9102"]
    assert all(isinstance(r.engine, SglangEngine) for r in router._replicas)
    with pytest.raises(SystemExit, match="engine.replicas is 3 but engine.url names 2 server"):
        built({"kind": "vllm", "url": urls, "replicas": 3})
    with pytest.raises(SystemExit, match="no python at /nowhere/python for the SGLang server"):
        built({"kind": "sglang", "launch": True, "python": "/nowhere/python"})
