"""When a version was first served, from the stored calls (ops/run_figures.py)."""

import random
from array import array

import pytest

from arborl.ops.run_figures import RunFigures, first_served_at, first_served_by_version, served_at


def versions(*values: int) -> bytes:
    """A completion_versions blob as the store writes it (int64)."""
    return array("q", values).tobytes()


def test_a_version_that_starts_a_call_is_served_at_its_first_token():
    calls = [(100.0, 110.0, versions(3, 3, 3)), (105.0, 107.0, versions(4, 4))]
    assert first_served_at(calls, 4) == 105.0


def test_a_version_arriving_mid_stream_is_dated_by_its_token_index():
    # 5 tokens from t=200 to t=210: token i at 200 + 2.5 i; version 7 arrives at token 2
    calls = [(200.0, 210.0, versions(6, 6, 7, 7, 7)), (208.0, 209.0, versions(7))]
    assert first_served_at(calls, 7) == 205.0


def test_newer_versions_count_and_calls_without_tokens_do_not():
    calls = [(None, None, versions()), (50.0, 51.0, versions(2)), (40.0, 60.0, versions(9))]
    assert first_served_at(calls, 5) == 40.0
    assert first_served_at(calls, 10) is None


def test_rates():
    figures = RunFigures(start=0.0, end=1800.0, rollouts=90, steps=10, busy_s=450.0, latencies_s=[30.0, 10.0, 20.0])
    assert figures.rollouts_per_hour == 180.0
    assert figures.learner_busy_fraction == 0.25
    assert figures.latency_median_s == 20.0


def test_one_pass_gives_every_version_what_a_scan_per_version_gives():
    """``read_figures`` reads the calls once for all steps; per version it must agree with the
    direct definition: the earliest token, over all calls, whose version is at least it."""
    rng = random.Random(0)
    calls = []
    for _ in range(200):
        start, n = rng.uniform(0, 1000), rng.randint(0, 12)
        version, tokens = rng.randint(0, 8), []
        for _ in range(n):  # versions never decrease inside a call; a swap may land mid-stream
            version += rng.random() < 0.15
            tokens.append(version)
        calls.append((None if rng.random() < 0.05 else start, start + rng.uniform(0, 30), versions(*tokens)))
    served = first_served_by_version(calls)
    for version in range(12):
        times = [first + (end - first) * i / max(len(vs) - 1, 1)
                 for first, end, blob in calls if first is not None
                 for vs in [array("q", blob)] for i, v in enumerate(vs) if v >= version]
        expected = pytest.approx(min(times), rel=1e-12) if times else None
        assert served_at(served, version) == expected
