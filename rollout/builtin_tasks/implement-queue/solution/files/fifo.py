from collections import deque


class EmptyQueueError(Exception):
    pass


class Queue:
    """First in, first out: enqueue adds at the back, dequeue removes from the front (raising
    EmptyQueueError when empty), len() counts the items, and peek returns the front item without
    removing it (also raising EmptyQueueError when empty)."""

    def __init__(self):
        self._items = deque()

    def enqueue(self, item):
        self._items.append(item)

    def dequeue(self):
        if not self._items:
            raise EmptyQueueError("dequeue from an empty queue")
        return self._items.popleft()

    def peek(self):
        if not self._items:
            raise EmptyQueueError("peek at an empty queue")
        return self._items[0]

    def __len__(self):
        return len(self._items)
