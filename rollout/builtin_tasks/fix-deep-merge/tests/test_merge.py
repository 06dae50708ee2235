import copy

from config.defaults import DEFAULTS
from config.merge import merge


def test_nested_merge():
    merged = merge(DEFAULTS, {"server": {"port": 9000}})
    assert merged == {"server": {"host": "127.0.0.1", "port": 9000}, "debug": False}


def test_arguments_unchanged():
    base = {"a": {"b": {"c": 1}}}
    override = {"a": {"b": {"d": 2}}}
    before = copy.deepcopy((base, override))
    assert merge(base, override) == {"a": {"b": {"c": 1, "d": 2}}}
    assert (base, override) == before


def test_flat_override():
    assert merge({"x": 1, "y": 2}, {"y": 3}) == {"x": 1, "y": 3}
