def subtract(a, b):
    """a minus b."""
    return a - b


def negate(a):
    return -a
