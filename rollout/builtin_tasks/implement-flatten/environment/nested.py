def flatten(items):
    """All non-list values of a nested list, in order: flatten([1, [2, [3, []]], 4]) == [1, 2, 3, 4]."""
    raise NotImplementedError
