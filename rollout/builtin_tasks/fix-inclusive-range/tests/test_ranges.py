from textkit.ranges import inclusive_range, span_length


def test_inclusive_range_includes_stop():
    assert inclusive_range(1, 3) == [1, 2, 3]
    assert inclusive_range(5, 5) == [5]


def test_span_length():
    assert span_length(1, 3) == 3
