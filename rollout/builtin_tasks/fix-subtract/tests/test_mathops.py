from mathops import negate, subtract


def test_subtract():
    assert subtract(5, 3) == 2


def test_negate():
    assert negate(4) == -4
