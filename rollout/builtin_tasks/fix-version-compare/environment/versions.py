def is_newer(candidate, current):
    """True when version string candidate (like "1.10.2") is newer than current."""
    return candidate > current
