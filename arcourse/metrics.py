r"""Likelihood metrics, all from natural-log probabilities.

For a model $p$ and held-out symbols $x_1..x_T$:

* negative log-likelihood per symbol $\mathrm{NLL} = -\frac1T\sum_t \ln p(x_t\mid x_{<t})$ (nats),
* perplexity $\mathrm{PPL} = e^{\mathrm{NLL}}$,
* bits per symbol (or per dimension, per character) $= \mathrm{NLL} / \ln 2$.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from arcourse._checks import check_int

__all__ = [
    "LN2",
    "nll_from_logits",
    "token_log_probs",
    "perplexity",
    "nats_to_bits",
    "bits_to_nats",
    "bits_per_symbol",
    "entropy",
    "accuracy",
    "eval_windows",
]

LN2 = math.log(2.0)


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    r"""$\ln p(x_t)$ for every position: ``logits`` (..., V), integer ``targets`` (...) -> (...)."""
    logits = jnp.asarray(logits)
    targets = jnp.asarray(targets)
    if logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"logits must have shape targets.shape + (V,); got logits {logits.shape} "
            f"and targets {targets.shape}"
        )
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]


def nll_from_logits(logits: jax.Array, targets: jax.Array, mask: jax.Array | None = None):
    r"""Mean negative log-likelihood in nats, $-\frac{1}{T}\sum_t \ln \mathrm{softmax}(z_t)[x_t]$.

    ``mask`` (same shape as targets, optional) selects which positions count.
    """
    lp = token_log_probs(logits, targets)
    if mask is None:
        return -jnp.mean(lp)
    mask = jnp.asarray(mask, lp.dtype)
    return -jnp.sum(lp * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def perplexity(nll_nats):
    r"""$e^{\mathrm{NLL}}$: the effective number of equally likely choices per symbol."""
    return jnp.exp(nll_nats) if isinstance(nll_nats, jax.Array) else math.exp(nll_nats)


def nats_to_bits(nats):
    r"""$\text{bits} = \text{nats} / \ln 2$."""
    return nats / LN2


def bits_to_nats(bits):
    r"""$\text{nats} = \text{bits} \cdot \ln 2$."""
    return bits * LN2


def bits_per_symbol(nll_nats):
    """Bits per symbol (character, pixel, dimension) from an NLL in nats per symbol."""
    return nats_to_bits(nll_nats)


def entropy(probs: jax.Array, axis: int = -1) -> jax.Array:
    r"""Shannon entropy in nats, $H(p) = -\sum_i p_i \ln p_i$ (with $0 \ln 0 = 0$)."""
    p = jnp.asarray(probs)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def accuracy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Fraction of positions where the most likely symbol is the target."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == targets)


def eval_windows(tokens, length: int, num: int | None = None):
    r"""Held-out text cut into ``num`` consecutive windows for evaluation: ``(inputs, targets)``,
    each int[num, length], with ``targets[i, t] = inputs[i, t + 1]`` across window ends, i.e.
    ``inputs[i, t]`` $= x_{i L + t}$ and ``targets[i, t]`` $= x_{i L + t + 1}$ ($L$ = ``length``).

    ``num`` defaults to every whole window that fits, $\lfloor (N - 1) / L \rfloor$ of a text of
    $N$ symbols (the last window needs one symbol more, its last target).
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D sequence of symbols, got shape {tokens.shape}")
    length = check_int("length", length)
    most = (tokens.shape[0] - 1) // length
    num = most if num is None else check_int("num", num, 1, most)
    if num < 1:
        raise ValueError(f"tokens hold {tokens.shape[0]} symbols: too few for one window of "
                         f"length {length} and its targets")
    n = num * length
    return tokens[:n].reshape(num, length), tokens[1 : n + 1].reshape(num, length)
