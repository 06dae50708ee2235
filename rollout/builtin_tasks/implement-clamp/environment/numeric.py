def clamp(value, low, high):
    """value limited to the range [low, high]: clamp(15, 0, 10) == 10, clamp(-3, 0, 10) == 0."""
    raise NotImplementedError
