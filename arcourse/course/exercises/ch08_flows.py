"""Chapter 08 (flows): the MADE masks, the log-density of a MAF layer, MAF sampling in D passes,
one IAF sampling pass, and bits/dim of discrete data from a dequantised density.

Each grader compares with the reference on fixed and random cases; when the answer differs, it
also tries the classic mistakes of that exercise and names the one the answer matches.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from arcourse import flows
from arcourse.course.grading import Case, device_array, register
from arcourse.course.grading import normal_array as _f32


# --------------------------------------------------------------------------------------------
# flows.made_masks
# --------------------------------------------------------------------------------------------
def _masks_with(degrees, hidden="ge", out="gt", transpose=False):
    ops = {"ge": np.greater_equal, "gt": np.greater}
    d = [np.asarray(m) for m in degrees]
    masks = [ops[hidden](d[l][None, :], d[l - 1][:, None]) for l in range(1, len(d))]
    masks.append(ops[out](d[0][None, :], d[-1][:, None]))
    return [m.T for m in masks] if transpose else masks


def _mask_cases(rng):
    cases = [Case(([np.array([1, 2, 3]), np.array([1, 2, 1, 2])],), label="D=3, natural order"),
             Case(([np.array([3, 1, 2]), np.array([2, 1, 1, 2, 2])],), label="D=3, order (3,1,2)"),
             Case(([np.array([1]), np.array([1, 1])],), label="D=1"),
             Case(([np.array([2, 4, 1, 3])],), label="D=4, no hidden layer")]
    for dim, hidden in ((5, (7, 6)), (8, (16, 16, 12))):
        deg = flows.made_degrees(rng.permutation(dim) + 1, hidden, rng=rng)
        cases.append(Case((deg,), label=f"D={dim}, random order, hidden {hidden}"))
    return cases


MASK_MISTAKES = {
    "the hidden masks use a strict > (a hidden unit may not see an input of its own degree), "
    "which disconnects more than MADE must": lambda deg: _masks_with(deg, hidden="gt"),
    "the output mask uses >= instead of a strict >: output d sees its own input x_d":
        lambda deg: _masks_with(deg, out="ge"),
    "the comparisons are swapped (> for the hidden layers, >= for the output)":
        lambda deg: _masks_with(deg, hidden="gt", out="ge"),
    "the masks are transposed: laid out (n_out, n_in) instead of (n_in, n_out) for h @ W":
        lambda deg: _masks_with(deg, transpose=True),
}

register(
    "flows.made_masks",
    title="The MADE masks",
    points=3,
    reference=flows.made_masks,
    cases=_mask_cases,
    rtol=1e-5, atol=1e-5,
    wrong=MASK_MISTAKES,
    hint="a hidden unit of degree k may read every unit of the layer below with degree <= k; an "
         "output d may read a last-layer hidden unit only if its degree is strictly below m0(d); "
         "build each mask by broadcasting a row of the new degrees against a column of the old",
)


# --------------------------------------------------------------------------------------------
# flows.maf_log_density
# --------------------------------------------------------------------------------------------
def _density_cases(rng):
    cases = []
    for b, d, sx, sa in ((1, 1, 1.0, 0.5), (4, 2, 1.0, 1.0), (16, 8, 2.0, 1.5), (3, 64, 1.0, 0.3)):
        cases.append(Case((_f32(rng, b, d, scale=sx), _f32(rng, b, d), _f32(rng, b, d, scale=sa)),
                          label=f"B={b}, D={d}"))
    cases.append(Case((jnp.full((2, 3), 300.0), jnp.zeros((2, 3)), jnp.array([[8.0, -8.0, 0.0],
                                                                              [0.0, 5.0, -5.0]])),
                      label="large |x| and |log_scale|"))
    return cases


def _density_with(x, mu, a, *, u_sign=-1, det_sign=-1, log2pi=True):
    u = (x - mu) * jnp.exp(u_sign * a)
    base = -0.5 * jnp.sum(u * u + (flows.LOG_2PI if log2pi else 0.0), -1)
    return base + det_sign * jnp.sum(a, -1)


DENSITY_MISTAKES = {
    "the log-determinant has the wrong sign: + sum(log_scale) instead of - sum(log_scale)":
        lambda x, mu, a: _density_with(x, mu, a, det_sign=1),
    "the log-determinant is missing": lambda x, mu, a: _density_with(x, mu, a, det_sign=0),
    "u = (x - mu) * exp(+log_scale): that is the other direction of the layer":
        lambda x, mu, a: _density_with(x, mu, a, u_sign=1),
    "the Gaussian's normalising constant -0.5 log(2 pi) per dimension is missing":
        lambda x, mu, a: _density_with(x, mu, a, log2pi=False),
}

register(
    "flows.maf_log_density",
    title="The log-density of a MAF layer",
    points=2,
    reference=flows.maf_log_density,
    cases=_density_cases,
    rtol=1e-5, atol=1e-4,
    wrong={**DENSITY_MISTAKES,
           "the mean over dimensions instead of the sum":
               lambda x, mu, a: jnp.mean(-0.5 * ((x - mu) * jnp.exp(-a)) ** 2
                                         - 0.5 * flows.LOG_2PI - a, -1)},
    hint="first the noise u that produced x, then the standard normal's log-density of u, "
         "then the change of variables: how much does the layer stretch volume going from x to u?",
)


# --------------------------------------------------------------------------------------------
# shift_log_scale functions for the sampling exercises
# --------------------------------------------------------------------------------------------
def _autoregressive_fn(dim: int, seed: int, order: str = "natural"):
    """A fixed autoregressive ``shift_log_scale(y) -> (mu, log_scale)``, both ``(B, D)``: two
    strictly triangular (in the order) linear maps through tanh; strong couplings, so that every
    pass of the inversion matters."""
    rng = np.random.default_rng(seed)
    deg = np.arange(1, dim + 1) if order == "natural" else rng.permutation(dim) + 1
    mask = (deg[None, :] > deg[:, None]).astype(np.float32)  # mask[j, i]: y_j feeds output i
    w1 = device_array(rng.normal(size=(dim, dim)) * 1.2 * mask)
    w2 = device_array(rng.normal(size=(dim, dim)) * 0.8 * mask)
    b1 = device_array(rng.normal(size=dim))
    b2 = device_array(0.3 * rng.normal(size=dim))

    def shift_log_scale(y):
        return 2.0 * jnp.tanh(y @ w1) + b1, 0.7 * jnp.tanh(y @ w2) + b2

    shift_log_scale.__name__ = f"shift_log_scale(D={dim}, {order} order)"
    return shift_log_scale


_FNS = {(d, o): _autoregressive_fn(d, 10 + d, o)
        for d, o in ((1, "natural"), (2, "natural"), (4, "natural"), (6, "random"), (9, "random"))}


def _sample_cases(rng):
    return [Case((fn, _f32(rng, 1 + (d % 4), d)), label=f"D={d}, {o} order")
            for (d, o), fn in _FNS.items()]


# --------------------------------------------------------------------------------------------
# flows.maf_sample
# --------------------------------------------------------------------------------------------
def _maf_passes(fn, u, passes=None, a_sign=1):
    x = jnp.zeros_like(u)
    a = jnp.zeros_like(u)
    for _ in range(u.shape[-1] if passes is None else passes(u.shape[-1])):
        mu, a = fn(x)
        x = u * jnp.exp(a_sign * a) + mu
    return x, jnp.sum(a_sign * a, -1)


MAF_MISTAKES = {
    "one pass only: x computed from mu, alpha at x = 0, exact for the first variable alone":
        lambda fn, u: _maf_passes(fn, u, passes=lambda d: 1),
    "D - 1 passes (an off-by-one): the last variable of the order is still wrong":
        lambda fn, u: _maf_passes(fn, u, passes=lambda d: d - 1),
    "x = u * exp(-log_scale) + mu: the density direction's scale, not its inverse":
        lambda fn, u: _maf_passes(fn, u, a_sign=-1),
    "the log-determinant has the wrong sign (-sum(log_scale))":
        lambda fn, u: (lambda x, ld: (x, -ld))(*_maf_passes(fn, u)),
}

register(
    "flows.maf_sample",
    title="Sampling a MAF layer in D passes",
    points=3,
    reference=flows.maf_sample,
    cases=_sample_cases,
    rtol=1e-4, atol=1e-4,
    wrong=MAF_MISTAKES,
    hint="each pass fixes one more variable of the order; count how many passes make all D of "
         "them exact, starting from x = 0",
)


# --------------------------------------------------------------------------------------------
# flows.iaf_sample
# --------------------------------------------------------------------------------------------
def _iaf_with(fn, u, *, a_sign=1, det_sign=-1, base=True):
    mu, a = fn(u)
    x = u * jnp.exp(a_sign * a) + mu
    lb = -0.5 * jnp.sum(u * u + flows.LOG_2PI, -1) if base else 0.0
    return x, lb + det_sign * jnp.sum(a, -1)


IAF_MISTAKES = {
    "log q(x) adds sum(log_scale): the log-determinant's sign is flipped":
        lambda fn, u: _iaf_with(fn, u, det_sign=1),
    "log q(x) is missing the base density log N(u; 0, I)":
        lambda fn, u: _iaf_with(fn, u, base=False),
    "x = u * exp(-log_scale) + mu: the scale is inverted":
        lambda fn, u: _iaf_with(fn, u, a_sign=-1),
    "log q(x) forgets the log-determinant": lambda fn, u: _iaf_with(fn, u, det_sign=0),
}

register(
    "flows.iaf_sample",
    title="One IAF sampling pass and its density",
    points=2,
    reference=flows.iaf_sample,
    cases=_sample_cases,
    rtol=1e-4, atol=1e-4,
    wrong=IAF_MISTAKES,
    hint="the MADE reads the noise, which you already have in full; the density of x is the "
         "base density of u corrected by the volume change of u -> x",
)


# --------------------------------------------------------------------------------------------
# flows.dequantized_bits_per_dim
# --------------------------------------------------------------------------------------------
def _bpd_cases(rng):
    return [Case((jnp.zeros((5,)), 64, 17), label="uniform density on [0,1)^64, 17 levels"),
            Case((jnp.asarray(rng.normal(size=32) * 5 + 40, jnp.float32), 64, 17),
                 label="64 dimensions, 17 levels"),
            Case((jnp.asarray([-3.0, 1.5]), 2, 256), label="2 dimensions, 256 levels"),
            Case((jnp.asarray(rng.normal(size=7) * 100 + 3000, jnp.float32), 784, 256),
                 label="784 dimensions, 256 levels")]


BPD_MISTAKES = {
    "the + log2(levels) term is missing: that is a density of z on [0,1)^D, not a probability "
    "of the discrete x": lambda lp, d, L: -jnp.mean(lp) / d / math.log(2.0),
    "nats, not bits (no division by ln 2)":
        lambda lp, d, L: -jnp.mean(lp) / d + math.log(L),
    "the log2(levels) term is subtracted instead of added":
        lambda lp, d, L: -jnp.mean(lp) / d / math.log(2.0) - math.log2(L),
    "not divided by the dimension D":
        lambda lp, d, L: (-jnp.mean(lp) + math.log(L)) / math.log(2.0),
}

register(
    "flows.dequantized_bits_per_dim",
    title="Bits/dim of discrete data from a dequantised density",
    points=2,
    reference=flows.dequantized_bits_per_dim,
    cases=_bpd_cases,
    rtol=1e-5, atol=1e-5,
    wrong=BPD_MISTAKES,
    hint="rescale z = (x + v) / L back to y = x + v, whose unit cells hold the probabilities of "
         "the discrete values: how does the density change under y = L z in D dimensions?",
)
