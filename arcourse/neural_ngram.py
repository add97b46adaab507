r"""The neural n-gram language model of Bengio, Ducharme, Vincent and Jauvin (2003).

The model predicts the next symbol from the previous $n$ symbols only (``context`` $= n$):

$$
e_t = [\,E[x_{t-n+1}];\ \dots;\ E[x_t]\,] \in \mathbb{R}^{nd}, \qquad
h_t = \tanh(W_h e_t + b_h), \qquad
p(x_{t+1} \mid x_{t-n+1:t}) = \mathrm{softmax}(W_o h_t + b_o),
$$

with a shared embedding table $E \in \mathbb{R}^{(V+1)\times d}$. Row $V$ is a padding symbol:
positions near the start of a sequence, which have fewer than $n$ predecessors, are left-padded
with it. Applied to a whole sequence at once, position $t$ of the output predicts token $t+1$,
which is what teacher forcing with shifted targets needs.

:func:`sample` runs the model free (each drawn symbol is fed back as input) inside one compiled
``lax.scan``, and returns the model's own log-probability of every symbol it drew.

A model that sees $n$ symbols is itself an order-$n$ Markov chain over the $V$ symbols, so on a
small alphabet everything about it can be computed exactly, without sampling:
:func:`transition_table` lists $p_\theta(x \mid c)$ for all $V^n$ contexts, :func:`context_step`
moves a distribution over contexts one generated symbol forward, :func:`stationary_contexts`
gives the contexts a chain visits in the long run, and :func:`kl_rows` the divergence between
two next-symbol distributions in every context. Chapter 02 measures exposure bias with them.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse._checks import check_int

__all__ = ["NeuralNGram", "context_windows", "sample", "all_contexts", "transition_table",
           "context_step", "stationary_contexts", "kl_rows"]


def _check_positive_int(name: str, value) -> int:
    return check_int(name, value, 1)


def context_windows(tokens: jax.Array, context: int, pad_id: int) -> jax.Array:
    r"""The $n$ symbols each position sees: ``int[B, T]`` -> ``int[B, T, n]``, oldest first.

    ``out[b, t, j] = tokens[b, t - n + 1 + j]``, or ``pad_id`` where that index is negative.
    """
    context = _check_positive_int("context", context)
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must have shape (batch, time), got {tokens.shape}")
    T = tokens.shape[1]
    padded = jnp.pad(tokens, ((0, 0), (context - 1, 0)), constant_values=pad_id)
    return jnp.stack([padded[:, j : j + T] for j in range(context)], axis=-1)


class NeuralNGram(nnx.Module):
    r"""Bengio et al. (2003): embeddings of the previous ``context`` symbols, a tanh MLP, a softmax.

    Args:
      vocab_size: $V$, the number of symbols.
      context: $n$, how many previous symbols (including the current one) the model sees.
      embed_size: $d$, the size of each symbol's embedding.
      hidden_size: the width of the tanh layer.
      rngs: ``nnx.Rngs`` for the initialisation.

    ``model(tokens)`` maps ``int32[B, T]`` to logits ``float32[B, T, V]``; position $t$ sees tokens
    $t-n+1..t$ (left-padded) and predicts token $t+1$.
    """

    def __init__(self, vocab_size: int, context: int, embed_size: int, hidden_size: int, *,
                 rngs: nnx.Rngs):
        self.vocab_size = _check_positive_int("vocab_size", vocab_size)
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size!r}")
        self.context = _check_positive_int("context", context)
        embed_size = _check_positive_int("embed_size", embed_size)
        hidden_size = _check_positive_int("hidden_size", hidden_size)
        self.embed = nnx.Embed(self.vocab_size + 1, embed_size, rngs=rngs)
        self.hidden = nnx.Linear(self.context * embed_size, hidden_size, rngs=rngs)
        self.out = nnx.Linear(hidden_size, self.vocab_size, rngs=rngs)

    @property
    def pad_id(self) -> int:
        """The padding symbol that stands for "before the start of the sequence"."""
        return self.vocab_size

    def next_logits(self, window: jax.Array) -> jax.Array:
        """Logits of the next symbol from context windows ``int[..., n]`` -> ``float32[..., V]``."""
        window = jnp.asarray(window)
        if window.shape[-1:] != (self.context,):
            raise ValueError(f"window must end in the context size {self.context}, "
                             f"got shape {window.shape}")
        e = self.embed(window)  # [..., n, d]
        e = e.reshape(*e.shape[:-2], -1)  # [..., n*d]
        return self.out(jnp.tanh(self.hidden(e)))

    def __call__(self, tokens: jax.Array) -> jax.Array:
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array of shape (batch, time), "
                             f"got {tokens.dtype}{list(tokens.shape)}")
        return self.next_logits(context_windows(tokens, self.context, self.pad_id))


@partial(jax.jit, static_argnames=("graphdef", "batch_size", "length"))
def _sample(graphdef, state, key, temperature, *, batch_size: int, length: int):
    model = nnx.merge(graphdef, state)
    window = jnp.full((batch_size, model.context), model.pad_id, jnp.int32)

    def step(window, k):
        logits = model.next_logits(window).astype(jnp.float32)
        logp = jax.nn.log_softmax(logits / temperature, axis=-1)
        x = jax.random.categorical(k, logp, axis=-1).astype(jnp.int32)
        lp = jnp.take_along_axis(logp, x[:, None], axis=-1)[:, 0]
        window = jnp.concatenate([window[:, 1:], x[:, None]], axis=1)
        return window, (x, lp)

    _, (xs, lps) = jax.lax.scan(step, window, jax.random.split(key, length))
    return xs.T, lps.T


def sample(key: jax.Array, model: NeuralNGram, batch_size: int, length: int, *,
           temperature: float = 1.0) -> tuple[jax.Array, jax.Array]:
    r"""Free-running generation: draw $x_{t+1} \sim p_\theta(\cdot \mid x_{t-n+1:t})$ and feed it back.

    Starts from the padding context (as the first position of every training window does) and
    returns ``(tokens int32[B, L], log_probs float32[B, L])``, where ``log_probs`` holds
    $\ln p_\theta(x_t \mid \text{its context})$ at ``temperature``. One compiled ``lax.scan``;
    calling again with the same sizes does not recompile.
    """
    batch_size = _check_positive_int("batch_size", batch_size)
    length = _check_positive_int("length", length)
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    graphdef, state = nnx.split(model)
    return _sample(graphdef, state, key, jnp.float32(temperature),
                   batch_size=batch_size, length=length)


# --------------------------------------------------------------------------------------------
# The model as a Markov chain: exact context distributions and divergences
# --------------------------------------------------------------------------------------------
def all_contexts(vocab_size: int, context: int) -> np.ndarray:
    r"""Every window of ``context`` symbols, ``int32[V**n, n]``, oldest first.

    Row $i$ is $i$ written in base $V$ with the oldest symbol most significant, the order of
    ``MarkovSource`` contexts (no padding symbol: these are the contexts of a running chain).
    """
    V = _check_positive_int("vocab_size", vocab_size)
    n = _check_positive_int("context", context)
    ids = np.arange(V**n)
    return np.stack([(ids // V ** (n - 1 - j)) % V for j in range(n)], axis=1).astype(np.int32)


def transition_table(model: NeuralNGram) -> np.ndarray:
    r"""$p_\theta(x \mid c)$ for every context $c$ of :func:`all_contexts`: ``float64[V**n, V]``."""
    ctx = jnp.asarray(all_contexts(model.vocab_size, model.context))
    logp = jax.nn.log_softmax(model.next_logits(ctx).astype(jnp.float32), axis=-1)
    p = np.exp(np.asarray(logp, np.float64))
    return p / p.sum(axis=1, keepdims=True)


def _check_table(table) -> tuple[np.ndarray, int]:
    table = np.asarray(table, np.float64)
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValueError(f"table must have shape (V**n, V), got {table.shape}")
    V, C = table.shape[1], table.shape[0]
    n = round(np.log(C) / np.log(V))
    if V**n != C:
        raise ValueError(f"table has {C} rows, not a power of V = {V}")
    return table, V


def context_step(dist, table) -> np.ndarray:
    r"""One generated symbol later: $d'(c_2 \dots c_n x) = \sum_{c_1} d(c_1 \dots c_n)\, T[c, x]$.

    ``dist`` ``float[V**n]`` is a distribution over the current window, ``table`` ``[V**n, V]``
    the chain's next-symbol probabilities; the result is the distribution of the next window.
    """
    table, V = _check_table(table)
    dist = np.asarray(dist, np.float64)
    if dist.shape != table.shape[:1]:
        raise ValueError(f"dist must have shape {table.shape[:1]}, got {dist.shape}")
    return (dist[:, None] * table).reshape(V, -1).sum(axis=0)


def stationary_contexts(table, *, tol: float = 1e-13, max_steps: int = 100_000) -> np.ndarray:
    r"""The long-run distribution of the window of a chain that draws from ``table``.

    Power iteration of :func:`context_step` from the uniform distribution, until two iterates
    differ by less than ``tol`` in total variation.
    """
    table, _ = _check_table(table)
    dist = np.full(table.shape[0], 1.0 / table.shape[0])
    for _ in range(max_steps):
        new = context_step(dist, table)
        if 0.5 * np.abs(new - dist).sum() < tol:
            return new
        dist = new
    raise RuntimeError(f"the context chain did not converge in {max_steps} steps")


def kl_rows(p, q) -> np.ndarray:
    r"""$\mathrm{KL}(p_c \,\|\, q_c) = \sum_x p_c(x) \ln \frac{p_c(x)}{q_c(x)}$ for every row $c$."""
    p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
    if p.shape != q.shape:
        raise ValueError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
    return terms.sum(axis=-1)
