from money import format_price


def test_two_decimals():
    assert format_price(3.5) == "$3.50"
    assert format_price(2) == "$2.00"


def test_already_two_decimals():
    assert format_price(9.99) == "$9.99"
