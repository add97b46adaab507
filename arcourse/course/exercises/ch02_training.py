"""Chapter 02: training autoregressive models."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import losses
from arcourse.course.grading import Case, register


def _f32(x):
    return np.asarray(x, np.float32)


# --- 1. a stable log-softmax --------------------------------------------------------------------
def _naive_log_softmax(z):
    e = jnp.exp(jnp.asarray(z))
    return jnp.log(e / jnp.sum(e, axis=-1, keepdims=True))


def _log_softmax_first_axis(z):
    z = jnp.asarray(z)
    m = jnp.max(z, axis=0, keepdims=True)
    return z - m - jnp.log(jnp.sum(jnp.exp(z - m), axis=0, keepdims=True))


def _log_softmax_forgets_max_in_log(z):
    z = jnp.asarray(z)
    m = jnp.max(z, axis=-1, keepdims=True)
    return z - jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True))


register(
    "training.log_softmax",
    title="A log-softmax that never overflows",
    points=2,
    reference=lambda logits: losses.log_softmax(logits),
    cases=lambda rng: [
        Case((_f32(rng.normal(size=(3, 5))),), label="small random logits (3, 5)"),
        Case((_f32([[1000.0, 999.0, 0.0], [-1000.0, -1001.0, -1002.0]]),),
             label="huge positive and negative logits"),
        Case((_f32([[200.0, 0.0, -200.0, 5.0]]),),
             label="one dominant logit (its rivals' probabilities underflow)"),
        Case((_f32(rng.normal(scale=30.0, size=(2, 4, 7))),), label="a (2, 4, 7) batch"),
    ],
    rtol=1e-5,
    atol=1e-4,
    wrong={
        "naive log(exp(z) / sum exp(z))": _naive_log_softmax,
        "normalises over the first axis": _log_softmax_first_axis,
        "subtracts the max inside the sum but forgets it outside": _log_softmax_forgets_max_in_log,
    },
    hint="subtract m = max(z) over the last axis (keepdims=True) before exponentiating, "
         "and return (z - m) - log(sum(exp(z - m)))",
)


# --- 2. the shifted-target (teacher forcing) loss ------------------------------------------------
def _loss_cases(rng):
    def case(B, T, V, scale, label):
        logits = _f32(rng.normal(scale=scale, size=(B, T, V)))
        tokens = rng.integers(0, V, (B, T)).astype(np.int32)
        return Case((logits, tokens), label=label)

    return [case(2, 5, 4, 1.0, "B=2, T=5, V=4"),
            case(1, 2, 3, 1.0, "a single target (T=2)"),
            case(3, 8, 6, 50.0, "large logits (B=3, T=8, V=6)")]


register(
    "training.next_token_loss",
    title="The shifted-target loss of teacher forcing",
    points=2,
    reference=lambda logits, tokens: losses.next_token_loss(logits, tokens),
    cases=_loss_cases,
    rtol=1e-5,
    atol=1e-5,
    wrong={
        "no shift: scores position t on token t": lambda z, x: losses.cross_entropy(z, x),
        "shifted the wrong way": lambda z, x: losses.cross_entropy(z[:, 1:], x[:, :-1]),
        "sums instead of averaging": lambda z, x: (
            losses.cross_entropy(z[:, :-1], x[:, 1:]) * x[:, 1:].size),
    },
    hint="logits[:, t] has seen tokens[:, :t+1] and predicts tokens[:, t+1]: "
         "pair logits[:, :-1] with tokens[:, 1:] and average -log p over all of them",
)


# --- 3. label smoothing ------------------------------------------------------------------------
def _smooth_cases(rng):
    cases = []
    for B, V, eps, scale in [(4, 5, 0.1, 1.0), (3, 2, 0.3, 2.0), (6, 7, 0.0, 1.0),
                             (2, 4, 1.0, 1.0), (5, 6, 0.2, 40.0)]:
        logits = _f32(rng.normal(scale=scale, size=(B, V)))
        targets = rng.integers(0, V, B).astype(np.int32)
        cases.append(Case((logits, targets, eps), label=f"B={B}, V={V}, eps={eps}"))
    return cases


def _smooth_no_divide(z, x, eps):
    logp = losses.log_softmax(z)
    nll = -jnp.take_along_axis(logp, jnp.asarray(x)[:, None], axis=-1)[:, 0]
    return jnp.mean((1 - eps) * nll - eps * jnp.sum(logp, axis=-1))


def _smooth_other_classes_only(z, x, eps):
    V = z.shape[-1]
    q = (1 - eps) * jax.nn.one_hot(x, V) + eps / (V - 1) * (1 - jax.nn.one_hot(x, V))
    return -jnp.mean(jnp.sum(q * losses.log_softmax(z), axis=-1))


register(
    "training.label_smoothing",
    title="Cross-entropy against label-smoothed targets",
    points=2,
    reference=lambda logits, targets, eps: losses.cross_entropy(logits, targets,
                                                                label_smoothing=eps),
    cases=_smooth_cases,
    rtol=1e-5,
    atol=1e-5,
    wrong={
        "eps on every class without dividing by V (targets sum to more than 1)": _smooth_no_divide,
        "spreads eps over the other V-1 classes only": _smooth_other_classes_only,
        "ignores eps": lambda z, x, eps: losses.cross_entropy(z, x),
    },
    hint="the target distribution is q = (1 - eps) * onehot + eps / V; the loss is "
         "-mean over rows of sum_v q_v log softmax(z)_v",
)


# --- 4. warmup then cosine decay -----------------------------------------------------------------
def _schedule_cases(rng):
    out = []
    for peak, w, S, f in [(1e-3, 10, 50, 0.0), (3e-3, 100, 1000, 1e-4), (0.5, 1, 7, 0.1)]:
        steps = np.arange(0, S + 5, dtype=np.int32)
        out.append(Case((steps,), dict(peak=peak, warmup_steps=w, total_steps=S, final=f),
                        label=f"peak={peak}, warmup={w}, total={S}, final={f}, steps 0..{S + 4}"))
    return out


def _cosine_over_total(step, *, peak, warmup_steps, total_steps, final=0.0):
    s = jnp.asarray(step, jnp.float32)
    frac = jnp.clip(s / total_steps, 0.0, 1.0)
    decay = final + (peak - final) * 0.5 * (1 + jnp.cos(math.pi * frac))
    return jnp.where(s < warmup_steps, peak * s / warmup_steps, decay)


def _warmup_never_decays_to_final(step, *, peak, warmup_steps, total_steps, final=0.0):
    s = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((s - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    decay = peak * 0.5 * (1 + jnp.cos(math.pi * frac))
    return jnp.where(s < warmup_steps, peak * s / warmup_steps, decay)


register(
    "training.warmup_cosine",
    title="Learning-rate warmup, then cosine decay",
    points=2,
    reference=losses.warmup_cosine,
    cases=_schedule_cases,
    rtol=1e-5,
    atol=1e-8,
    wrong={
        "cosine measured from step 0, not from the end of the warmup": _cosine_over_total,
        "decays to 0 instead of to final": _warmup_never_decays_to_final,
    },
    hint="for s < w: peak * s / w; afterwards the cosine runs over the S - w remaining steps, "
         "frac = clip((s - w) / (S - w), 0, 1), from peak down to final",
)


# --- 5. clipping by the global norm --------------------------------------------------------------
def _clip_cases(rng):
    def tree(scale):
        return {"embed": _f32(rng.normal(scale=scale, size=(5, 3))),
                "hidden": {"kernel": _f32(rng.normal(scale=scale, size=(3, 4))),
                           "bias": _f32(rng.normal(scale=scale, size=(4,)))}}

    return [
        Case((tree(10.0), 1.0), label="a large gradient (norm about 60), max_norm=1"),
        Case((tree(0.01), 1.0), label="a small gradient, already under max_norm (unchanged)"),
        Case(({"w": _f32([3.0, 4.0]), "b": _f32([0.0])}, 2.5),
             label="{'w': [3, 4], 'b': [0]} (norm 5), max_norm=2.5"),
        Case((tree(1.0), 0.5), label="a gradient of norm about 6, max_norm=0.5"),
    ]


def _clip_each_leaf(tree, max_norm):
    def clip(g):
        n = jnp.sqrt(jnp.sum(jnp.square(g)))
        return g * jnp.minimum(1.0, max_norm / n)

    return jax.tree_util.tree_map(clip, tree)


register(
    "training.clip_global_norm",
    title="Gradient clipping by the global norm",
    points=2,
    reference=losses.clip_by_global_norm,
    cases=_clip_cases,
    rtol=1e-5,
    atol=1e-6,
    wrong={
        "clips each element to [-c, c] (changes the direction)": lambda t, c: (
            losses.clip_by_value(t, c)),
        "clips each leaf by its own norm": _clip_each_leaf,
        "always rescales to norm c, even small gradients": lambda t, c: jax.tree_util.tree_map(
            lambda g: g * c / losses.global_norm(t), t),
    },
    hint="norm = sqrt(sum over every leaf of sum(g**2)); multiply every leaf by "
         "min(1, max_norm / norm) (jax.tree_util.tree_map helps)",
)
