from csvline import parse_line


def test_quoted_fields():
    assert parse_line('a,"b,c",d') == ["a", "b,c", "d"]
    assert parse_line('"say ""hi""",x') == ['say "hi"', "x"]


def test_plain_fields():
    assert parse_line("a,b,,c") == ["a", "b", "", "c"]
