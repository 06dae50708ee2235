from todo import add_item


def test_separate_lists():
    assert add_item("a") == ["a"]
    assert add_item("b") == ["b"]


def test_add_to_given_list():
    items = ["x"]
    assert add_item("y", items) == ["x", "y"]
    assert items == ["x", "y"]
