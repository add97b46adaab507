r"""Recurrent networks written out: the vanilla RNN, the LSTM and the GRU, and a character model.

Every cell reads one input vector $x_t$ (batch ``B``, width ``D``) and its carry, and returns the
new carry. The weights are kept as three arrays, the input kernel $W_x$ ``(D, G H)``, the
recurrent kernel $W_h$ ``(H, G H)`` and a bias $b$ ``(G H,)``, with the ``G`` gate blocks side by
side in the order given below (the order Flax uses, so the tests can compare on the same weights).

* vanilla RNN (Elman 1990), ``G = 1``:
  $h_t = \tanh(x_t W_x + h_{t-1} W_h + b)$
* LSTM (Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000), ``G = 4``,
  blocks $i, f, g, o$, carry $(c, h)$:
  $[a_i, a_f, a_g, a_o] = x_t W_x + h_{t-1} W_h + b$,
  $i = \sigma(a_i)$, $f = \sigma(a_f)$, $g = \tanh(a_g)$, $o = \sigma(a_o)$,
  $c_t = f \odot c_{t-1} + i \odot g$, $h_t = o \odot \tanh(c_t)$
* GRU (Cho et al. 2014), ``G = 3``, blocks $r, z, n$:
  $r = \sigma(x W^r_x + b^r + h W^r_h)$, $z = \sigma(x W^z_x + b^z + h W^z_h)$,
  $n = \tanh(x W^n_x + b^n + r \odot (h W^n_h))$, $h_t = (1 - z) \odot n + z \odot h_{t-1}$

The gated cells take ``keep_bias``, the initial bias of the gate that keeps the old state:
the LSTM's forget gate (default 1, Jozefowicz et al. 2015) and the GRU's update gate (default 0, as
in Flax and PyTorch; chapter 03 measures how much longer a bias of 1 keeps the gradient alive).

Each cell splits its work in two: :meth:`project` computes $x W_x + b$ (for a whole sequence at
once: one large matrix product) and :meth:`recur` does the sequential part. :class:`CharRNN`
unrolls a cell with ``jax.lax.scan`` (teacher forcing) and implements the course's decoding
interface (``init_state`` / ``prefill`` / ``step``), so ``arcourse.decoding.generate`` runs its
generation inside one compiled ``lax.scan`` that carries the hidden state: constant memory per
step, however long the text. :func:`sample_loop` is that loop written out (chapter 03).
"""

from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp
from flax import nnx

from arcourse._checks import check_int
from arcourse.decoding import sample_token

__all__ = [
    "rnn_step",
    "lstm_step",
    "gru_step",
    "RNNCell",
    "LSTMCell",
    "GRUCell",
    "CELLS",
    "CharRNN",
    "unroll",
    "python_unroll",
    "sample_loop",
    "input_gradient_norms",
    "state_jacobian_norms",
]


# --------------------------------------------------------------------------------------------
# The three steps as pure functions (the equations, nothing else)
# --------------------------------------------------------------------------------------------
def rnn_step(x, h, W_x, W_h, b):
    r"""One vanilla RNN step, $h' = \tanh(x W_x + h W_h + b)$.

    x (B, D), h (B, H), W_x (D, H), W_h (H, H), b (H,) -> h' (B, H).
    """
    return jnp.tanh(x @ W_x + h @ W_h + b)


def lstm_step(x, carry, W_x, W_h, b):
    r"""One LSTM step; ``carry = (c, h)``, gate blocks $i, f, g, o$ in that order.

    x (B, D), c and h (B, H), W_x (D, 4H), W_h (H, 4H), b (4H,) -> (c', h').
    """
    c, h = carry
    a_i, a_f, a_g, a_o = jnp.split(x @ W_x + h @ W_h + b, 4, axis=-1)
    c_new = jax.nn.sigmoid(a_f) * c + jax.nn.sigmoid(a_i) * jnp.tanh(a_g)
    h_new = jax.nn.sigmoid(a_o) * jnp.tanh(c_new)
    return c_new, h_new


def gru_step(x, h, W_x, W_h, b):
    r"""One GRU step, gate blocks $r, z, n$; the reset gate multiplies $h W^n_h$ only.

    x (B, D), h (B, H), W_x (D, 3H), W_h (H, 3H), b (3H,) -> h' (B, H).
    """
    x_r, x_z, x_n = jnp.split(x @ W_x + b, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ W_h, 3, axis=-1)
    r = jax.nn.sigmoid(x_r + h_r)
    z = jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return (1.0 - z) * n + z * h


# --------------------------------------------------------------------------------------------
# The cells as NNX modules
# --------------------------------------------------------------------------------------------
def _check_size(name, value, minimum=1):
    return check_int(name, value, minimum)


class _Cell(nnx.Module):
    """Shared parts: the weights ``W_x (D, G H)``, ``W_h (H, G H)``, ``b (G H,)``."""

    gates = 1
    keep_block = None  # the gate block whose bias keep_bias sets (None: no such gate)
    default_keep_bias = 0.0

    def __init__(self, in_features: int, hidden_size: int, *, rngs: nnx.Rngs,
                 keep_bias: float | None = None):
        _check_size("in_features", in_features)
        _check_size("hidden_size", hidden_size)
        if keep_bias is not None and self.keep_block is None:
            raise ValueError(f"{type(self).__name__} has no gate that keeps the state: keep_bias "
                             "applies to the LSTM (forget gate) and the GRU (update gate)")
        if keep_bias is not None and (isinstance(keep_bias, bool)
                                      or not isinstance(keep_bias, numbers.Real)):
            raise ValueError(f"keep_bias must be a number, got {keep_bias!r}")
        self.in_features = in_features
        self.hidden_size = hidden_size
        # not kept as an attribute: cells that differ only in it share one compiled program
        keep = float(self.default_keep_bias if keep_bias is None else keep_bias)
        G, H = self.gates, hidden_size
        self.W_x = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (in_features, G * H)))
        # One orthogonal (H, H) block per gate: the recurrent map starts norm-preserving.
        ortho = nnx.initializers.orthogonal()
        self.W_h = nnx.Param(jnp.concatenate([ortho(rngs.params(), (H, H)) for _ in range(G)], 1))
        self.b = nnx.Param(self._initial_bias(keep))

    def _initial_bias(self, keep_bias: float):
        H, b = self.hidden_size, jnp.zeros((self.gates * self.hidden_size,))
        if self.keep_block is None:
            return b
        return b.at[self.keep_block * H : (self.keep_block + 1) * H].set(keep_bias)

    def project(self, x):
        r"""The input part $x W_x + b$, for any leading shape: (..., D) -> (..., G H)."""
        return x @ self.W_x[...] + self.b[...]

    def project_tokens(self, tokens):
        r"""$x W_x + b$ for one-hot inputs: a row lookup, (...) int -> (..., G H)."""
        return self.W_x[...][tokens] + self.b[...]

    def init_carry(self, batch_size: int):
        return jnp.zeros((batch_size, self.hidden_size))

    @staticmethod
    def output(carry):
        """The hidden state $h$ that the next layer reads, from a carry."""
        return carry

    def __call__(self, carry, x):
        """One step on raw inputs, Flax's convention: ``(carry, x) -> (new_carry, h)``."""
        carry = self.recur(carry, self.project(x))
        return carry, self.output(carry)


class RNNCell(_Cell):
    r"""Vanilla (Elman) RNN cell: $h' = \tanh(x W_x + h W_h + b)$."""

    gates = 1

    def recur(self, h, xp):
        return jnp.tanh(xp + h @ self.W_h[...])


class LSTMCell(_Cell):
    r"""LSTM cell, carry $(c, h)$; the forget-gate bias starts at ``keep_bias`` = 1 by default
    (Jozefowicz et al. 2015), so an untrained cell keeps about $\sigma(1) = 0.73$ of its memory."""

    gates = 4
    keep_block = 1  # i, f, g, o: the forget gate
    default_keep_bias = 1.0

    def init_carry(self, batch_size: int):
        z = jnp.zeros((batch_size, self.hidden_size))
        return (z, z)

    @staticmethod
    def output(carry):
        return carry[1]

    def recur(self, carry, xp):
        c, h = carry
        a_i, a_f, a_g, a_o = jnp.split(xp + h @ self.W_h[...], 4, axis=-1)
        c = jax.nn.sigmoid(a_f) * c + jax.nn.sigmoid(a_i) * jnp.tanh(a_g)
        return c, jax.nn.sigmoid(a_o) * jnp.tanh(c)


class GRUCell(_Cell):
    r"""GRU cell: reset gate $r$, update gate $z$, candidate $n$ (Flax's variant; cuDNN's and
    PyTorch's also add a hidden-side bias inside the reset: $r \odot (h W^n_h + b^n_h)$).

    The update-gate bias starts at ``keep_bias`` (default 0, so $z \approx 0.5$ and the state is
    half replaced at every step; 1 gives $z \approx 0.73$, the LSTM's forget gate at its start)."""

    gates = 3
    keep_block = 1  # r, z, n: the update gate

    def recur(self, h, xp):
        x_r, x_z, x_n = jnp.split(xp, 3, axis=-1)
        h_r, h_z, h_n = jnp.split(h @ self.W_h[...], 3, axis=-1)
        r = jax.nn.sigmoid(x_r + h_r)
        z = jax.nn.sigmoid(x_z + h_z)
        n = jnp.tanh(x_n + r * h_n)
        return (1.0 - z) * n + z * h


CELLS = {"rnn": RNNCell, "lstm": LSTMCell, "gru": GRUCell}


# --------------------------------------------------------------------------------------------
# Unrolling in time
# --------------------------------------------------------------------------------------------
def unroll(cell: _Cell, carry, xp):
    r"""Run ``cell.recur`` over time with ``lax.scan``: one compiled loop body, reused $T$ times.

    ``xp`` holds the projected inputs, (B, T, G H). Returns (final carry, hidden states (B, T, H)).
    """
    def body(carry, xp_t):
        carry = cell.recur(carry, xp_t)
        return carry, cell.output(carry)

    carry, hs = jax.lax.scan(body, carry, jnp.swapaxes(xp, 0, 1))
    return carry, jnp.swapaxes(hs, 0, 1)


def python_unroll(cell: _Cell, carry, xp):
    """The same as :func:`unroll` with a Python loop (for tests and for the text: slow to compile)."""
    hs = []
    for t in range(xp.shape[1]):
        carry = cell.recur(carry, xp[:, t])
        hs.append(cell.output(carry))
    return carry, jnp.stack(hs, axis=1)


# --------------------------------------------------------------------------------------------
# The character-level model
# --------------------------------------------------------------------------------------------
class CharRNN(nnx.Module):
    r"""A recurrent language model: embed, recur, read out logits.

    $p(x_{t+1} \mid x_{\le t}) = \mathrm{softmax}(h_t W_o + b_o)$ where $h_t$ is the cell's state
    after reading $x_1 \dots x_t$. With ``embed_size=None`` the input is one-hot, so $x W_x$ is
    just row $x$ of $W_x$ (no separate embedding table). ``keep_bias`` goes to a gated cell (see
    the module docstring); ``None`` keeps the cell's default.
    """

    def __init__(self, vocab_size: int, hidden_size: int, *, cell: str = "lstm",
                 embed_size: int | None = None, keep_bias: float | None = None, rngs: nnx.Rngs):
        _check_size("vocab_size", vocab_size, 2)
        _check_size("hidden_size", hidden_size)
        if cell not in CELLS:
            raise ValueError(f"cell must be one of {sorted(CELLS)}, got {cell!r}")
        if embed_size is not None:
            _check_size("embed_size", embed_size)
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.cell_type = cell
        self.embed = (nnx.Embed(vocab_size, embed_size, rngs=rngs)
                      if embed_size is not None else None)
        extra = {} if keep_bias is None else {"keep_bias": keep_bias}
        self.cell = CELLS[cell](embed_size or vocab_size, hidden_size, rngs=rngs, **extra)
        self.out = nnx.Linear(hidden_size, vocab_size, rngs=rngs)

    # ------------------------------------------------ the decoding interface (arcourse.decoding)
    def init_state(self, batch_size: int, max_len: int | None = None):
        """The zero carry for ``batch_size`` sequences. Its size does not depend on ``max_len``:
        a recurrent model remembers the past in a fixed-size state, however long the text."""
        return self.cell.init_carry(_check_size("batch_size", batch_size))

    def prefill(self, state, prompt):
        """Read ``prompt`` int32[B, P] from ``state``: (logits [B, V] of the next token, carry).
        The input projection of the whole prompt is one matrix product; the recurrence scans."""
        logits, carry = self.scan(prompt, state)
        return logits[:, -1], carry

    def _project(self, tokens):
        if self.embed is None:
            return self.cell.project_tokens(tokens)
        return self.cell.project(self.embed(tokens))

    def step(self, state, tokens):
        """Read one token per sequence: ``tokens`` int32[B] -> (logits float32[B, V], new state).
        The state is the cell's carry."""
        state = self.cell.recur(state, self._project(tokens))
        return self.out(self.cell.output(state)), state

    def scan(self, tokens, carry=None):
        """Teacher forcing from ``carry`` (zero by default): int32[B, T] -> (logits [B, T, V], carry)."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, time), got {tokens.shape}")
        if carry is None:
            carry = self.init_state(tokens.shape[0])
        carry, hs = unroll(self.cell, carry, self._project(tokens))
        return self.out(hs), carry

    def __call__(self, tokens):
        """Logits for every position, int32[B, T] -> float32[B, T, V]; position t predicts t+1."""
        return self.scan(tokens)[0]


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def sample_loop(step_fn, carry, logits, keys, temperature=1.0):
    r"""The generation loop: draw, feed back, carry the state; one ``lax.scan`` over ``keys``.

    ``step_fn(carry, tokens int32[B]) -> (logits [B, V], new carry)`` is the model's one-step
    function, ``carry`` its state after the prompt and ``logits`` [B, V] its prediction of the
    first new token. Step $t$ draws $x_t \sim \mathrm{softmax}(z_t / \tau)$ with ``keys[t]``
    (``temperature=0``: the argmax) and feeds it back. Returns int32[B, len(keys)].
    """
    temperature = jnp.asarray(temperature, jnp.float32)

    def body(state, key_t):
        carry, logits = state
        tok = sample_token(key_t, logits, temperature)
        logits, carry = step_fn(carry, tok)
        return (carry, logits), tok

    _, toks = jax.lax.scan(body, (carry, logits), keys)
    return toks.T


# --------------------------------------------------------------------------------------------
# Vanishing and exploding gradients
# --------------------------------------------------------------------------------------------
def input_gradient_norms(cell: _Cell, xp, key=None):
    r"""$\| \partial (u \cdot h_T) / \partial x_{T-k} \|$ for $k = 0 \dots T-1$, averaged over the batch.

    ``xp`` are the projected inputs (B, T, G H) (so the gradient is with respect to what enters the
    recurrence at each step) and $u$ a fixed random unit direction. Entry ``k`` of the result says
    how strongly an input ``k`` steps back can still move the final state: backpropagation through
    time multiplies one Jacobian $\partial h_t / \partial h_{t-1}$ per step, and for a vanilla RNN
    that product shrinks (or grows) geometrically. Compiled once per kind and size of cell.
    """
    return _input_gradient_norms(cell, xp, jax.random.key(0) if key is None else key)


@nnx.jit
def _input_gradient_norms(cell: _Cell, xp, key):
    B = xp.shape[0]
    u = jax.random.normal(key, (cell.hidden_size,))
    u = u / jnp.linalg.norm(u)

    def final(xp):
        carry, _ = unroll(cell, cell.init_carry(B), xp)
        return jnp.sum(cell.output(carry) @ u)

    g = jax.grad(final)(xp)  # (B, T, G H)
    norms = jnp.linalg.norm(g, axis=-1).mean(0)  # (T,)
    return norms[::-1]


def state_jacobian_norms(step, h0, xs):
    r"""$\| \partial h_T / \partial h_{T-k} \|_2$ (spectral norm) for $k = 0 \dots T$, batch of one.

    ``step(h, x) -> h'`` is one step of a cell whose carry is a single array ``h`` (H,), ``h0`` the
    state before the first input and ``xs`` (T, D) the inputs. The states are
    $h_t = \text{step}(h_{t-1}, x_t)$; by the chain rule
    $\partial h_T / \partial h_{T-k} = J_T J_{T-1} \cdots J_{T-k+1}$ with
    $J_t = \partial h_t / \partial h_{t-1}$ (the identity for $k = 0$). Returns float32[T + 1].
    """
    def body(h, x):
        h_new = step(h, x)
        return h_new, jax.jacobian(step)(h, x)

    _, jacs = jax.lax.scan(body, h0, xs)  # jacs[t] = d h_{t+1} / d h_t
    eye = jnp.eye(h0.shape[-1], dtype=jacs.dtype)

    def back(prod, J):  # walk from the last step backwards: prod = J_T ... J_t
        prod = prod @ J
        return prod, jnp.linalg.norm(prod, ord=2)

    _, norms = jax.lax.scan(back, eye, jacs[::-1])
    return jnp.concatenate([jnp.ones((1,), norms.dtype), norms])
