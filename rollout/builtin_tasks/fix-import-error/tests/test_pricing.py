from shop.pricing import price_of


def test_price_of():
    assert price_of("milk") == 1.2
