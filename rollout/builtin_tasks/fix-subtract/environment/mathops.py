def subtract(a, b):
    """a minus b."""
    return b - a


def negate(a):
    return -a
