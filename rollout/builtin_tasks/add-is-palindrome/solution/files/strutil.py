"""String helpers."""


def reverse(text):
    return text[::-1]



def is_palindrome(text):
    kept = [char.lower() for char in text if char.isalnum()]
    return kept == kept[::-1]
