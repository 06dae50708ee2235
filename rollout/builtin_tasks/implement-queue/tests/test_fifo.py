import pytest
from fifo import EmptyQueueError, Queue


def test_fifo_order():
    queue = Queue()
    for item in (1, 2, 3):
        queue.enqueue(item)
    assert len(queue) == 3
    assert queue.peek() == 1
    assert [queue.dequeue() for _ in range(3)] == [1, 2, 3]


def test_empty():
    queue = Queue()
    with pytest.raises(EmptyQueueError):
        queue.dequeue()
    with pytest.raises(EmptyQueueError):
        queue.peek()
