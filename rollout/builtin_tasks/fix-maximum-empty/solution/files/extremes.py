def maximum(values):
    """The largest of values, or None when there are none."""
    return max(values) if values else None
