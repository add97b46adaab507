"""Chapter 12 (speculative decoding): the acceptance probability, the residual distribution, the
expected number of tokens per target call, one round of verification, greedy verification.

Each grader compares with the reference on fixed and random cases; when the answer differs, it
also tries the classic mistakes of that exercise and names the one the answer matches.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from arcourse import speculative as sp
from arcourse.course.grading import Case, device_array, register


def _dist_np(rng, *shape, sharp=2.0):
    """Random distributions over the last axis, float32. Built with numpy: eager JAX ops would
    compile once per new shape, and the cases should cost nothing next to the answer."""
    z = sharp * rng.normal(size=shape)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return np.asarray(e / e.sum(axis=-1, keepdims=True), np.float32)


def _dist(rng, *shape, sharp=2.0):
    return device_array(_dist_np(rng, *shape, sharp=sharp))


# --------------------------------------------------------------------------------------------
# speculative.accept_probability
# --------------------------------------------------------------------------------------------
def _accept_cases(rng):
    cases = [Case((device_array([0.2, 0.5, 0.3]), device_array([0.4, 0.1, 0.3])),
                  label="p < q, p > q, p = q"),
             Case((device_array([0.0, 1.0]), device_array([0.5, 1e-6])),
                  label="p = 0, and a tiny q")]
    for n in (1, 7, 50):
        p, q = _dist(rng, n), _dist(rng, n)
        cases.append(Case((p, q), label=f"{n} random tokens"))
    p, q = _dist(rng, 4, 6), _dist(rng, 4, 6)
    cases.append(Case((p, q), label="shape (4, 6)"))
    return cases


ACCEPT_MISTAKES = {
    "the ratio is not clipped at 1: an acceptance probability above 1 is not a probability":
        lambda p, q: p / q,
    "the ratio is upside down (q/p instead of p/q)": lambda p, q: jnp.minimum(1.0, q / p),
    "min(p, q) instead of min(1, p/q)": lambda p, q: jnp.minimum(p, q),
}

register(
    "speculative.accept_probability",
    title="The acceptance probability",
    points=2,
    reference=sp.accept_probability,
    cases=_accept_cases,
    rtol=1e-5, atol=1e-6,
    wrong=ACCEPT_MISTAKES,
    hint="the chance of keeping a drafted token is the ratio of the target's probability to the "
         "draft's, but never more than 1",
)


# --------------------------------------------------------------------------------------------
# speculative.residual_distribution
# --------------------------------------------------------------------------------------------
def _residual_cases(rng):
    cases = [Case((device_array([0.5, 0.3, 0.2]), device_array([0.2, 0.3, 0.5])), label="V=3"),
             Case((device_array([0.25, 0.25, 0.5]), device_array([0.25, 0.25, 0.5])),
                  label="p = q: nothing left, return p")]
    for V in (2, 10, 96):
        cases.append(Case((_dist(rng, V), _dist(rng, V)), label=f"random, V={V}"))
    cases.append(Case((_dist(rng, 5, 8, sharp=6.0), _dist(rng, 5, 8, sharp=6.0)),
                      label="a batch (5, 8) of peaked distributions"))
    return cases


def _unnormalised(p, q):
    return jnp.maximum(p - q, 0.0)


def _reversed(p, q):
    d = jnp.maximum(q - p, 0.0)
    return d / d.sum(-1, keepdims=True)


def _unclipped(p, q):
    return (p - q) / jnp.sum(p - q, -1, keepdims=True)


def _no_guard(p, q):
    d = jnp.maximum(p - q, 0.0)
    return d / d.sum(-1, keepdims=True)


RESIDUAL_MISTAKES = {
    "the residual is not renormalised: max(0, p - q) does not sum to 1":
        _unnormalised,
    "max(0, q - p): the difference the wrong way round": _reversed,
    "p itself: resampling from the target ignores what the draft already proposed":
        lambda p, q: p,
    "(p - q) without max(0, .): negative 'probabilities' (and a sum of 0)": _unclipped,
    "no guard for p = q: 0/0 gives NaN where p itself is expected": _no_guard,
}

register(
    "speculative.residual_distribution",
    title="The residual distribution",
    points=2,
    reference=sp.residual_distribution,
    cases=_residual_cases,
    rtol=1e-5, atol=1e-6,
    wrong=RESIDUAL_MISTAKES,
    hint="keep only the part of p that exceeds q, then divide by its total over the last axis; "
         "when that total is 0, return p",
)


# --------------------------------------------------------------------------------------------
# speculative.expected_tokens_per_call
# --------------------------------------------------------------------------------------------
def _expected_cases(rng):
    return [Case((device_array([0.0, 0.5, 0.8]), 4), label="alpha 0, 0.5, 0.8; gamma 4"),
            Case((device_array([0.9, 1.0]), 3), label="alpha 1 (every draft accepted); gamma 3"),
            Case((device_array(rng.uniform(0, 0.99, 6)), 1), label="gamma 1"),
            Case((device_array(rng.uniform(0, 0.99, 6)), 8), label="gamma 8")]


def _geometric(alpha, power):
    alpha = jnp.asarray(alpha, jnp.float32)
    safe = jnp.where(alpha == 1.0, 0.5, alpha)
    return jnp.where(alpha == 1.0, float(power), (1 - safe ** power) / (1 - safe))


EXPECTED_MISTAKES = {
    "alpha^gamma instead of alpha^(gamma+1): the target's own (bonus or corrected) token is "
    "missing": lambda a, g: _geometric(a, g),
    "gamma * alpha + 1: acceptances are not independent of the earlier ones (a rejection "
    "ends the round)": lambda a, g: g * jnp.asarray(a, jnp.float32) + 1.0,
    "no special case for alpha = 1: 0/0 gives NaN (the answer is gamma + 1)":
        lambda a, g: (1 - jnp.asarray(a, jnp.float32) ** (g + 1)) / (1 - jnp.asarray(a)),
}

register(
    "speculative.expected_tokens_per_call",
    title="Expected tokens per target call",
    points=2,
    reference=sp.expected_tokens_per_call,
    cases=_expected_cases,
    rtol=1e-4, atol=1e-5,
    wrong=EXPECTED_MISTAKES,
    hint="a round emits 1 + (number of leading acceptances) tokens; P(at least i accepted) = "
         "alpha^i, and the expectation is a geometric sum",
)


# --------------------------------------------------------------------------------------------
# speculative.verify: one round
# --------------------------------------------------------------------------------------------
def _verify_cases(rng):
    # Two shapes only (gamma 1 and gamma 4): every new shape costs a compilation of each JAX op
    cases = []
    for gamma, V, sharp in [(1, 5, 2.0), (4, 12, 1.0), (4, 12, 2.0), (4, 12, 4.0), (4, 12, 8.0)]:
        for _ in range(3):
            p = _dist(rng, gamma + 1, V, sharp=sharp)
            q = _dist_np(rng, gamma, V, sharp=sharp)
            qq = np.asarray(q, np.float64)
            drafts = device_array([rng.choice(V, p=qq[i] / qq[i].sum()) for i in range(gamma)], np.int32)
            u = device_array(rng.uniform(size=gamma) ** 2)  # more acceptances
            cases.append(Case((u, p, device_array(q), drafts),
                              label=f"gamma={gamma}, V={V}, sharpness {sharp}"))
    p = _dist_np(rng, 5, 12)  # the draft is the target: everything accepted, the bonus from p[4]
    drafts = device_array(np.argmax(p[:4], axis=-1), np.int32)
    cases.append(Case((device_array(np.full(4, 0.999)), device_array(p), device_array(p[:4]), drafts),
                      label="q = p: all accepted"))
    return cases


def _verify_with(u, p, q, drafts, *, ratio=None, next_dist=None, count_all=False):
    gamma = drafts.shape[0]
    pt = jnp.take_along_axis(p[:gamma], drafts[:, None], -1)[:, 0]
    qt = jnp.take_along_axis(q, drafts[:, None], -1)[:, 0]
    ok = u < (ratio or (lambda a, b: jnp.minimum(1.0, a / b)))(pt, qt)
    n = jnp.sum(ok) if count_all else jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    n = jnp.minimum(n, gamma).astype(jnp.int32)
    i, j = jnp.minimum(n, gamma), jnp.minimum(n, gamma - 1)
    nxt = (next_dist or sp.residual_distribution)(p[i], q[j])
    return n, jnp.where(n < gamma, nxt, p[gamma])


VERIFY_MISTAKES = {
    "after a rejection the token is drawn from p instead of the residual norm(max(0, p - q))":
        lambda *a: _verify_with(*a, next_dist=lambda p, q: p),
    "the residual is not renormalised": lambda *a: _verify_with(*a, next_dist=_unnormalised),
    "the ratio is upside down (q/p)":
        lambda *a: _verify_with(*a, ratio=lambda pt, qt: jnp.minimum(1.0, qt / pt)),
    "every accepted draft is counted, not only those before the first rejection":
        lambda *a: _verify_with(*a, count_all=True),
    "the residual uses the distributions of the position after the rejected one":
        lambda u, p, q, d: (lambda n, _: (n, jnp.where(
            n < d.shape[0], sp.residual_distribution(p[jnp.minimum(n + 1, d.shape[0])],
                                                     q[jnp.minimum(n + 1, d.shape[0] - 1)]),
            p[d.shape[0]])))(*sp.speculative_verify(u, p, q, d)),
}

register(
    "speculative.verify",
    title="One round of speculative verification",
    points=3,
    reference=sp.speculative_verify,
    cases=_verify_cases,
    rtol=1e-5, atol=1e-6,
    wrong=VERIFY_MISTAKES,
    hint="walk the drafts left to right: keep draft i while u[i] < min(1, p_i(d_i)/q_i(d_i)); "
         "n is the length of that kept prefix; row n of p (and of q) decides the next token",
)


# --------------------------------------------------------------------------------------------
# speculative.greedy_verify
# --------------------------------------------------------------------------------------------
def _greedy_cases(rng):
    # Three shapes: every new shape costs a compilation of each JAX op
    cases = []
    for gamma, V, match in [(1, 10, 0.5), (5, 10, 0.7), (5, 10, 0.8), (5, 10, 1.0), (8, 50, 0.6),
                            (5, 10, 0.0)]:
        logits = np.asarray(rng.normal(size=(gamma + 1, V)) * 3, np.float32)
        best = np.argmax(logits, -1)
        drafts = np.where(rng.random(gamma) < match, best[:gamma], rng.integers(0, V, gamma))
        if match == 0.0:
            drafts = (best[:gamma] + 1) % V
        cases.append(Case((device_array(logits), device_array(drafts, np.int32)),
                          label=f"gamma={gamma}, V={V}, about {match:.0%} of drafts right"))
    logits = np.asarray(rng.normal(size=(6, 10)) * 1e4, np.float32)  # large magnitudes
    drafts = np.argmax(logits, -1)[:5]
    drafts[2] = (drafts[2] + 1) % 10
    cases.append(Case((device_array(logits), device_array(drafts, np.int32)),
                      label="large logits, the third draft wrong"))
    return cases


def _greedy_with(logits, drafts, *, count_all=False, take_draft=False, shift=0):
    gamma = drafts.shape[0]
    best = jnp.argmax(logits, -1).astype(jnp.int32)
    match = (best[:gamma] == drafts).astype(jnp.int32)
    n = jnp.sum(match) if count_all else jnp.sum(jnp.cumprod(match))
    n = n.astype(jnp.int32)
    if take_draft:
        return n, jnp.where(n < gamma, drafts[jnp.minimum(n, gamma - 1)], best[gamma])
    return n, best[jnp.clip(n + shift, 0, gamma)]


GREEDY_MISTAKES = {
    "every matching draft is counted, not only those before the first mismatch":
        lambda lg, d: _greedy_with(lg, d, count_all=True),
    "the next token is the rejected draft token, not the target's correction":
        lambda lg, d: _greedy_with(lg, d, take_draft=True),
    "off by one: the next token is the target's choice one position later":
        lambda lg, d: _greedy_with(lg, d, shift=1),
}

register(
    "speculative.greedy_verify",
    title="Greedy verification",
    points=2,
    reference=sp.greedy_verify,
    cases=_greedy_cases,
    rtol=1e-5, atol=1e-6,
    wrong=GREEDY_MISTAKES,
    hint="compare each draft with the target's arg max at its position; n is the length of the "
         "matching prefix; the target's arg max at row n is the next token",
)
