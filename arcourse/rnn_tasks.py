r"""A synthetic source where memory matters: remember a key across a gap of noise.

Each segment of the stream is

    key, noise_1, ..., noise_G, marker, key

with the key uniform over ``K`` symbols, the ``G`` noise symbols uniform over ``N`` others and one
marker symbol. Segments are independent. Given the whole past, the key at a segment's start costs
$\ln K$ nats, every noise symbol $\ln N$, and the marker and the recalled key nothing: they are
determined. A model that sees only the last $c \le G + 1$ symbols cannot see the key when it has
to recall it, and pays at least $\ln K$ there, whatever it learns. A recurrent model can carry
the key in its state and pay nothing.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["RecallTask"]


@dataclass(frozen=True)
class RecallTask:
    """Segments ``key, noise * gap, marker, key``; symbols ``0..K-1`` are keys, then noise, then
    the marker."""

    num_keys: int = 8
    num_noise: int = 4
    gap: int = 20

    def __post_init__(self):
        for name, lo in (("num_keys", 2), ("num_noise", 1), ("gap", 1)):
            v = getattr(self, name)
            if not isinstance(v, int | np.integer) or isinstance(v, bool) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_noise + 1

    @property
    def marker(self) -> int:
        return self.num_keys + self.num_noise

    @property
    def segment_length(self) -> int:
        return self.gap + 3

    def sample(self, key: jax.Array, batch_size: int, num_segments: int) -> jax.Array:
        """``batch_size`` sequences of ``num_segments`` segments, int32[B, S * (gap + 3)]. Traceable.

        Compiled as one program (integer arithmetic only, so the same numbers as op by op)."""
        _check_num_segments(num_segments)
        return _sample(self, key, batch_size, num_segments)

    def batch(self, key: jax.Array, batch_size: int, num_segments: int):
        """(inputs, targets) for next-symbol prediction: the sequence and the sequence shifted by one."""
        _check_num_segments(num_segments)
        return _batch(self, key, batch_size, num_segments)

    def recall_mask(self, num_segments: int) -> np.ndarray:
        """True at the targets (of :meth:`batch`) that are recalled keys, shape (S * L - 1,)."""
        L = self.segment_length
        pos = np.arange(1, num_segments * L)  # positions of the targets in the sequence
        return (pos % L) == L - 1

    def optimal_nll(self, num_segments: int) -> float:
        r"""Exact mean NLL (nats per target) of the best model given the whole past.

        Over the $S L - 1$ targets of :meth:`batch`: $S - 1$ keys cost $\ln K$, $S G$ noise symbols
        $\ln N$; markers and recalls cost 0.
        """
        S, L = num_segments, self.segment_length
        total = (S - 1) * math.log(self.num_keys) + S * self.gap * math.log(self.num_noise)
        return total / (S * L - 1)

    def window_bound(self, num_segments: int, context: int) -> float:
        r"""A lower bound on the mean NLL of any model that sees only the last ``context`` symbols.

        If ``context <= gap + 1`` the key is out of sight at every recall: each of the $S$ recalls
        costs at least $\ln K$ more than :meth:`optimal_nll` allows.
        """
        if context >= self.gap + 2:
            return self.optimal_nll(num_segments)
        S, L = num_segments, self.segment_length
        return self.optimal_nll(num_segments) + S * math.log(self.num_keys) / (S * L - 1)


def _check_num_segments(num_segments) -> None:
    if not isinstance(num_segments, int) or num_segments < 1:
        raise ValueError(f"num_segments must be a positive integer, got {num_segments!r}")


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _sample(task: RecallTask, key: jax.Array, batch_size: int, num_segments: int) -> jax.Array:
    k1, k2 = jax.random.split(key)
    keys = jax.random.randint(k1, (batch_size, num_segments, 1), 0, task.num_keys)
    noise = task.num_keys + jax.random.randint(
        k2, (batch_size, num_segments, task.gap), 0, task.num_noise)
    marker = jnp.full((batch_size, num_segments, 1), task.marker)
    seg = jnp.concatenate([keys, noise, marker, keys], axis=-1)
    return seg.reshape(batch_size, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 2, 3))
def _batch(task: RecallTask, key: jax.Array, batch_size: int, num_segments: int):
    x = _sample(task, key, batch_size, num_segments)
    return x[:, :-1], x[:, 1:]
