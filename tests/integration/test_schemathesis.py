"""Property-based fuzzing of the live gateway from its own OpenAPI schema: no input gets a 5xx.

Schemathesis reads ``/openapi.json`` from a gateway served over real HTTP on loopback and
generates, for every operation, schema-valid (positive) and schema-violating (negative)
requests, checking only ``not_a_server_error``. The gateway caps every completion at 4 tokens,
so generation stays cheap. Hypothesis runs derandomized: the same cases every time.

This drives schemathesis' Python API (``APIOperation.as_strategy`` under Hypothesis) in a loop
rather than ``schemathesis.pytest.from_fixture``: the lazy pytest integration of schemathesis
4.32 reads ``Function._nodeid``, which pytest 9 no longer has. The loop also lets the test count
the cases it sent and keep fuzzing the other operations after one of them fails.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import hypothesis
import pytest
import requests
import schemathesis
from conftest import LiveGateway, start_gateway
from hypothesis import HealthCheck, given
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode

MIN_CASES = 500
# Hypothesis examples per (operation, generation mode). The chat routes are where the input space
# is; the GETs have at most a session id to vary, so Hypothesis exhausts them in a few examples.
MAX_EXAMPLES = {"POST": 150, "GET": 25}
SERVED_MODEL = "tiny"


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
        }
    )
    return schemathesis.openapi.from_url(url + "/openapi.json", config=config)


def fuzz_operation(
    operation: schemathesis.APIOperation, mode: GenerationMode, http: requests.Session, statuses: Counter[int]
) -> int:
    """Run Hypothesis over one operation in one mode; returns how many cases were sent."""
    sent = 0

    @hypothesis.settings(
        max_examples=MAX_EXAMPLES.get(operation.method.upper(), 25),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large,
                               HealthCheck.large_base_example],
        phases=[hypothesis.Phase.generate, hypothesis.Phase.shrink],
        print_blob=True,
    )
    @given(case=operation.as_strategy(generation_mode=mode), served_model=st.integers(0, 9))
    def run(case: schemathesis.Case, served_model: int) -> None:
        nonlocal sent
        sent += 1
        # The schema cannot say which model is served, so most generated names are unknown (404) and
        # never reach the engine: name the served model in 9 of 10 bodies whose `model` is a string.
        if served_model and isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = SERVED_MODEL
        response = case.call(session=http, timeout=60)
        statuses[response.status_code] += 1
        try:
            case.validate_response(response, checks=[not_a_server_error])
        except (AssertionError, BaseExceptionGroup) as exc:  # schemathesis' FailureGroup: restate it plainly
            raise AssertionError(
                f"{operation.label} ({mode.value}): {response.status_code}\n"
                f"request: {case.as_curl_command()}\n"
                f"response: {response.content[:1000]!r}"
            ) from exc

    run()
    return sent


@pytest.mark.slow
def test_no_generated_request_gets_a_server_error(fuzzed_gateway: LiveGateway):
    schema = load_schema(fuzzed_gateway.url)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 7, [op.label for op in operations]
    cases: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    failures: list[str] = []
    started = time.perf_counter()
    with requests.Session() as http:
        for operation in operations:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                try:
                    cases[f"{operation.label} {mode.value}"] += fuzz_operation(operation, mode, http, statuses)
                except hypothesis.errors.Unsatisfiable:
                    pass  # nothing schema-violating to generate (an operation without parameters)
                except AssertionError as exc:
                    failures.append(str(exc))
    elapsed = time.perf_counter() - started
    total = sum(cases.values())
    print(f"\nschemathesis: {total} cases in {elapsed:.0f}s; statuses {dict(sorted(statuses.items()))}")
    for label, count in cases.items():
        print(f"  {count:4d}  {label}")

    assert not failures, "\n\n".join(failures)
    assert total >= MIN_CASES, dict(cases)
    assert statuses[200] > 0 and any(400 <= status < 500 for status in statuses), statuses

    # The fuzzing left nothing running, the engine alive, and the gateway serving.
    deadline = time.time() + 30
    while fuzzed_gateway.engine.stats().running or fuzzed_gateway.engine.stats().waiting:
        assert time.time() < deadline, fuzzed_gateway.engine.stats()
        time.sleep(0.05)
    assert fuzzed_gateway.engine.healthy
    response = requests.post(
        fuzzed_gateway.v1 + "/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}]},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] <= 4
