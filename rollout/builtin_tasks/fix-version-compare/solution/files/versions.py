def _parts(version):
    return [int(part) for part in version.split(".")]


def is_newer(candidate, current):
    """True when version string candidate (like "1.10.2") is newer than current."""
    a, b = _parts(candidate), _parts(current)
    width = max(len(a), len(b))
    return a + [0] * (width - len(a)) > b + [0] * (width - len(b))
