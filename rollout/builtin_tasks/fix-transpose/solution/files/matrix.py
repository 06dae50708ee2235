def transpose(matrix):
    """Rows become columns: transpose([[1, 2, 3], [4, 5, 6]]) == [[1, 4], [2, 5], [3, 6]]."""
    return [list(column) for column in zip(*matrix)]


def identity(n):
    return [[1 if i == j else 0 for j in range(n)] for i in range(n)]
