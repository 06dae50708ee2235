import string


def word_counts(text):
    """How often each word occurs: lower-cased, punctuation around words removed.
    word_counts("The cat. The hat!") == {"the": 2, "cat": 1, "hat": 1}"""
    counts = {}
    for raw in text.split():
        word = raw.strip(string.punctuation).lower()
        if word:
            counts[word] = counts.get(word, 0) + 1
    return counts
