"""String helpers."""


def reverse(text):
    return text[::-1]
