import hashlib
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


CART_SHA256 = "727dcc361c45601e255af3048775cff841ac64842511c51ef02c17bdc25f3b09"


def _load(path):
    spec = importlib.util.spec_from_file_location("checked_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tests(module):
    return [value for name, value in vars(module).items() if name.startswith("test_") and callable(value)]


def test_cart_test_passes():
    tests = _tests(_load(ROOT / "tests" / "test_cart.py"))
    assert tests, "tests/test_cart.py must still hold a test"
    for test in tests:
        test()


def test_cart_test_catches_a_wrong_total():
    module = _load(ROOT / "tests" / "test_cart.py")
    module.cart_total = lambda prices, discount=0.0: sum(prices)
    failures = 0
    for test in _tests(module):
        try:
            test()
        except (AssertionError, AttributeError, TypeError):
            failures += 1
    assert failures, "the test must still check what cart_total returns"


def test_cart_unchanged():
    assert hashlib.sha256((ROOT / "cart.py").read_bytes()).hexdigest() == CART_SHA256
