from textstats import word_counts


def test_counts():
    assert word_counts("The cat. The hat!") == {"the": 2, "cat": 1, "hat": 1}


def test_empty():
    assert word_counts("") == {}
