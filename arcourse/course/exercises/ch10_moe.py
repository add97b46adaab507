"""Chapter 10 (mixture-of-experts): the top-k gate, the load-balancing loss, the router z-loss,
the capacity mask and the auxiliary-loss-free bias update.

Each grader compares with the reference on fixed and random cases; when the answer differs, it
also tries the classic mistakes of that exercise and names the one the answer matches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import moe
from arcourse.course.grading import Case, device_array, register


# The cases are built with NumPy: a case built with jax.numpy runs each of its operations
# eagerly, each compiled on its own for its shape, which is most of a check's time.
def _probs(rng, n, e, scale=2.0):
    z = rng.normal(size=(n, e)) * scale
    p = np.exp(z - z.max(-1, keepdims=True))
    return device_array(p / p.sum(-1, keepdims=True), jnp.float32)


def _top_k_experts(p, k):
    """The k experts of highest probability, largest first (ties: the lower index), as
    jax.lax.top_k orders them; NumPy in, int32 out."""
    return device_array(np.argsort(-np.asarray(p), axis=-1, kind="stable")[:, :k], jnp.int32)


# --------------------------------------------------------------------------------------------
# moe.top_k_gate
# --------------------------------------------------------------------------------------------
def top_k_gate(probs, k):
    """(weights (N, k), experts (N, k) int32): the k most probable experts in decreasing order,
    their probabilities renormalised to sum to 1."""
    return moe.top_k_gate(probs, k)


def _gate_cases(rng):
    uniform = device_array(np.full((3, 4), 0.25), jnp.float32)
    return [
        Case((_probs(rng, 5, 4), 1), label="k=1, 4 experts"),
        Case((_probs(rng, 6, 8), 2), label="k=2, 8 experts"),
        Case((_probs(rng, 7, 16, scale=4.0), 4), label="k=4, 16 experts"),
        Case((uniform, 2), label="ties (uniform probabilities): lower index first"),
        Case((_probs(rng, 3, 4), 4), label="k = E: every expert"),
    ]


def _gate_raw(probs, k):
    w, e = jax.lax.top_k(probs, k)
    return w, e.astype(jnp.int32)


def _gate_ascending(probs, k):
    e = jnp.argsort(probs, axis=-1)[:, :k].astype(jnp.int32)
    w = jnp.take_along_axis(probs, e, -1)
    return w / w.sum(-1, keepdims=True), e


def _gate_sorted_index(probs, k):
    w, e = moe.top_k_gate(probs, k)
    order = jnp.argsort(e, axis=-1)
    return jnp.take_along_axis(w, order, -1), jnp.take_along_axis(e, order, -1)


def _gate_resoftmax(probs, k):
    w, e = jax.lax.top_k(probs, k)
    return jax.nn.softmax(w, axis=-1), e.astype(jnp.int32)


GATE_MISTAKES = {
    "the weights are the raw probabilities: they are not renormalised over the k chosen":
        _gate_raw,
    "the k LEAST probable experts (argsort ascending without reversing)": _gate_ascending,
    "the experts are listed by index, not in decreasing order of probability":
        _gate_sorted_index,
    "a softmax of the chosen probabilities (they are already probabilities: divide by their "
    "sum)": _gate_resoftmax,
}

register(
    "moe.top_k_gate",
    title="The top-k gate",
    points=2,
    reference=top_k_gate,
    cases=_gate_cases,
    rtol=1e-5, atol=1e-6,
    wrong=GATE_MISTAKES,
    hint="jax.lax.top_k returns the k largest values and their indices, largest first; divide "
         "the values by their sum over the last axis (keepdims)",
)


# --------------------------------------------------------------------------------------------
# moe.load_balancing_loss
# --------------------------------------------------------------------------------------------
def _balanced_experts(n, e, k):
    t = np.arange(n)[:, None]
    return device_array((t * k + np.arange(k)[None]) % e, jnp.int32)


def _lb_cases(rng):
    e, n = 8, 32
    uniform = device_array(np.full((n, e), 1.0 / e), jnp.float32)
    collapsed = np.zeros((n, e), np.float32)
    collapsed[:, 0], collapsed[:, 1] = 0.9, 0.1
    collapsed = device_array(collapsed)
    cases = [
        Case((uniform, _balanced_experts(n, e, 1), 1.0), label="perfect balance, k=1"),
        Case((uniform, _balanced_experts(n, e, 2), 0.01), label="perfect balance, k=2, alpha=0.01"),
        Case((collapsed, device_array(np.tile([[0, 1]], (n, 1)), jnp.int32), 1.0),
             label="collapsed onto experts 0 and 1, k=2"),
    ]
    for k in (1, 2, 3):
        p = _probs(rng, 20, 6)
        cases.append(Case((p, _top_k_experts(p, k), 0.5), label=f"random routing, k={k}"))
    return cases


def _lb_with(probs, experts, alpha, *, per_assignment=False, times_e=True, f_from_probs=False,
             mean=False):
    n, e = probs.shape
    counts = jnp.zeros((e,)).at[experts.reshape(-1)].add(1.0)
    f = counts / (n * experts.shape[1] if per_assignment else n)
    if f_from_probs:
        f = probs.mean(0)
    terms = f * probs.mean(0)
    s = terms.mean() if mean else terms.sum()
    return alpha * (e if times_e else 1) * s


LB_MISTAKES = {
    "f_i divided by N*k (the fraction of assignments): balanced routing then gives alpha, not "
    "alpha*k": lambda p, x, a: _lb_with(p, x, a, per_assignment=True),
    "the factor E (the number of experts) is missing": lambda p, x, a: _lb_with(p, x, a,
                                                                                  times_e=False),
    "f_i taken from the probabilities (sum of P_i^2): f_i must count the tokens routed to i":
        lambda p, x, a: _lb_with(p, x, a, f_from_probs=True),
    "a mean over experts instead of the sum": lambda p, x, a: _lb_with(p, x, a, mean=True),
}

register(
    "moe.load_balancing_loss",
    title="The Switch load-balancing loss",
    points=3,
    reference=moe.load_balancing_loss,
    cases=_lb_cases,
    rtol=1e-5, atol=1e-6,
    wrong={**LB_MISTAKES, "forgets alpha": lambda p, x, a: _lb_with(p, x, 1.0)},
    hint="count how many tokens chose each expert (all k choices), divide by the number of "
         "TOKENS N; P_i is the mean of column i of probs; the loss is alpha * E * sum_i f_i P_i",
)


# --------------------------------------------------------------------------------------------
# moe.router_z_loss
# --------------------------------------------------------------------------------------------
def _z_cases(rng):
    return [
        Case((device_array(np.zeros((4, 8)), jnp.float32),), label="zero logits: (ln 8)^2"),
        Case((device_array(rng.normal(size=(10, 6)), jnp.float32),), label="random logits"),
        Case((device_array(rng.normal(size=(5, 4)) * 30 + 100, jnp.float32),),
             label="large logits (about 100): exp overflows float32 unless the max is subtracted"),
        Case((device_array(rng.normal(size=(5, 4)) * 30 - 200, jnp.float32),),
             label="very negative logits: exp underflows to 0 without the max subtracted"),
    ]


Z_MISTAKES = {
    "log(sum(exp(z))) without subtracting the maximum: it overflows (inf) or underflows "
    "(log 0) for large logits": lambda z: jnp.mean(jnp.log(jnp.sum(jnp.exp(z), -1)) ** 2),
    "the square of the mean instead of the mean of the squares":
        lambda z: jnp.mean(jax.nn.logsumexp(z, -1)) ** 2,
    "the mean of the squared logits (not of their log-sum-exp)": lambda z: jnp.mean(z ** 2),
    "a sum over tokens instead of the mean": lambda z: jnp.sum(jax.nn.logsumexp(z, -1) ** 2),
}

register(
    "moe.router_z_loss",
    title="The router z-loss",
    points=2,
    reference=moe.router_z_loss,
    cases=_z_cases,
    rtol=1e-4, atol=1e-5,
    wrong=Z_MISTAKES,
    hint="per token, the log-sum-exp of its logits computed stably (subtract the row's "
         "maximum first, or use jax.nn.logsumexp); square it; average over tokens",
)


# --------------------------------------------------------------------------------------------
# moe.capacity_positions (the capacity mask)
# --------------------------------------------------------------------------------------------
def _cap_cases(rng):
    return [
        Case((device_array([[0], [0], [1], [0], [1]], jnp.int32), 2, 2),
             label="k=1: the third token for expert 0 is dropped"),
        Case((device_array([[0, 1], [0, 2], [1, 0], [2, 0]], jnp.int32), 3, 2),
             label="k=2: first choices queue before second choices"),
        Case((device_array([[3, 1], [3, 0]], jnp.int32), 4, 1), label="capacity 1"),
        Case((device_array(rng.integers(0, 4, size=(12, 1)), jnp.int32), 4, 100),
             label="capacity larger than needed: nothing dropped"),
        Case((device_array(np.argsort(rng.random((16, 8)), axis=1)[:, :2], jnp.int32), 8, 3),
             label="random routing, 16 tokens, k=2, 8 experts, capacity 3"),
    ]


def _cap_with(experts, num_experts, capacity, *, token_major=False, inclusive=False,
              keep_le=False):
    order = experts.reshape(-1) if token_major else experts.T.reshape(-1)
    onehot = jax.nn.one_hot(order, num_experts, dtype=jnp.int32)
    c = jnp.cumsum(onehot, 0) - (0 if inclusive else onehot)
    pos = jnp.take_along_axis(c, order[:, None], 1)[:, 0]
    n, k = experts.shape
    pos = pos.reshape(n, k) if token_major else pos.reshape(k, n).T
    return pos.astype(jnp.int32), (pos <= capacity) if keep_le else (pos < capacity)


CAP_MISTAKES = {
    "token-major order (token 0's choices, then token 1's, ...): a second choice then "
    "displaces a later token's first choice":
        lambda e, n, c: _cap_with(e, n, c, token_major=True),
    "positions count from 1 (an inclusive cumulative sum): the first assignment must sit in "
    "slot 0": lambda e, n, c: _cap_with(e, n, c, inclusive=True),
    "keep = position <= capacity: that admits capacity + 1 assignments (slots 0..C-1 exist)":
        lambda e, n, c: _cap_with(e, n, c, keep_le=True),
}

register(
    "moe.capacity_positions",
    title="The capacity mask",
    points=3,
    reference=moe.capacity_positions,
    cases=_cap_cases,
    rtol=1e-5, atol=1e-6,
    wrong=CAP_MISTAKES,
    hint="lay the assignments out choice-major (experts.T flattened), one-hot them over the "
         "experts, and a cumulative sum down the assignments counts how many came before",
)


# --------------------------------------------------------------------------------------------
# moe.bias_update
# --------------------------------------------------------------------------------------------
def _bias_cases(rng):
    return [
        Case((device_array(np.zeros(4), jnp.float32), device_array([10, 2, 2, 2], jnp.int32), 0.01),
             label="one overloaded expert"),
        Case((device_array([0.1, -0.2, 0.0], jnp.float32), device_array([5, 5, 5], jnp.int32), 0.5),
             label="perfectly balanced: nothing moves"),
        Case((device_array([0.3, 0.0, -0.1, 0.2], jnp.float32), device_array([1, 3, 5, 3], jnp.int32),
              0.1), label="experts exactly at the mean load keep their bias"),
        Case((device_array(rng.normal(size=8), jnp.float32),
              device_array(rng.integers(0, 10**6, size=8), jnp.int32), 1e-3),
             label="large counts: the step is gamma, whatever the size of the imbalance"),
    ]


BIAS_MISTAKES = {
    "the sign is reversed: an overloaded expert becomes MORE attractive (collapse)":
        lambda b, c, g: b + g * jnp.sign(c - jnp.mean(c.astype(jnp.float32))),
    "a step proportional to the imbalance (gamma * (mean - c_i)) instead of its sign":
        lambda b, c, g: b + g * (jnp.mean(c.astype(jnp.float32)) - c),
    "the bias is replaced, not moved (b = gamma * sign(...))":
        lambda b, c, g: g * jnp.sign(jnp.mean(c.astype(jnp.float32)) - c),
    "compares each load with the median, not the mean":
        lambda b, c, g: b + g * jnp.sign(jnp.median(c.astype(jnp.float32)) - c),
}

register(
    "moe.bias_update",
    title="The auxiliary-loss-free bias update",
    points=2,
    reference=moe.bias_update,
    cases=_bias_cases,
    rtol=1e-5, atol=1e-6,
    wrong=BIAS_MISTAKES,
    hint="mean load minus each expert's load: positive for an underloaded expert, whose bias "
         "goes up by gamma; jnp.sign gives -1, 0 or +1",
)
