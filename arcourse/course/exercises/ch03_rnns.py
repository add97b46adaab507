"""Chapter 03 (RNNs, LSTMs and GRUs): the graded exercises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import rnn
from arcourse.course.grading import Case, register
from arcourse.course.grading import normal_array as _f32


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
        "a sigmoid instead of the tanh": lambda x, h, W_x, W_h, b: jax.nn.sigmoid(x @ W_x + h @ W_h + b),
        "adds the bias after the tanh": lambda x, h, W_x, W_h, b: jnp.tanh(x @ W_x + h @ W_h) + b,
        "multiplies by W_h transposed": lambda x, h, W_x, W_h, b: jnp.tanh(x @ W_x + h @ W_h.T + b),
    },
    hint="Three terms are added inside one squashing function: the input times its kernel, the "
         "previous state times the recurrent kernel (rows of W_h are indexed by the old state's "
         "units), and the bias. Nothing is added outside it.",
)


# --------------------------------------------------------------------------------------------
def _lstm_no_tanh_on_cell(x, carry, W_x, W_h, b):
    c, h = carry
    i, f, g, o = jnp.split(x @ W_x + h @ W_h + b, 4, axis=-1)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * c


def _lstm_forget_plus_one(x, carry, W_x, W_h, b):
    c, h = carry
    i, f, g, o = jnp.split(x @ W_x + h @ W_h + b, 4, axis=-1)
    c = jax.nn.sigmoid(f + 1.0) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c, jax.nn.sigmoid(o) * jnp.tanh(c)


def _lstm_returns_h_c(x, carry, W_x, W_h, b):
    c, h = rnn.lstm_step(x, carry, W_x, W_h, b)
    return h, c


def _lstm_old_cell_out(x, carry, W_x, W_h, b):
    c, h = carry
    i, f, g, o = jnp.split(x @ W_x + h @ W_h + b, 4, axis=-1)
    c_new = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return c_new, jax.nn.sigmoid(o) * jnp.tanh(c)


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
        "adds 1 to the forget gate inside the step (the 1 belongs in the initial bias b)":
            _lstm_forget_plus_one,
        "returns (h', c') instead of (c', h')": _lstm_returns_h_c,
        "h' reads the old cell c instead of the new c'": _lstm_old_cell_out,
    },
    hint="One affine map gives all four pre-activations; cut it into four equal blocks, in the "
         "order input, forget, candidate, output. Three blocks go through the logistic function, "
         "the candidate through tanh. The new cell is the kept part of the old cell plus the "
         "admitted part of the candidate; the new h is the output gate times tanh of the NEW "
         "cell. Return the cell first.",
)


# --------------------------------------------------------------------------------------------
def _gru_swapped_update(x, h, W_x, W_h, b):
    x_r, x_z, x_n = jnp.split(x @ W_x + b, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ W_h, 3, axis=-1)
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return z * n + (1 - z) * h


def _gru_cho_variant(x, h, W_x, W_h, b):
    H = h.shape[-1]
    x_r, x_z, x_n = jnp.split(x @ W_x + b, 3, axis=-1)
    h_r, h_z, _ = jnp.split(h @ W_h, 3, axis=-1)
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + (r * h) @ W_h[:, 2 * H:])
    return (1 - z) * n + z * h


def _gru_bias_inside_reset(x, h, W_x, W_h, b):
    x_r, x_z, x_n = jnp.split(x @ W_x, 3, axis=-1)
    h_r, h_z, h_n = jnp.split(h @ W_h + b, 3, axis=-1)
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


def _gru_keras_order(x, h, W_x, W_h, b):
    x_z, x_r, x_n = jnp.split(x @ W_x + b, 3, axis=-1)
    h_z, h_r, h_n = jnp.split(h @ W_h, 3, axis=-1)
    r, z = jax.nn.sigmoid(x_r + h_r), jax.nn.sigmoid(x_z + h_z)
    n = jnp.tanh(x_n + r * h_n)
    return (1 - z) * n + z * h


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
        "r multiplies h before the product, (r * h) W_h^n (Cho et al.'s variant, not this one)":
            _gru_cho_variant,
        "the bias b^n inside the reset gate's product (cuDNN's hidden-side bias)":
            _gru_bias_inside_reset,
        "gate blocks in the order z, r, n (Keras's order)": _gru_keras_order,
    },
    hint="Cut the input part (with its bias) and the recurrent part into three blocks each, in "
         "the order reset, update, candidate. The two gates add their input and recurrent blocks "
         "before the logistic function. For the candidate, the reset gate scales only the "
         "recurrent block (after the product with the kernel), and the bias stays on the input "
         "side. The update gate z is the weight of the OLD state, 1 - z that of the candidate.",
)


# --------------------------------------------------------------------------------------------
# A gradient through time: ||dh_T / dh_{T-k}||
# --------------------------------------------------------------------------------------------
@jax.tree_util.register_pytree_node_class
class _CellStep:
    """``step(h, x) -> h'`` of one cell with fixed weights, for a single sequence. A pytree whose
    leaves are the weights: the check compiles one program per kind and size of cell, not one per
    case (two cases of the same shape share it)."""

    def __init__(self, cell_step, weights, name):
        self.cell_step, self.weights, self.__name__ = cell_step, tuple(weights), name

    def __call__(self, h, x):
        return self.cell_step(x[None], h[None], *self.weights)[0]

    def tree_flatten(self):
        return self.weights, (self.cell_step, self.__name__)

    @classmethod
    def tree_unflatten(cls, aux, weights):
        return cls(aux[0], weights, aux[1])


def _rnn_cell_step(rng, D, H, scale):
    W_x, W_h, b = _f32(rng, D, H, scale=0.8), _f32(rng, H, H, scale=scale), _f32(rng, H, scale=0.3)
    return _CellStep(rnn.rnn_step, (W_x, W_h, b), f"vanilla_rnn_step(H={H}, D={D})")


def _gru_cell_step(rng, D, H):
    W_x, W_h, b = (_f32(rng, D, 3 * H, scale=0.8), _f32(rng, H, 3 * H, scale=0.9),
                   _f32(rng, 3 * H, scale=0.3))
    return _CellStep(rnn.gru_step, (W_x, W_h, b), f"gru_step(H={H}, D={D})")


def _jacobian_cases(rng):
    out = []
    for label, make, H, D, T in (
            # few distinct shapes: JAX compiles each operation once per shape, so a check that
            # runs op by op stays well under a second or two
            ("a vanilla RNN whose norms grow", lambda: _rnn_cell_step(rng, 2, 3, 0.7), 3, 2, 4),
            ("a GRU", lambda: _gru_cell_step(rng, 2, 3), 3, 2, 4),
            ("a vanilla RNN with a large W_h that saturates", lambda: _rnn_cell_step(rng, 2, 3, 1.6),
             3, 2, 4),
            ("a one-unit state, one step", lambda: _rnn_cell_step(rng, 2, 1, 0.9), 1, 2, 1)):
        step = make()
        h0, xs = _f32(rng, H, scale=0.5), _f32(rng, T, D)
        out.append(Case((step, h0, xs), label=f"{label} (H={H}, T={T})"))
    return out


def _trajectory_jacobians(step, h0, xs):
    hs, h = [h0], h0
    for x in xs:
        h = step(h, x)
        hs.append(h)
    return [jax.jacobian(step)(hs[t], xs[t]) for t in range(len(xs))]  # J_{t+1} = dh_{t+1}/dh_t


def _norms_from(products, norm):
    return jnp.asarray([norm(P) for P in products], jnp.float32)


def _spectral(P):
    return jnp.linalg.norm(P, ord=2)


def _jac_frobenius(step, h0, xs):
    Js, P, prods = _trajectory_jacobians(step, h0, xs), jnp.eye(h0.shape[0]), []
    prods.append(P)
    for J in Js[::-1]:
        P = P @ J
        prods.append(P)
    return _norms_from(prods, jnp.linalg.norm)


def _jac_reversed_order(step, h0, xs):
    Js, P, prods = _trajectory_jacobians(step, h0, xs), jnp.eye(h0.shape[0]), []
    prods.append(P)
    for J in Js[::-1]:
        P = J @ P
        prods.append(P)
    return _norms_from(prods, _spectral)


def _jac_from_the_start(step, h0, xs):
    Js, P, prods = _trajectory_jacobians(step, h0, xs), jnp.eye(h0.shape[0]), []
    prods.append(P)
    for J in Js:
        P = J @ P
        prods.append(P)  # dh_k / dh_0 instead of dh_T / dh_{T-k}
    return _norms_from(prods, _spectral)


def _jac_at_h0(step, h0, xs):
    Js, P, prods = [jax.jacobian(step)(h0, x) for x in xs], jnp.eye(h0.shape[0]), []
    prods.append(P)
    for J in Js[::-1]:
        P = P @ J
        prods.append(P)
    return _norms_from(prods, _spectral)


def _jac_product_of_norms(step, h0, xs):
    each = [float(_spectral(J)) for J in _trajectory_jacobians(step, h0, xs)][::-1]
    return jnp.asarray(np.concatenate([[1.0], np.cumprod(each)]), jnp.float32)


def _jacobian_norms_reference(step, h0, xs):
    """rnn.state_jacobian_norms with Python loops: the same numbers (tests/test_rnn.py), and at
    these tiny sizes no scan to compile for every case, so a check takes a fraction of a second."""
    Js, P, prods = _trajectory_jacobians(step, h0, xs), jnp.eye(h0.shape[0]), []
    prods.append(P)
    for J in Js[::-1]:
        P = P @ J
        prods.append(P)
    return jnp.linalg.norm(jnp.stack(prods), ord=2, axis=(1, 2)).astype(jnp.float32)


def _jac_no_identity(step, h0, xs):
    return _jacobian_norms_reference(step, h0, xs)[1:]


register(
    "rnns.jacobian_norms", title="A gradient through time", points=3,
    reference=_jacobian_norms_reference, cases=_jacobian_cases, rtol=1e-4, atol=1e-6,
    wrong={
        "the Frobenius norm instead of the spectral norm": _jac_frobenius,
        "the product in the wrong order (J_{T-k+1} ... J_T)": _jac_reversed_order,
        "measured from the start, ||dh_k / dh_0||, instead of back from the end":
            _jac_from_the_start,
        "every Jacobian taken at h0 instead of along the trajectory": _jac_at_h0,
        "the product of the one-step norms (an upper bound, not the norm of the product)":
            _jac_product_of_norms,
        "leaves out k = 0 (T entries instead of T + 1)": _jac_no_identity,
    },
    hint="Run the steps once and keep every state h_0 ... h_T. The one-step Jacobian J_t is the "
         "derivative of step with respect to its first argument, evaluated at (h_{t-1}, the t-th "
         "input). Start from the H x H identity (that is k = 0) and walk backwards from t = T, "
         "multiplying the running product on the RIGHT by J_t, so that after k steps it is "
         "J_T J_{T-1} ... J_{T-k+1}. After each multiplication record the largest singular "
         "value of the product, not the Frobenius norm, and not the product of the single-step "
         "norms (that is only an upper bound).",
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


def _probabilities_to_categorical(step_fn, carry, logits, keys):
    def body(state, key):
        carry, logits = state
        tok = jax.random.categorical(key, jax.nn.softmax(logits), axis=-1).astype(jnp.int32)
        logits, carry = step_fn(carry, tok)
        return (carry, logits), tok

    return jax.lax.scan(body, (carry, logits), keys)[1].T


def _one_key(step_fn, carry, logits, keys):
    return _sample_loop_reference(step_fn, carry, logits, jnp.stack([keys[0]] * len(keys)))


register(
    "rnns.sample_loop", title="Generation that carries the state", points=2,
    reference=_sample_loop_reference, cases=_sampling_cases, timeout=180.0,
    wrong={
        "drops the new state (every step restarts from the prompt's state)": _restarts_state,
        "takes the argmax instead of sampling": _greedy,
        "returns time-major tokens [T, B]": _time_major,
        "passes probabilities to jax.random.categorical (it wants logits)":
            _probabilities_to_categorical,
        "uses the first key at every step": _one_key,
    },
    hint="The scan's carry holds two things: the model's state and the logits of the next token. "
         "Each iteration receives its own key, draws one token per row from the logits (no "
         "softmax first: the sampler takes logits), calls step_fn with the state and that token, "
         "and carries the NEW state and logits on; it also emits the token. The scan stacks the "
         "emitted tokens with time first: transpose to [B, T] at the end.",
)
