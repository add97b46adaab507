"""Chapter 11 (Mamba): the zero-order-hold discretisation, one step of the selective SSM, the
associative combine operator of the parallel scan, and SSD's segment-sum mask.

Each grader compares with the reference on fixed and random cases, edge cases included; when the
answer differs, it also tries the classic mistakes of that exercise and names the one it matches.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from arcourse import mamba
from arcourse.course.grading import Case, device_array, register
from arcourse.course.grading import normal_array as _f32


def _neg(rng, *shape, low=0.1, high=10.0):
    return device_array(-rng.uniform(low, high, size=shape))


def _pos(rng, *shape, low=0.001, high=1.0):
    return device_array(rng.uniform(low, high, size=shape))


# --------------------------------------------------------------------------------------------
# mamba.discretize_zoh
# --------------------------------------------------------------------------------------------
def _zoh_cases(rng):
    return [
        Case((device_array([-1.0, -2.0, -3.0]), device_array([1.0, 1.0, 1.0]), device_array(0.5)),
             label="A = -(1, 2, 3), B = 1, delta = 0.5"),
        Case((_neg(rng, 4, 8), _f32(rng, 4, 8), _pos(rng, 4)), label="4 channels, N = 8"),
        Case((_neg(rng, 3, 5, low=100.0, high=1000.0), _f32(rng, 3, 5), _pos(rng, 3, low=0.5,
                                                                                 high=2.0)),
             label="fast decay (|delta A| up to 2000): A_bar underflows to 0"),
        Case((_neg(rng, 2, 6, low=1e-6, high=1e-5), _f32(rng, 2, 6), _pos(rng, 2, low=0.05,
                                                                               high=0.2)),
             label="slow decay (|delta A| ~ 1e-7): exp(x) - 1 would lose its digits"),
    ]


ZOH_MISTAKES = {
    "Euler (first order) for both: A_bar = 1 + delta A, B_bar = delta B":
        lambda A, B, d: (1.0 + d[..., None] * A, d[..., None] * B * jnp.ones_like(A)),
    "B_bar = delta B, Mamba's simplification, not the exact zero-order hold":
        lambda A, B, d: (jnp.exp(d[..., None] * A), d[..., None] * B * jnp.ones_like(A)),
    "B_bar = (exp(delta A) - 1) B, without dividing by A":
        lambda A, B, d: (jnp.exp(d[..., None] * A), jnp.expm1(d[..., None] * A) * B),
    "B_bar = (exp(delta A) - 1) / A * delta B: delta counted twice":
        lambda A, B, d: (jnp.exp(d[..., None] * A), jnp.expm1(d[..., None] * A) / A * B
                         * d[..., None]),
    "exp(delta A) - 1 computed literally (use jnp.expm1: for tiny delta A the subtraction "
    "cancels almost every digit)":
        lambda A, B, d: (jnp.exp(d[..., None] * A), (jnp.exp(d[..., None] * A) - 1.0) / A * B),
}

register(
    "mamba.discretize_zoh",
    title="Zero-order-hold discretisation of a diagonal SSM",
    points=2,
    reference=mamba.discretize_zoh,
    cases=_zoh_cases,
    rtol=1e-5, atol=1e-6,
    wrong=ZOH_MISTAKES,
    hint="A_bar = exp(delta A) elementwise; B_bar = (A_bar - 1) / A * B, with the step delta "
         "broadcast over the last (state) axis; compute exp(x) - 1 with jnp.expm1",
)


# --------------------------------------------------------------------------------------------
# mamba.selective_step
# --------------------------------------------------------------------------------------------
def _step_case(rng, lead, D, N, label, scale=1.0):
    return Case((_f32(rng, *lead, D, N), _f32(rng, *lead, D, scale=scale), _pos(rng, *lead, D),
                 _neg(rng, D, N, low=0.5, high=float(N)), _f32(rng, *lead, N),
                 _f32(rng, *lead, N)), label=label)


def _step_cases(rng):
    return [
        _step_case(rng, (), 1, 1, "D = N = 1, no batch"),
        _step_case(rng, (), 6, 4, "D = 6, N = 4, no batch"),
        _step_case(rng, (3,), 5, 8, "batch of 3, D = 5, N = 8"),
        _step_case(rng, (2, 2), 4, 3, "two batch axes (2, 2), D = 4, N = 3", scale=100.0),
    ]


def _step_with(h, u, delta, A, B, C, *, old_h=False, no_delta=False, swap=False):
    if swap:
        B, C = C, B
    drive = u if no_delta else delta * u
    h_new = jnp.exp(delta[..., None] * A) * h + drive[..., None] * B[..., None, :]
    read = h if old_h else h_new
    return h_new, jnp.einsum("...dn,...n->...d", read, C)


STEP_MISTAKES = {
    "y read from the old state h instead of the new one h'":
        lambda *a: _step_with(*a, old_h=True),
    "the input is not scaled by delta: h' = exp(delta A) h + u B":
        lambda *a: _step_with(*a, no_delta=True),
    "B and C swapped: B writes into the state, C reads it out":
        lambda *a: _step_with(*a, swap=True),
    "no discretisation of A: h' = A h + delta u B":
        lambda h, u, delta, A, B, C: (
            A * h + (delta * u)[..., None] * B[..., None, :],
            jnp.einsum("...dn,...n->...d", A * h + (delta * u)[..., None] * B[..., None, :], C)),
}

register(
    "mamba.selective_step",
    title="One step of the selective SSM",
    points=3,
    reference=mamba.selective_step,
    cases=_step_cases,
    rtol=1e-5, atol=1e-5,
    wrong=STEP_MISTAKES,
    hint="exp(delta[..., None] * A) has the state's shape (..., D, N); the input term is "
         "(delta * u)[..., None] times B[..., None, :]; y sums h' * C[..., None, :] over N",
)


# --------------------------------------------------------------------------------------------
# mamba.combine
# --------------------------------------------------------------------------------------------
def _combine_cases(rng):
    def pair(*shape, low=0.0, high=1.0, scale=1.0):
        a = device_array(rng.uniform(low, high, size=shape))
        return a, _f32(rng, *shape, scale=scale)

    return [
        Case(((device_array(0.5), device_array(1.0)), (device_array(0.25), device_array(2.0))),
             label="scalars: (0.5, 1) then (0.25, 2)"),
        Case((pair(7), pair(7)), label="vectors of 7"),
        Case((pair(2, 3, 4), pair(2, 3, 4, scale=1e3)), label="(2, 3, 4) arrays, large b"),
        Case((pair(5, low=0.999, high=1.0), pair(5, low=0.0, high=1e-3)),
             label="a near 1 then a near 0"),
    ]


COMBINE_MISTAKES = {
    "the order is reversed: (a1 a2, a1 b2 + b1) applies the right element first":
        lambda left, right: (left[0] * right[0], left[0] * right[1] + left[1]),
    "b1 is not decayed by a2: (a1 a2, b1 + b2)":
        lambda left, right: (left[0] * right[0], left[1] + right[1]),
    "the a's are added instead of multiplied: (a1 + a2, a2 b1 + b2)":
        lambda left, right: (left[0] + right[0], right[0] * left[1] + right[1]),
}

register(
    "mamba.combine",
    title="The combine operator of the parallel scan",
    points=2,
    reference=mamba.combine,
    cases=_combine_cases,
    rtol=1e-5, atol=1e-6,
    wrong=COMBINE_MISTAKES,
    hint="compose the maps: apply h -> a1 h + b1 first, then h -> a2 h + b2 to the result, and "
         "read off the new multiplier and offset",
)


# --------------------------------------------------------------------------------------------
# mamba.segsum
# --------------------------------------------------------------------------------------------
def _segsum_cases(rng):
    mixed = np.asarray(rng.uniform(-1e-3, 0.0, size=32), np.float32)
    mixed[:16] = rng.uniform(-2e4, -1e4, size=16)  # rounded to float32 as it is stored
    mixed = device_array(mixed)
    return [
        Case((device_array([-1.0]),), label="T = 1"),
        Case((device_array([-1.0, -2.0, -3.0, -4.0]),), label="x = -(1, 2, 3, 4)"),
        Case((_f32(rng, 9),), label="T = 9, random"),
        Case((_f32(rng, 2, 3, 6),), label="leading axes (2, 3), T = 6"),
        Case((mixed,), label="T = 32: sixteen entries of size 1e4, then sixteen of size 1e-3"),
    ]


def _segsum_unstable(x):
    cs = jnp.cumsum(x, -1)
    s = cs[..., :, None] - cs[..., None, :]
    T = x.shape[-1]
    return jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)


def _segsum_with(x, *, inclusive=False, diagonal=0, fill=-jnp.inf, upper=False):
    T = x.shape[-1]
    lo = jnp.tril(jnp.ones((T, T), bool), -1 if not inclusive else 0)
    s = jnp.cumsum(jnp.where(lo, x[..., :, None] * jnp.ones((T,)), 0.0), axis=-2)
    if inclusive:
        s = jnp.cumsum(jnp.where(lo, x[..., None, :] * jnp.ones((T, 1)), 0.0)[..., ::-1], -1)
        s = s[..., ::-1]
    s = jnp.where(jnp.tril(jnp.ones((T, T), bool), diagonal), s, fill)
    return jnp.swapaxes(s, -1, -2) if upper else s


SEGSUM_MISTAKES = {
    "the segment includes x_s: sum over k = s..t instead of k = s+1..t (the diagonal should "
    "be 0)": lambda x: _segsum_with(x, inclusive=True),
    "the diagonal is -inf: position t must see its own input (exp(S_tt) = 1)":
        lambda x: _segsum_with(x, diagonal=-1),
    "0 instead of -inf above the diagonal: exp(0) = 1 lets the future in":
        lambda x: _segsum_with(x, fill=0.0),
    "transposed: the upper triangle is filled, the lower one is -inf":
        lambda x: _segsum_with(x, upper=True),
    "the difference of two cumulative sums, cumsum[t] - cumsum[s]: right in exact arithmetic, "
    "but it cancels the small entries after large ones": _segsum_unstable,
}

register(
    "mamba.segsum",
    title="SSD's segment-sum mask",
    points=3,
    reference=mamba.segsum,
    cases=_segsum_cases,
    rtol=1e-5, atol=1e-6,
    wrong=SEGSUM_MISTAKES,
    hint="copy x into a (T, T) matrix whose entry [t, s] is x_t below the diagonal and 0 "
         "elsewhere; a cumulative sum down the t axis then sums x_{s+1}..x_t; finally put -inf "
         "above the diagonal",
)
