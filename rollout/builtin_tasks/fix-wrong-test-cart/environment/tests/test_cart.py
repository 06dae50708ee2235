from cart import cart_total


def test_discount():
    assert cart_total([10, 20], 0.1) == 29.9
