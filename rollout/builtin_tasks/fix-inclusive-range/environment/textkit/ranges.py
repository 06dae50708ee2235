"""Integer ranges with both ends included."""


def inclusive_range(start, stop):
    """All integers from start to stop, both included: inclusive_range(1, 3) == [1, 2, 3]."""
    return list(range(start, stop))


def span_length(start, stop):
    """How many integers lie between start and stop, both included."""
    return stop - start + 1
