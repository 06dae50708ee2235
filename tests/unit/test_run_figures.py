"""When a version was first served, from the stored calls (ops/run_figures.py)."""

from array import array

from arborl.ops.run_figures import RunFigures, first_served_at


def versions(*values: int) -> bytes:
    return array("i", values).tobytes()


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
