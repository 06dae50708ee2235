from extremes import maximum


def test_empty():
    assert maximum([]) is None


def test_values():
    assert maximum([3, 9, 2]) == 9
