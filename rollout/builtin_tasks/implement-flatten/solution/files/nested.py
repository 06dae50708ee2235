def flatten(items):
    """All non-list values of a nested list, in order: flatten([1, [2, [3, []]], 4]) == [1, 2, 3, 4]."""
    out = []
    for item in items:
        if isinstance(item, list):
            out.extend(flatten(item))
        else:
            out.append(item)
    return out
