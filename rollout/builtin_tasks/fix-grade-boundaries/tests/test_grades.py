from grades import letter_grade


def test_boundaries():
    assert [letter_grade(s) for s in (90, 80, 70, 60, 59)] == ["A", "B", "C", "D", "F"]


def test_middles():
    assert [letter_grade(s) for s in (95, 85, 75, 65, 10)] == ["A", "B", "C", "D", "F"]
