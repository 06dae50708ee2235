def parse_line(line):
    """Fields of one CSV line: parse_line('a,"b,c",d') == ["a", "b,c", "d"]. A field may be wrapped
    in double quotes and then hold commas; inside such a field, two double quotes in a row stand for
    one double quote character."""
    fields, field, quoted, i = [], [], False, 0
    while i < len(line):
        char = line[i]
        if quoted:
            if char == '"' and line[i + 1:i + 2] == '"':
                field.append('"')
                i += 1
            elif char == '"':
                quoted = False
            else:
                field.append(char)
        elif char == '"':
            quoted = True
        elif char == ",":
            fields.append("".join(field))
            field = []
        else:
            field.append(char)
        i += 1
    fields.append("".join(field))
    return fields
