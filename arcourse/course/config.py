"""Run modes: full (default, what a learner runs) and quick (``ARCOURSE_QUICK=1``, what CI runs).

Budgets are counted in training steps, never in seconds, so a chapter reaches the same numbers on
a laptop CPU and on a GPU.
"""

from __future__ import annotations

import os

__all__ = ["is_quick", "by_mode", "mode_banner", "seed", "SEED_ENV"]

SEED_ENV = "ARCOURSE_SEED"


def is_quick() -> bool:
    """True when the environment variable ``ARCOURSE_QUICK`` is set to a true value."""
    return os.environ.get("ARCOURSE_QUICK", "").strip().lower() in {"1", "true", "yes", "on"}


def by_mode(full, quick):
    """Return ``quick`` in quick mode and ``full`` otherwise.

    >>> steps = by_mode(full=3000, quick=60)
    """
    return quick if is_quick() else full


def mode_banner() -> str:
    """A one-line description of the current mode, printed at the top of every chapter."""
    import jax

    if is_quick():
        mode = ("QUICK mode (ARCOURSE_QUICK=1): tiny budgets; each claim prints the value "
                "full mode reaches beside the quick one")
    else:
        mode = "FULL mode: the budgets and numbers the text describes"
    offset = seed(0)
    seed_s = f" | seed offset {offset}" if offset else ""
    return f"arcourse {mode} | JAX {jax.__version__} on {jax.default_backend().upper()}{seed_s}"


def seed(base: int = 0) -> int:
    """``base`` plus the course-wide seed offset ``ARCOURSE_SEED`` (default 0).

    Every seed in a chapter goes through this, so ``ARCOURSE_SEED=1 make verify`` re-runs the whole
    course at a second seed and shows which claims hold at both.
    """
    raw = os.environ.get(SEED_ENV, "0").strip() or "0"
    try:
        offset = int(raw)
    except ValueError:
        raise ValueError(f"{SEED_ENV} must be an integer, got {raw!r}") from None
    return int(base) + offset
