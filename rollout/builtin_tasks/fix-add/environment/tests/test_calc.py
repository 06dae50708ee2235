from calc import multiply


def test_multiply():
    assert multiply(3, 4) == 12
