import hashlib
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


GREET_SHA256 = "f75663095ba8036603894b27036e388b6e8940caddcdd11b301317e7e4ad1ab9"


def _load(path):
    spec = importlib.util.spec_from_file_location("checked_" + path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_greet_test_passes():
    module = _load(ROOT / "tests" / "test_greet.py")
    tests = [value for name, value in vars(module).items() if name.startswith("test_") and callable(value)]
    assert tests, "tests/test_greet.py must still hold a test"
    for test in tests:
        test()


def test_greet_test_catches_a_wrong_greet():
    module = _load(ROOT / "tests" / "test_greet.py")
    module.greet = lambda name: f"Goodbye, {name}."
    failures = 0
    for name, test in list(vars(module).items()):
        if name.startswith("test_") and callable(test):
            try:
                test()
            except (AssertionError, AttributeError, TypeError):
                failures += 1
    assert failures, "the test must still check what greet returns"


def test_greet_unchanged():
    assert hashlib.sha256((ROOT / "greet.py").read_bytes()).hexdigest() == GREET_SHA256
