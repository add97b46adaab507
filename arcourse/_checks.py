"""Argument checks shared by every module, with one behaviour: a clear ``ValueError`` that names
the argument, what was expected and what was given. A ``bool`` is never accepted as an integer.
And :func:`as_array`, the one way the modules turn an argument into a JAX array."""

from __future__ import annotations

import numpy as np

__all__ = ["check_int", "check_positive_float", "check_choice", "as_array"]


def check_int(name: str, value, minimum: int | None = 1, maximum: int | None = None) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) in ``[minimum, maximum]``."""
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name} must be an integer <= {maximum}, got {value!r}")
    return int(value)


def check_positive_float(name: str, value, *, allow_zero: bool = False) -> float:
    """``value`` as a ``float`` if it is a real number > 0 (>= 0 with ``allow_zero``)."""
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not (v >= 0 if allow_zero else v > 0) or np.isnan(v):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return v


def check_choice(name: str, value, allowed) -> str:
    """``value`` if it is one of ``allowed``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {tuple(allowed)}, got {value!r}")
    return value


def as_array(x, dtype):
    """``x`` as a JAX array of ``dtype``. A NumPy array or a list is converted in NumPy and put
    on the device as it is: ``jnp.asarray`` would compile a small conversion program for every
    new shape (about 30 ms each on a laptop CPU, without a compilation cache), ``device_put`` of
    a ready NumPy array compiles nothing. The values are the same either way."""
    import jax
    import jax.numpy as jnp

    if isinstance(x, jax.Array):
        return jnp.asarray(x, dtype)  # no program when it already has the dtype
    return jax.device_put(np.asarray(x, dtype))
