def parse_line(line):
    """Fields of one CSV line: parse_line('a,"b,c",d') == ["a", "b,c", "d"]. A field may be wrapped
    in double quotes and then hold commas; inside such a field, two double quotes in a row stand for
    one double quote character."""
    return line.split(",")
