"""Chapter 03 (RNNs, LSTMs and GRUs): the graded exercises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import rnn
from arcourse.course.grading import Case, register


def _f32(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def _cell_cases(gates: int, lstm: bool = False):
    """Inputs (x, carry, W_x, W_h, b) of different sizes, with D != H so a swapped kernel shows."""

    def cases(rng):
        out = []
        for B, D, H, label in ((1, 3, 2, "one sequence"), (4, 5, 3, "a batch of 4"),
                               (2, 2, 6, "a wide state")):
            x = _f32(rng, B, D)
            h = _f32(rng, B, H, scale=0.8)
            carry = (_f32(rng, B, H), h) if lstm else h
            W_x = _f32(rng, D, gates * H, scale=0.7)
            W_h = _f32(rng, H, gates * H, scale=0.7)
            b = _f32(rng, gates * H, scale=0.5)
            out.append(Case((x, carry, W_x, W_h, b), label=f"{label} (B={B}, D={D}, H={H})"))
        return out

    return cases


# --------------------------------------------------------------------------------------------
register(
    "rnns.rnn_step", title="One step of a vanilla RNN", points=1,
    reference=rnn.rnn_step, cases=_cell_cases(1), rtol=1e-4, atol=1e-5,
    wrong={
        "forgets the tanh": lambda x, h, W_x, W_h, b: x @ W_x + h @ W_h + b,
        "ignores the previous state": lambda x, h, W_x, W_h, b: jnp.tanh(x @ W_x + b),
    },
    hint="h' = tanh(x W_x + h W_h + b): both the input and the previous state enter the tanh.",
)


# --------------------------------------------------------------------------------------------
def _lstm_no_tanh_on_cell(x, carry, W_x, W_h, b):
    c, h = carry
    i, f, g, o = jnp.split(x @ W_x + h @ W_h + b, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * c


def _lstm_swapped_gates(x, carry, W_x, W_h, b):
    c, h = carry
    f, i, g, o = jnp.split(x @ W_x + h @ W_h + b, 4, axis=-1)  # i and f swapped
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * jnp.tanh(c)


register(
    "rnns.lstm_step", title="One step of an LSTM", points=2,
    reference=rnn.lstm_step, cases=_cell_cases(4, lstm=True), rtol=1e-4, atol=1e-5,
    wrong={
        "h' = o * c' (no tanh on the cell state)": _lstm_no_tanh_on_cell,
        "gate blocks in the order f, i, g, o": _lstm_swapped_gates,
    },
    hint="blocks i, f, g, o in that order; c' = f*c + i*g; h' = o * tanh(c').",
)


# --------------------------------------------------------------------------------------------
def _gru_swapped_update(x, h, W_x, W_h, b):
    x_r, x_z, x_n = jnp.split(x @ W_x + b, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ W_h, 3, axis=-1)
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return z * n + (1 - z) * h


def _gru_reset_outside(x, h, W_x, W_h, b):
    x_r, x_z, x_n = jnp.split(x @ W_x + b, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ W_h, 3, axis=-1)
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    n = r * jnp.tanh(x_n + h_n)
    return (1 - z) * n + z * h


register(
    "rnns.gru_step", title="One step of a GRU", points=2,
    reference=rnn.gru_step, cases=_cell_cases(3), rtol=1e-4, atol=1e-5,
    wrong={
        "z and 1 - z swapped (z weights the candidate)": _gru_swapped_update,
        "reset gate outside the tanh": _gru_reset_outside,
    },
    hint="z is the weight of the OLD state: h' = (1 - z) * n + z * h; r multiplies h W_h^n "
         "inside the tanh.",
)


# --------------------------------------------------------------------------------------------
def _toy_step_fn(seed: int, V: int, H: int):
    """A small random vanilla-RNN language model, as a pure step function."""
    rng = np.random.default_rng(seed)
    W_x, W_h = _f32(rng, V, H, scale=1.5), _f32(rng, H, H, scale=1.2)
    b, W_o = _f32(rng, H, scale=0.3), _f32(rng, H, V, scale=2.0)

    def step_fn(h, tokens):
        h = rnn.rnn_step(jax.nn.one_hot(tokens, V), h, W_x, W_h, b)
        return h @ W_o, h

    step_fn.__name__ = f"step_fn(V={V}, H={H})"
    return step_fn


def _sampling_cases(rng):
    out = []
    for seed, (B, V, H, T) in enumerate(((1, 5, 4, 8), (3, 7, 6, 12))):
        step_fn = _toy_step_fn(seed, V, H)
        h0 = _f32(rng, B, H, scale=0.5)
        logits0 = _f32(rng, B, V, scale=2.0)
        keys = jax.random.split(jax.random.key(100 + seed), T)
        out.append(Case((step_fn, h0, logits0, keys), label=f"B={B}, V={V}, {T} tokens"))
    return out


def _sample_loop_reference(step_fn, carry, logits, keys):
    return rnn.sample_loop(step_fn, carry, logits, keys)


def _restarts_state(step_fn, carry, logits, keys):
    def body(state, key):
        c0, logits = state
        tok = jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
        logits, _ = step_fn(carry, tok)  # the new state is dropped: every step starts afresh
        return (c0, logits), tok

    return jax.lax.scan(body, (carry, logits), keys)[1].T


def _greedy(step_fn, carry, logits, keys):
    def body(state, key):
        carry, logits = state
        tok = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        logits, carry = step_fn(carry, tok)
        return (carry, logits), tok

    return jax.lax.scan(body, (carry, logits), keys)[1].T


def _time_major(step_fn, carry, logits, keys):
    return _sample_loop_reference(step_fn, carry, logits, keys).T


register(
    "rnns.sample_loop", title="Generation that carries the state", points=2,
    reference=_sample_loop_reference, cases=_sampling_cases, timeout=180.0,
    wrong={
        "drops the new state (every step restarts from the prompt's state)": _restarts_state,
        "takes the argmax instead of sampling": _greedy,
        "returns time-major tokens [T, B]": _time_major,
    },
    hint="inside lax.scan: tok = jax.random.categorical(keys[t], logits); logits, carry = "
         "step_fn(carry, tok); return the tokens as [B, T].",
)
