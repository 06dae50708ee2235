import pytest
from inventory import Inventory


def _stocked():
    inventory = Inventory()
    inventory.add("bolt", 10)
    return inventory


def test_partial_remove():
    inventory = _stocked()
    inventory.remove("bolt", 3)
    assert inventory.count("bolt") == 7


def test_remove_all():
    inventory = _stocked()
    inventory.remove("bolt", 10)
    assert "bolt" not in inventory.items


def test_remove_too_many():
    inventory = _stocked()
    with pytest.raises(ValueError):
        inventory.remove("bolt", 11)
    assert inventory.count("bolt") == 10


def test_remove_unknown():
    with pytest.raises(KeyError):
        _stocked().remove("nut", 1)


def test_add():
    inventory = _stocked()
    inventory.add("bolt", 5)
    assert inventory.count("bolt") == 15
