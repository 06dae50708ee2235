from slug import slugify


def test_punctuation_and_spaces():
    assert slugify("Hello,  World!") == "hello-world"
    assert slugify("  RL for coding agents (part 2) ") == "rl-for-coding-agents-part-2"


def test_simple():
    assert slugify("simple title") == "simple-title"
