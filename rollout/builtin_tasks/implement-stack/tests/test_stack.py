import pytest
from stack import EmptyStackError, Stack


def test_pop_and_peek():
    stack = Stack()
    stack.push(1)
    stack.push(2)
    assert stack.peek() == 2
    assert stack.pop() == 2
    assert stack.pop() == 1
    assert len(stack) == 0


def test_empty():
    stack = Stack()
    assert stack.is_empty()
    stack.push("x")
    assert not stack.is_empty()
    stack.pop()
    with pytest.raises(EmptyStackError):
        stack.pop()
    with pytest.raises(EmptyStackError):
        stack.peek()


def test_push_len():
    stack = Stack()
    stack.push(1)
    assert len(stack) == 1
