import copy


def merge(base, override):
    """A new dict: base updated with override, nested dicts merged key by key (recursively).
    Neither argument is changed."""
    result = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(result.get(key), dict):
            result[key] = merge(result[key], value)
        else:
            result[key] = copy.deepcopy(value)
    return result
