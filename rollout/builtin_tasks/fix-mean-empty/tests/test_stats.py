from stats import mean


def test_mean_empty():
    assert mean([]) == 0.0


def test_mean_values():
    assert mean([1, 2, 3, 4]) == 2.5
