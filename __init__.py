"""arborl: a model gateway that records exact tokens into prefix trees, with an online RL loop behind it.

The repository root is this package (pyproject.toml maps each folder to `arborl.<folder>`), so
the root itself must never be an entry of `sys.path`: there its folders would also import as
top-level names, and `kernels/` would shadow Hugging Face's `kernels` package, which
transformers imports. `python -m ...` and `python -c ...` run from a checkout put the working
folder first on `sys.path`; importing arborl takes the checkout back out. arborl itself is found
through its installation (`pip install -e .`), never through the working folder.
"""

import os
import sys

__version__ = "0.1.0"


def _drop_the_checkout_from_sys_path() -> None:
    checkout = os.path.realpath(os.path.dirname(__file__))
    sys.path[:] = [
        entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout
    ]


_drop_the_checkout_from_sys_path()
