r"""Layers that more than one chapter uses, one copy each.

* :func:`rms_norm` / :class:`RMSNorm` (Zhang & Sennrich 2019), chapter 06 and later:
  $\mathrm{RMSNorm}(x) = x / \sqrt{\tfrac1d \sum_i x_i^2 + \epsilon} \odot g$.
* :class:`SwiGLU` (Shazeer 2020), chapters 06, 10: $W_2\,(\mathrm{silu}(W_1 x) \odot W_3 x)$.
* :class:`GeluMLP`, chapter 06: the GPT-2 feed-forward block $W_2\,\mathrm{gelu}(W_1 x + b_1) + b_2$.
* :func:`gated_activation` (van den Oord et al. 2016), chapters 05 and 07:
  $\tanh(a) \odot \sigma(b)$ for $x = [a, b]$.
* :class:`Conv1x1`: a per-position linear map on the channel (last) axis, chapters 05 and 07.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from arcourse._checks import check_int

__all__ = ["rms_norm", "RMSNorm", "SwiGLU", "GeluMLP", "gated_activation", "Conv1x1"]


def rms_norm(x: jax.Array, weight: jax.Array | None = None, eps: float = 1e-6) -> jax.Array:
    r"""$\mathrm{RMSNorm}(x) = x / \sqrt{\frac1d\sum_i x_i^2 + \epsilon} \odot g$ over the last axis.

    Unlike LayerNorm it neither subtracts the mean nor adds a bias: it rescales only.
    """
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    x = jnp.asarray(x)
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x.astype(jnp.float32)), -1, keepdims=True) + eps)
    if weight is not None:
        y = y * weight
    return y.astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMS normalisation with a learned gain ``scale`` (d,), initialised to one."""

    def __init__(self, dim: int, *, eps: float = 1e-6):
        self.dim = check_int("dim", dim)
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((self.dim,), jnp.float32))

    def __call__(self, x):
        return rms_norm(x, self.scale[...], self.eps)


class SwiGLU(nnx.Module):
    r"""The gated feed-forward block $W_2\,(\mathrm{silu}(W_1 x) \odot W_3 x)$, no biases.

    With ``hidden = 8d/3`` it has the parameters of a $4d$ GELU MLP ($3 \cdot d \cdot 8d/3 = 8d^2$).
    """

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        dim, hidden = check_int("dim", dim), check_int("hidden", hidden)
        self.w1 = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.w3 = nnx.Linear(dim, hidden, use_bias=False, rngs=rngs)
        self.w2 = nnx.Linear(hidden, dim, use_bias=False, rngs=rngs)

    def __call__(self, x):
        return self.w2(jax.nn.silu(self.w1(x)) * self.w3(x))


class GeluMLP(nnx.Module):
    r"""The GPT-2 feed-forward block $W_2\,\mathrm{gelu}(W_1 x + b_1) + b_2$."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        dim, hidden = check_int("dim", dim), check_int("hidden", hidden)
        self.w1 = nnx.Linear(dim, hidden, rngs=rngs)
        self.w2 = nnx.Linear(hidden, dim, rngs=rngs)

    def __call__(self, x):
        return self.w2(jax.nn.gelu(self.w1(x)))


def gated_activation(x: jax.Array) -> jax.Array:
    r"""$\tanh(a) \odot \sigma(b)$ where $x = [a, b]$ is split in two halves on the last axis."""
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ValueError(f"the last axis of x must have an even size, got {x.shape}")
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.tanh(a) * jax.nn.sigmoid(b)


class Conv1x1(nnx.Module):
    """A per-position linear map on the channel (last) axis: (..., C_in) -> (..., C_out)."""

    def __init__(self, in_features: int, out_features: int, *, rngs: nnx.Rngs):
        in_features = check_int("in_features", in_features)
        out_features = check_int("out_features", out_features)
        std = 1.0 / math.sqrt(in_features)
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, x):
        return x @ self.kernel[...] + self.bias[...]
