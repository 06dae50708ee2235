class EmptyQueueError(Exception):
    pass


class Queue:
    """First in, first out: enqueue adds at the back, dequeue removes from the front (raising
    EmptyQueueError when empty), len() counts the items, and peek returns the front item without
    removing it (also raising EmptyQueueError when empty)."""
