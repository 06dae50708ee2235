"""Property-based fuzzing of the live gateway from its own OpenAPI schema: no input gets a 5xx.

Schemathesis reads ``/openapi.json`` from a gateway served over real HTTP on loopback and
generates, for every operation, schema-valid (positive) and schema-violating (negative)
requests, checking only ``not_a_server_error``. The gateway caps every completion at 4 tokens,
so generation stays cheap. Hypothesis runs from a fixed seed per operation and mode, without
its example database: the same cases every time.

This drives schemathesis' Python API (``APIOperation.as_strategy`` under Hypothesis) in a loop
rather than ``schemathesis.pytest.from_fixture``: the lazy pytest integration of schemathesis
4.32 reads ``Function._nodeid``, which pytest 9 no longer has. The loop also lets the test count
the cases it sent and keep fuzzing the other operations after one of them fails.
"""

from __future__ import annotations

import time
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

from conftest import LiveGateway, start_gateway

SEED = 20_240_613
MIN_CASES = 500
# Hypothesis examples per (operation, generation mode). The chat routes are where the input space
# is; the GETs have at most a session id to vary, so Hypothesis exhausts them in a few examples.
MAX_EXAMPLES = {"POST": 250, "GET": 25}
SERVED_MODEL = "tiny"  # named in 9 of 10 schema-valid bodies; the rest probe unknown models


@pytest.fixture(scope="module")
def fuzzed_gateway(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveGateway]:
    server, live = start_gateway(tiny_model_dir, tmp_path_factory.mktemp("fuzz"), max_tokens_cap=4)
    with server as url:
        live.url = url
        yield live
    live.store.close()


def load_schema(url: str) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "generation": {"deterministic": True, "database": "none"},
            "checks": {"enabled": False, "not_a_server_error": {"enabled": True}},
            # Reproducers must show the real body: by default `max_tokens` is masked as a secret.
            "output": {"sanitization": {"enabled": False}, "truncation": {"enabled": False}},
        }
    )
    return schemathesis.openapi.from_url(url + "/openapi.json", config=config)


def steer_towards_the_engine(body: dict) -> None:
    """Repair what the schema cannot express, so that most bodies get past validation to the engine.

    The schema cannot say which model is served, that only assistant messages may omit content or
    carry tool calls, that a tool message answers an earlier tool call, or that stop strings are
    non-empty; left alone, nearly every schema-valid request is refused with a 400/404 before the
    engine sees it. Every repair keeps a valid body valid. (Schema-violating bodies are left alone:
    validation refuses them before the model or the messages' meaning is looked at.)
    """
    if isinstance(body.get("model"), str):
        body["model"] = SERVED_MODEL
    if isinstance(body.get("messages"), list):
        call_ids: set[str] = set()
        for message in body["messages"]:
            if not isinstance(message, dict):
                continue
            if message.get("role") == "assistant":
                if isinstance(message.get("tool_calls"), list):
                    call_ids.update(c.get("id") for c in message["tool_calls"] if isinstance(c, dict)
                                    and isinstance(c.get("id"), str))
                continue
            message.pop("tool_calls", None)
            if message.get("role") == "tool" and (
                not isinstance(message.get("tool_call_id"), str) or message["tool_call_id"] not in call_ids
            ):
                message["role"] = "user"
            if message.get("content") is None:
                message["content"] = "hi"
    if isinstance(body.get("contents"), list):
        steer_gemini_contents(body)
    if body.get("stop") == "":
        del body["stop"]
    elif isinstance(body.get("stop"), list):
        body["stop"] = [stop for stop in body["stop"] if stop != ""]


def steer_gemini_contents(body: dict) -> None:
    """The Gemini counterpart: function calls only in model turns, each function response answering
    an earlier call by name, and a system instruction of text alone."""
    calls: list[str] = []
    for content in body["contents"]:
        if not isinstance(content, dict) or not isinstance(content.get("parts"), list):
            continue
        model_turn = content.get("role") == "model"
        parts = []
        for part in content["parts"]:
            if isinstance(part, dict):
                call, response = part.get("functionCall"), part.get("functionResponse")
                if model_turn and isinstance(call, dict) and isinstance(call.get("name"), str):
                    calls.append(call["name"])
                elif isinstance(response, dict) and not model_turn and response.get("name") in calls:
                    calls.remove(response["name"])
                    response.pop("id", None)
                elif call is not None or response is not None or not isinstance(part.get("text"), str):
                    part = {"text": "hi"}
            parts.append(part)
        content["parts"] = parts
    system = body.get("systemInstruction")
    if isinstance(system, dict) and isinstance(system.get("parts"), list):
        system["parts"] = [{"text": "Be brief."}]
    config = (body.get("toolConfig") or {}).get("functionCallingConfig")
    if isinstance(config, dict):
        config.pop("allowedFunctionNames", None)
        if not body.get("tools"):
            config.pop("mode", None)


@dataclass
class Tally:
    cases: Counter[str] = field(default_factory=Counter)  # cases sent, by "operation mode"
    statuses: Counter[int] = field(default_factory=Counter)
    first_server_error: str | None = None  # the very first 5xx: the culprit, if a later one is fallout


def describe(case: schemathesis.Case, response: schemathesis.Response) -> str:
    return f"request: {case.as_curl_command()}\nresponse: {response.status_code} {response.content[:1000]!r}"


def fuzz_operation(operation: schemathesis.APIOperation, mode: GenerationMode, http: requests.Session,
                   tally: Tally) -> None:
    """Run Hypothesis over one operation in one mode (raises what it found)."""
    label = f"{operation.label} {mode.value}"

    @hypothesis.seed(SEED + zlib.crc32(label.encode()))
    @hypothesis.settings(
        max_examples=MAX_EXAMPLES.get(operation.method.upper(), 25),
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                               HealthCheck.large_base_example],
        phases=[hypothesis.Phase.generate, hypothesis.Phase.shrink],
        print_blob=True,
    )
    @given(
        case=operation.as_strategy(generation_mode=mode),
        served_model=st.sampled_from([True] * 9 + [False]),
    )
    def run(case: schemathesis.Case, served_model: bool) -> None:
        tally.cases[label] += 1
        if served_model and mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            steer_towards_the_engine(case.body)
            if "model" in (case.path_parameters or {}):  # Gemini names the model in the path
                case.path_parameters["model"] = SERVED_MODEL
        response = case.call(session=http, timeout=60)
        tally.statuses[response.status_code] += 1
        if response.status_code >= 500 and tally.first_server_error is None:
            tally.first_server_error = f"{label}\n{describe(case, response)}"
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except (AssertionError, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup: restate it plainly
            raise AssertionError(f"{label}\n{describe(case, response)}") from exc

    run()


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error(fuzzed_gateway: LiveGateway):
    schema = load_schema(fuzzed_gateway.url)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7, [op.label for op in operations]
    # The routes under /s/{session_id} are fuzzed too, session id included (it is a declared parameter).
    in_session = [op.label for op in operations if op.path.startswith("/s/{session_id}/")]
    assert len(in_session) >= 5, in_session
    tally = Tally()
    failures: list[str] = []
    started = time.perf_counter()
    with requests.Session() as http:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    fuzz_operation(operation, mode, http, tally)
                except hypothesis.errors.Unsatisfiable:
                    pass  # nothing schema-violating to generate (an operation without parameters)
                except (AssertionError, BaseExceptionGroup) as exc:  # one failure, or several distinct ones
                    failures.append(str(exc) if isinstance(exc, AssertionError)
                                    else "\n\n".join(str(e) for e in exc.exceptions))
            if not fuzzed_gateway.engine.healthy:
                failures.append(f"the engine died fuzzing {operation.label}: later requests all get 503")
                break
    elapsed = time.perf_counter() - started
    total = sum(tally.cases.values())
    print(f"\nschemathesis: {total} cases in {elapsed:.0f}s; statuses {dict(sorted(tally.statuses.items()))}")
    for label, count in tally.cases.items():
        print(f"  {count:4d}  {label}")

    assert not failures, f"first 5xx of the run:\n{tally.first_server_error}\n\nfailures (shrunk):\n" + (
        "\n\n".join(failures))
    assert total >= MIN_CASES, dict(tally.cases)
    assert all(tally.cases[f"{label} {GenerationMode.POSITIVE.value}"] > 0 for label in in_session), dict(tally.cases)
    assert tally.statuses[200] > 0 and any(400 <= status < 500 for status in tally.statuses), tally.statuses

    # The fuzzing left nothing running, the engine alive, and the gateway serving.
    deadline = time.time() + 30
    while fuzzed_gateway.engine.stats().running or fuzzed_gateway.engine.stats().waiting:
        assert time.time() < deadline, fuzzed_gateway.engine.stats()
        time.sleep(0.05)
    response = requests.post(
        fuzzed_gateway.v1 + "/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 4
