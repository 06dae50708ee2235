def format_price(amount):
    """A price in dollars with two decimals: format_price(3.5) == "$3.50"."""
    return f"${amount:.2f}"
