def mean(values):
    """The arithmetic mean of values; 0.0 for no values."""
    return sum(values) / len(values)
