"""The checkout is the package `arborl`: none of its folders may import as a top-level name.

transformers 5.25 depends on Hugging Face's `kernels` package and imports it when it loads a
model; a checkout on `sys.path` (what `python -m` and `python -c` put there when run from it)
would hand transformers arborl's `kernels/` folder instead.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECKOUT = Path(__file__).resolve().parents[2]


def _run_in_checkout(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code], cwd=CHECKOUT, capture_output=True, text=True, timeout=120
    )


def test_importing_arborl_takes_the_checkout_off_sys_path():
    code = (
        "import importlib.util, os, sys; import arborl\n"
        "spec = importlib.util.find_spec('kernels')\n"
        f"checkout = {str(CHECKOUT)!r}\n"
        "ours = os.path.join(checkout, 'kernels', '__init__.py')\n"
        "assert spec is None or os.path.realpath(spec.origin) != ours, spec\n"
        "assert checkout not in [os.path.realpath(p or '.') for p in sys.path], sys.path\n"
        "import arborl.kernels.tree_attention\n"
    )
    result = _run_in_checkout(code)
    assert result.returncode == 0, result.stderr


def test_transformers_loads_a_model_class_when_run_from_the_checkout():
    result = _run_in_checkout(
        "import arborl\nfrom transformers import LlamaConfig, LlamaForCausalLM\n"
        "LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16,"
        " num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))\n"
    )
    assert result.returncode == 0, result.stderr


def test_every_product_folder_is_a_package_the_wheel_carries():
    """A subpackage missing from pyproject.toml works in the editable checkout and is absent
    from a built wheel (learner/backends/ was, until this test)."""
    import tomllib

    tool = tomllib.loads((CHECKOUT / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = set()
    for init in CHECKOUT.rglob("__init__.py"):
        folder = init.parent.relative_to(CHECKOUT)
        if folder.parts and (folder.parts[0] in ("tests", "build") or folder.parts[0].startswith(".")) \
                or "builtin_tasks" in folder.parts:
            continue
        found.add(".".join(("arborl", *folder.parts)))
    assert found == set(tool["packages"])
    for package in found - {"arborl"}:
        assert tool["package-dir"][package] == "/".join(package.split(".")[1:])
