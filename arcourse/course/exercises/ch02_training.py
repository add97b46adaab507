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


def _shifted_log_softmax(shift):
    """log-softmax with the constant m chosen by ``shift``: right in exact arithmetic, and in
    float32 right only when m is the row's maximum."""
    def log_softmax(z):
        z = jnp.asarray(z)
        m = shift(z)
        return (z - m) - jnp.log(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True))

    return log_softmax


_BY_ROW_MIN = _shifted_log_softmax(lambda z: jnp.min(z, axis=-1, keepdims=True))
_BY_ROW_MEAN = _shifted_log_softmax(lambda z: jnp.mean(z, axis=-1, keepdims=True))
_BY_GLOBAL_MAX = _shifted_log_softmax(lambda z: jnp.max(z))
_SHIFT_MISTAKES = {
    "subtracts the row's minimum (exp(z - min) overflows on a wide row)": _BY_ROW_MIN,
    "subtracts the row's mean (exp(z - mean) overflows on a wide row)": _BY_ROW_MEAN,
    "subtracts one maximum for the whole batch (rows far below it underflow to log 0)":
        _BY_GLOBAL_MAX,
}


def _wide_row(rng, rows, V):
    """Rows whose logits spread over [-300, 300] around offsets far apart (+-400)."""
    spread = rng.uniform(-300.0, 300.0, size=(rows, V))
    offsets = np.where(np.arange(rows) % 2 == 0, 400.0, -400.0)[:, None]
    return _f32(spread + offsets)


register(
    "training.log_softmax",
    title="A log-softmax that never overflows",
    points=2,
    reference=lambda logits: losses.log_softmax(logits),
    cases=lambda rng: [
        Case((_f32(rng.normal(size=(3, 5))),), label="small random logits (3, 5)"),
        Case((_f32([[1000.0, 999.0, 0.0], [-1000.0, -1001.0, -1002.0]]),),
             label="huge positive and negative logits"),
        Case((_f32([[200.0, 0.0, -200.0], [5.0, 200.0, 0.0]]),),
             label="one dominant logit per row (its rivals' probabilities underflow)"),
        Case((_f32(rng.normal(scale=30.0, size=(2, 4, 7))),), label="a (2, 4, 7) batch"),
        Case((_f32(np.linspace(-300.0, 300.0, 512)[None]),),
             label="one wide row: 512 logits from -300 to 300"),
        Case((_f32([[500.0, 499.0, 498.0], [-500.0, -501.0, -502.0]]),),
             label="two rows far apart (near +500 and near -500)"),
    ],
    rtol=1e-5,
    atol=1e-4,
    wrong={
        "naive log(exp(z) / sum exp(z))": _naive_log_softmax,
        "normalises over the first axis": _log_softmax_first_axis,
        "subtracts the max inside the sum but forgets it outside": _log_softmax_forgets_max_in_log,
        **_SHIFT_MISTAKES,
    },
    hint="subtracting the same constant from every logit of a row changes no log-probability; "
         "choose the constant row by row so that the largest exponent is exactly 0: then nothing "
         "overflows and the sum inside the log is at least 1",
)


# --- 2. the shifted-target (teacher forcing) loss ------------------------------------------------
def _loss_cases(rng):
    def case(B, T, V, scale, label):
        logits = _f32(rng.normal(scale=scale, size=(B, T, V)))
        tokens = rng.integers(0, V, (B, T)).astype(np.int32)
        return Case((logits, tokens), label=label)

    wide = _wide_row(rng, 2 * 4, 300).reshape(2, 4, 300)
    return [case(2, 5, 4, 1.0, "B=2, T=5, V=4"),
            case(2, 2, 4, 1.0, "a single target per row (T=2)"),
            case(2, 5, 4, 50.0, "large logits (B=2, T=5, V=4)"),
            Case((wide, rng.integers(0, 300, (2, 4)).astype(np.int32)),
                 label="wide rows far apart (B=2, T=4, V=300, logits from -700 to 700)")]


def _nll_with(log_softmax):
    def loss(z, x):
        logp = log_softmax(jnp.asarray(z)[:, :-1])
        return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(x)[:, 1:, None], axis=-1))

    return loss


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
        "no shift, last position dropped: scores position t on token t": lambda z, x: (
            losses.cross_entropy(z[:, :-1], x[:, :-1])),
        "shifted the wrong way": lambda z, x: losses.cross_entropy(z[:, 1:], x[:, :-1]),
        "sums instead of averaging": lambda z, x: (
            losses.cross_entropy(z[:, :-1], x[:, 1:]) * x[:, 1:].size),
        "divides by B * T instead of by the B * (T - 1) scored positions": lambda z, x: (
            losses.cross_entropy(z[:, :-1], x[:, 1:]) * (x.shape[1] - 1) / x.shape[1]),
        "log of a softmax computed literally (overflows on large logits)":
            _nll_with(_naive_log_softmax),
        **{f"log-softmax that {what}": _nll_with(fn) for what, fn in _SHIFT_MISTAKES.items()},
    },
    hint="for each position t, ask which token its logits are a prediction of: the last position "
         "predicts nothing inside the window and the first token is predicted by nothing; score "
         "every other pair and average over all of them, in every row",
)


# --- 3. label smoothing ------------------------------------------------------------------------
def _smooth_cases(rng):
    cases = []
    for B, V, eps, scale in [(4, 5, 0.1, 1.0), (4, 5, 0.3, 2.0), (4, 5, 0.0, 1.0),
                             (4, 5, 1.0, 1.0), (4, 5, 0.2, 40.0)]:
        logits = _f32(rng.normal(scale=scale, size=(B, V)))
        targets = rng.integers(0, V, B).astype(np.int32)
        cases.append(Case((logits, targets, eps), label=f"B={B}, V={V}, eps={eps}"))
    cases.append(Case((_wide_row(rng, 4, 300), rng.integers(0, 299, 4).astype(np.int32), 0.1),
                      label="wide rows far apart (B=4, V=300, logits from -700 to 700), eps=0.1"))
    return cases


def _smoothed_with(log_softmax):
    def loss(z, x, eps):
        V = z.shape[-1]
        q = (1 - eps) * jax.nn.one_hot(x, V) + eps / V
        return -jnp.mean(jnp.sum(q * log_softmax(z), axis=-1))

    return loss


def _smooth_no_divide(z, x, eps):
    logp = losses.log_softmax(z)
    nll = -jnp.take_along_axis(logp, jnp.asarray(x)[:, None], axis=-1)[:, 0]
    return jnp.mean((1 - eps) * nll - eps * jnp.sum(logp, axis=-1))


def _smooth_other_classes_only(z, x, eps):
    V = z.shape[-1]
    q = (1 - eps) * jax.nn.one_hot(x, V) + eps / (V - 1) * (1 - jax.nn.one_hot(x, V))
    return -jnp.mean(jnp.sum(q * losses.log_softmax(z), axis=-1))


def _smooth_the_prediction(z, x, eps):
    p = jnp.exp(losses.log_softmax(z))
    p = (1 - eps) * p + eps / z.shape[-1]
    return -jnp.mean(jnp.log(jnp.take_along_axis(p, jnp.asarray(x)[:, None], axis=-1)))


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
        "smooths the model's probabilities instead of the targets": _smooth_the_prediction,
        "averages over the V classes instead of summing": lambda z, x, eps: (
            losses.cross_entropy(z, x, label_smoothing=eps) / z.shape[-1]),
        "sums over the rows instead of averaging": lambda z, x, eps: (
            losses.cross_entropy(z, x, label_smoothing=eps) * z.shape[0]),
        "log of a softmax computed literally (overflows on large logits)":
            _smoothed_with(_naive_log_softmax),
        **{f"log-softmax that {what}": _smoothed_with(fn) for what, fn in _SHIFT_MISTAKES.items()},
    },
    hint="write the target distribution q as a [B, V] array first and check that each row sums "
         "to 1, with 1 - eps + eps/V on the target; the loss is the cross-entropy between q and "
         "the model's log-probabilities (a sum over the V symbols), averaged over the rows",
)


# --- 4. warmup then cosine decay -----------------------------------------------------------------
def _schedule_cases(rng):
    out = []
    for peak, w, S, f in [(1e-3, 10, 50, 0.0), (3e-3, 100, 1000, 1e-4), (0.5, 1, 7, 0.1),
                          (0.1, 0, 10, 0.01)]:
        # 64 steps from 0 to S + 4: every step near the warmup's end and near S, the rest spread
        key = [0, 1, w - 1, w, w + 1, S - 1, S, S + 1, S + 4]
        spread = np.linspace(0, S + 4, 64 - len(key)).round()
        steps = np.sort(np.clip(np.concatenate([key, spread]), 0, None)).astype(np.int32)
        out.append(Case((steps,), dict(peak=peak, warmup_steps=w, total_steps=S, final=f),
                        label=f"peak={peak}, warmup={w}, total={S}, final={f}, 64 steps in "
                              f"0..{S + 4}"))
    kw = dict(peak=0.2, warmup_steps=4, total_steps=20, final=0.02)
    out.append(Case((2,), dict(kw), label="a scalar step inside the warmup (2, a Python int)"))
    out.append(Case((np.int32(13),), dict(kw), label="a scalar step in the decay (np.int32(13))"))
    return out


def _schedule(warm, frac, *, floor_is_final=True, clip=True):
    """A warmup-cosine schedule assembled from a warmup rule and a cosine-progress rule."""
    def schedule(step, *, peak, warmup_steps, total_steps, final=0.0):
        s = jnp.asarray(step, jnp.float32)
        x = frac(s, warmup_steps, total_steps)
        x = jnp.clip(x, 0.0, 1.0) if clip else x
        low = final if floor_is_final else 0.0
        decay = low + (peak - low) * 0.5 * (1 + jnp.cos(math.pi * x))
        return jnp.where(s < warmup_steps, warm(s, peak, warmup_steps, final), decay)

    return schedule


def _linear_warmup(s, peak, w, final):
    return peak * s / max(w, 1)


def _after_warmup(s, w, S):
    return (s - w) / (S - w)


def _warmup_inclusive(step, *, peak, warmup_steps, total_steps, final=0.0):
    s = jnp.asarray(step, jnp.float32)
    frac = jnp.clip((s - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    decay = final + (peak - final) * 0.5 * (1 + jnp.cos(math.pi * frac))
    return jnp.where(s <= warmup_steps, peak * s / warmup_steps, decay)


register(
    "training.warmup_cosine",
    title="Learning-rate warmup, then cosine decay",
    points=2,
    reference=losses.warmup_cosine,
    cases=_schedule_cases,
    rtol=1e-5,
    atol=1e-8,
    wrong={
        "cosine measured from step 0, not from the end of the warmup": _schedule(
            _linear_warmup, lambda s, w, S: s / S),
        "decays to 0 instead of to final": _schedule(
            _linear_warmup, _after_warmup, floor_is_final=False),
        "does not hold final after total_steps (the cosine comes back up)": _schedule(
            _linear_warmup, _after_warmup, clip=False),
        "the cosine runs over total_steps after the warmup (ends at w + S, not at S)": _schedule(
            _linear_warmup, lambda s, w, S: (s - w) / S),
        "warms up from final instead of from 0": _schedule(
            lambda s, peak, w, final: final + (peak - final) * s / max(w, 1), _after_warmup),
        "warmup one step ahead: peak * (s + 1) / w": _schedule(
            lambda s, peak, w, final: peak * (s + 1) / max(w, 1), _after_warmup),
        "warmup up to s <= w (at warmup_steps = 0, step 0 gives 0 / 0)": _warmup_inclusive,
    },
    hint="compute the warmup value and the cosine value for every step, then choose between them "
         "with jnp.where (a Python if cannot look inside an array); the cosine's progress is 0 at "
         "the end of the warmup and 1 at total_steps, and stays 1 afterwards. With no warmup, "
         "step 0 is already on the cosine, at peak",
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
        Case((tree(1e20), 1.0),
             label="a huge gradient (entries about 1e20: their squares overflow float32), "
                   "max_norm=1"),
        Case((tree(0.0), 1.0), label="an all-zero gradient (norm 0: returned unchanged)"),
    ]


def _clip_each_leaf(tree, max_norm):
    def clip(g):
        n = jnp.sqrt(jnp.sum(jnp.square(g)))
        return g * jnp.minimum(1.0, max_norm / n)

    return jax.tree_util.tree_map(clip, tree)


def _norm_of_squares(tree):
    return jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree_util.tree_leaves(tree)))


def _clip_squares_overflow(tree, max_norm):
    scale = jnp.minimum(1.0, max_norm / _norm_of_squares(tree))
    return jax.tree_util.tree_map(lambda g: g * scale, tree)


def _clip_divides_first(tree, max_norm):
    n = losses.global_norm(tree)
    return jax.tree_util.tree_map(lambda g: g / n * jnp.minimum(n, max_norm), tree)


def _clip_by_rms(tree, max_norm):
    leaves = jax.tree_util.tree_leaves(tree)
    rms = losses.global_norm(tree) / math.sqrt(sum(g.size for g in leaves))
    return jax.tree_util.tree_map(lambda g: g * jnp.minimum(1.0, max_norm / rms), tree)


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
            lambda g: g * c / jnp.maximum(losses.global_norm(t), 1e-30), t),
        "squares the raw entries (the norm overflows to inf, the gradient becomes 0)":
            _clip_squares_overflow,
        "divides by the norm first (0 / 0 for a zero gradient)": _clip_divides_first,
        "uses the root-mean-square entry instead of the norm": _clip_by_rms,
    },
    hint="one norm for the whole tree: the square root of the sum of the squares of every entry "
         "of every leaf. Squares of 1e20 overflow float32, so compute it on the gradient divided "
         "by its largest absolute entry and multiply that back; then scale every leaf by the same "
         "factor, which is never above 1",
)
