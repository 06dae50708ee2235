class EmptyStackError(Exception):
    pass


class Stack:
    """Last in, first out."""

    def __init__(self):
        self._items = []

    def push(self, item):
        self._items.append(item)

    def __len__(self):
        return len(self._items)

    def pop(self):
        """Remove and return the top item; raise EmptyStackError when empty."""
        if not self._items:
            raise EmptyStackError("pop from an empty stack")
        return self._items.pop()

    def peek(self):
        """Return the top item without removing it; raise EmptyStackError when empty."""
        if not self._items:
            raise EmptyStackError("peek at an empty stack")
        return self._items[-1]

    def is_empty(self):
        return not self._items
