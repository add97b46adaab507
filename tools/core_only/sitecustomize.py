"""Make this Python behave as a plain ``pip install`` of arcourse with no extras.

On ``PYTHONPATH`` (``make grade`` puts it there for the grader and the kernels it starts), it
refuses to import what only the extras (lab, dev, book) install, so CI proves that
``python -m arcourse grade`` needs nothing beyond the core dependencies.
"""

import importlib.abc
import sys

EXTRAS_ONLY = {"jupytext", "jupyterlab", "pytest", "hypothesis", "nbval", "ruff", "jupyter_book",
               "sphinx", "myst_nb", "myst_parser", "xdist"}


class _ExtrasBlocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in EXTRAS_ONLY:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked: only the extras "
                                      f"install it, and arcourse's core must not need it)",
                                      name=name)
        return None


sys.meta_path.insert(0, _ExtrasBlocker())
