def word_counts(text):
    """How often each word occurs: lower-cased, punctuation around words removed.
    word_counts("The cat. The hat!") == {"the": 2, "cat": 1, "hat": 1}"""
    raise NotImplementedError
