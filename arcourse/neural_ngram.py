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
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from arcourse._checks import check_int

__all__ = ["NeuralNGram", "context_windows", "sample"]


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
