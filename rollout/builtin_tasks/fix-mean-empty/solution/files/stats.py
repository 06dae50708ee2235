def mean(values):
    """The arithmetic mean of values; 0.0 for no values."""
    if not values:
        return 0.0
    return sum(values) / len(values)
