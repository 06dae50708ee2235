from parity import is_even, is_positive


def test_is_even():
    assert is_even(4) and is_even(0) and is_even(-2)
    assert not is_even(7)


def test_is_positive():
    assert is_positive(1) and not is_positive(0)
