from orders.lines import Line
from orders.pricing import order_total

LINES = [Line("pen", 2.5, 4), Line("pad", 5.0, 2)]


def test_tax_after_discount():
    assert order_total(LINES, "SAVE10") == 21.6


def test_no_discount():
    assert order_total(LINES) == 24.0
