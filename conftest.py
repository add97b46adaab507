"""pytest hooks for the whole repository.

CI executes each learner copy once, under nbval, and takes its scorecard from that execution:
with ``ARCOURSE_NBVAL_REPORTS=DIR`` set, the kernel nbval starts for ``notebooks/NN_slug.ipynb``
writes every ``check`` result to ``DIR/NN_slug.jsonl`` (``python -m arcourse grade
--from-report`` then scores it without executing the notebook again).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    # Runs before pytest sets up the item's parents, so before nbval starts the notebook's
    # kernel, which inherits this environment.
    reports = os.environ.get("ARCOURSE_NBVAL_REPORTS")
    path = Path(str(getattr(item, "path", getattr(item, "fspath", ""))))
    if reports and path.suffix == ".ipynb":
        Path(reports).mkdir(parents=True, exist_ok=True)
        os.environ["ARCOURSE_GRADE_REPORT"] = str(Path(reports).resolve() / f"{path.stem}.jsonl")
