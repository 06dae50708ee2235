def cart_total(prices, discount=0.0):
    """The sum of prices less a fractional discount: cart_total([10, 20], 0.1) == 27.0."""
    return round(sum(prices) * (1 - discount), 2)
