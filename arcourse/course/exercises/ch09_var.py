"""Chapter 09 (VAR): the block-causal mask, one residual quantisation step, the next-scale
inputs, the straight-through estimator, classifier-free guidance on logits.

Each grader compares with the reference on fixed and random cases; when the answer differs, it
also tries the classic mistakes of that exercise and names the one the answer matches.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import var
from arcourse.course.grading import Case, CheckFailure, assert_matches, compiled, device_array, register
from arcourse.course.grading import normal_array as _f32


# The references of the numerical exercises, in NumPy (float64, returned as float32): the same
# formulas as the library's functions, which the grader's checks run as they are, so that only
# the answer is compiled (one program per case instead of two).
def _np_resize(x, size):
    """NumPy twin of :func:`arcourse.var.resize` (area averaging down, bilinear up)."""
    h = x.shape[-2]
    if size == h:
        return x
    m = var.area_matrix(size, h) if size < h else var.bilinear_matrix(size, h)
    return np.einsum("ij,...jkd,lk->...ild", m, x, m)


def quantise_step_reference(rest, codebook, size):
    """:func:`arcourse.var.quantise_step` in NumPy."""
    rest, book = np.asarray(rest, np.float64), np.asarray(codebook, np.float64)
    r = _np_resize(rest, size)
    tokens = np.argmin(np.square(r[..., None, :] - book).sum(-1), -1).astype(np.int32)
    part = _np_resize(book[tokens], rest.shape[-2])
    return tokens, part.astype(np.float32), (rest - part).astype(np.float32)


def next_scale_inputs_reference(tokens, codebook, scales):
    """:func:`arcourse.var.next_scale_inputs` in NumPy."""
    tokens, book = np.asarray(tokens), np.asarray(codebook, np.float64)
    lead, D = tokens.shape[:-1], book.shape[1]
    parts, start = [], 0
    for s in scales:
        z = tokens[..., start:start + s * s].reshape(*lead, s, s)
        parts.append(_np_resize(book[z], scales[-1]))
        start += s * s
    cum = np.cumsum(parts, axis=0)
    ins = [_np_resize(cum[k], s).reshape(*lead, s * s, D) for k, s in enumerate(scales[1:])]
    return np.concatenate(ins, axis=-2).astype(np.float32)


def guided_logits_reference(cond, uncond, scale):
    """:func:`arcourse.var.guided_logits` in NumPy."""
    cond, uncond = np.asarray(cond), np.asarray(uncond)
    return uncond + np.float32(scale) * (cond - uncond)


# --------------------------------------------------------------------------------------------
# var.block_causal_mask
# --------------------------------------------------------------------------------------------
def _levels(scales):
    return np.repeat(np.arange(len(scales)), [s * s for s in scales])


def _mask_with(scales, rule):
    lv = _levels(scales)
    return jnp.asarray(rule(lv[:, None], lv[None, :]))


MASK_MISTAKES = {
    "a plain causal mask (j <= i): a token cannot see the later tokens of its own scale":
        lambda sc: jnp.tril(jnp.ones((sum(s * s for s in sc),) * 2, bool)),
    "transposed: each token sees its own and every FINER scale (k(j) >= k(i))":
        lambda sc: _mask_with(sc, lambda ki, kj: kj >= ki),
    "strictly coarser scales only (k(j) < k(i)): a token cannot see its own scale, and the "
    "first scale sees nothing":
        lambda sc: _mask_with(sc, lambda ki, kj: kj < ki),
    "block-diagonal: a token sees its own scale only, not the coarser ones":
        lambda sc: _mask_with(sc, lambda ki, kj: kj == ki),
}

register(
    "var.block_causal_mask",
    title="The block-causal mask",
    points=2,
    reference=var.block_causal_mask,
    cases=[Case(((1,),), label="one scale"), Case(((1, 2),), label="scales (1, 2)"),
           Case(((1, 2, 3, 4),), label="scales (1, 2, 3, 4)"),
           Case(((2, 3, 5),), label="scales (2, 3, 5)")],
    rtol=1e-5, atol=1e-5,
    wrong=MASK_MISTAKES,
    hint="give every token the index k of its scale (scale k has s_k * s_k tokens, in order); "
         "token i may attend to token j exactly when k(j) <= k(i)",
)


# --------------------------------------------------------------------------------------------
# var.quantise_step
# --------------------------------------------------------------------------------------------
def _quantise_cases(rng):
    cases = []
    for S, s, V, D in [(4, 1, 6, 3), (4, 2, 8, 2), (4, 3, 16, 4), (4, 4, 5, 3), (6, 2, 12, 8)]:
        rest = _f32(rng, S, S, D)
        book = _f32(rng, V, D, scale=0.8)
        cases.append(Case((rest, book, s), label=f"S={S}, size={s}, V={V}, D={D}"))
    # codes of very different norms: the dot product picks the longest, the distance the nearest
    book = device_array(rng.normal(size=(8, 3)) * rng.uniform(0.1, 5.0, size=(8, 1)), jnp.float32)
    cases.append(Case((_f32(rng, 4, 4, 3), book, 2), label="codes of very different norms"))
    return cases


def _quantise_with(rest, codebook, size, *, how="distance", resample=True, subtract=True):
    S = rest.shape[-2]
    r = var.downsample(rest, size) if resample else rest
    if how == "distance":
        z = jnp.argmin(jnp.sum(jnp.square(r[..., None, :] - codebook), -1), -1)
    elif how == "farthest":
        z = jnp.argmax(jnp.sum(jnp.square(r[..., None, :] - codebook), -1), -1)
    else:
        z = jnp.argmax(r @ codebook.T, -1)
    z = z.astype(jnp.int32)
    part = var.upsample(codebook[z], S) if resample else codebook[z]
    return z, part, (rest - part) if subtract else rest


QUANTISE_MISTAKES = {
    "the largest dot product r . e instead of the smallest distance ||r - e||^2 (it favours long "
    "codes)": lambda r, e, s: _quantise_with(r, e, s, how="dot"),
    "argmax of the distance: the farthest code, not the nearest":
        lambda r, e, s: _quantise_with(r, e, s, how="farthest"),
    "the residual is not subtracted: new_rest is the old rest":
        lambda r, e, s: _quantise_with(r, e, s, subtract=False),
}

register(
    "var.quantise_step",
    title="One step of residual quantisation",
    points=3,
    reference=quantise_step_reference,
    cases=_quantise_cases,
    rtol=1e-4, atol=1e-5,
    wrong={**QUANTISE_MISTAKES,
           "the full-resolution residual is quantised (no downsampling to size x size)":
               lambda r, e, s: _quantise_with(r, e, s, resample=False)},
    hint="downsample the residual to size x size, pick per cell the code at the smallest squared "
         "distance, look the codes up, upsample them back to S x S, and subtract",
)


# --------------------------------------------------------------------------------------------
# var.next_scale_inputs
# --------------------------------------------------------------------------------------------
def _inputs_cases(rng):
    cases = []
    for scales, V, D in [((1, 2), 4, 2), ((1, 2, 3, 4), 8, 3), ((1, 2, 4), 6, 4),
                         ((1, 3, 5), 10, 2)]:
        n = sum(s * s for s in scales)
        toks = device_array(rng.integers(0, V, size=n), jnp.int32)
        cases.append(Case((toks, _f32(rng, V, D), scales), label=f"scales {scales}, V={V}, D={D}"))
    toks = device_array(rng.integers(0, 8, size=(3, 30)), jnp.int32)
    cases.append(Case((toks, _f32(rng, 8, 3), (1, 2, 3, 4)), label="a batch of 3 sequences"))
    return cases


def _inputs_with(tokens, codebook, scales, *, cumulative=True, shift=0):
    parts = var.scale_contributions(tokens, codebook, scales)
    src = jnp.cumsum(parts, 0) if cumulative else parts
    D = parts.shape[-1]
    ins = [var.downsample(src[k + shift], s).reshape(*src.shape[1:-3], s * s, D)
           for k, s in enumerate(scales[1:])]
    return jnp.concatenate(ins, axis=-2)


INPUTS_MISTAKES = {
    "only the last scale's contribution, not the cumulative reconstruction of all coarser scales":
        lambda t, e, sc: _inputs_with(t, e, sc, cumulative=False),
    "off by one: the input of scale k includes scale k's own tokens (the answer leaks)":
        lambda t, e, sc: _inputs_with(t, e, sc, shift=1),
}

register(
    "var.next_scale_inputs",
    title="The next-scale inputs (teacher forcing)",
    points=3,
    reference=next_scale_inputs_reference,
    cases=_inputs_cases,
    rtol=1e-4, atol=1e-5,
    wrong=INPUTS_MISTAKES,
    hint="var.scale_contributions gives the K upsampled contributions; a running sum (cumsum over "
         "scales) gives the reconstruction after each scale; the input of scale k+1 is the one "
         "after scale k, downsampled to s_{k+1}; flatten each and concatenate",
)


# --------------------------------------------------------------------------------------------
# var.straight_through: judged by its value AND its gradient
# --------------------------------------------------------------------------------------------
def _st_cases(rng):
    return [Case((_f32(rng, *shape), _f32(rng, *shape)), label=f"shape {shape}")
            for shape in [(3,), (2, 4, 4, 8), (5, 2)]]


def _value_and_grads(fn, f, f_hat, w):
    """fn(f, f_hat) and the gradients of sum(w * fn(f, f_hat)) with respect to f and f_hat."""
    grads = jax.grad(lambda a, b: jnp.sum(w * fn(a, b)), argnums=(0, 1))(f, f_hat)
    return fn(f, f_hat), grads


def _st_test(fn, ex):
    run = compiled(functools.partial(_value_and_grads, fn))  # one program per case
    for case in ex.make_cases():
        f, f_hat = case.args
        w = device_array(np.arange(1.0, f.size + 1.0).reshape(f.shape), jnp.float32)
        value, (g_f, g_hat) = run(f, f_hat, w)
        assert_matches(value, f_hat, rtol=1e-5, atol=1e-6,
                       where=f"{case.label}: the value must be f_hat")
        try:
            assert_matches(g_f, w, rtol=1e-5, atol=1e-6)
        except CheckFailure:
            raise CheckFailure(f"{case.label}: the gradient with respect to f must be the incoming "
                               "gradient, unchanged (d out / d f = identity); yours is not "
                               "(is the stop-gradient around the wrong term?)") from None
        if np.any(np.asarray(g_hat) != 0):
            raise CheckFailure(f"{case.label}: no gradient may reach f_hat (the quantiser's output "
                               "is a constant for the backward pass)")
    return "value and gradient on 3 shapes"


register(
    "var.straight_through",
    title="The straight-through estimator",
    points=2,
    reference=var.straight_through,
    cases=_st_cases,
    test=_st_test,
    wrong={"returns f_hat itself: the encoder gets no gradient": lambda f, fh: fh,
           "returns f: the decoder never sees the quantised latent": lambda f, fh: f,
           "stops the gradient of f instead: f_hat + sg(f - f_hat)":
               lambda f, fh: fh + jax.lax.stop_gradient(f - fh)},
    hint="the forward value must equal f_hat, but the expression must be 'f plus something "
         "constant' for the backward pass: jax.lax.stop_gradient makes a term constant",
)


# --------------------------------------------------------------------------------------------
# var.guided_logits
# --------------------------------------------------------------------------------------------
def _cfg_cases(rng):
    cases = [Case((_f32(rng, 5), _f32(rng, 5), w), label=f"V=5, w={w}") for w in (0.0, 1.0)]
    cases += [Case((_f32(rng, 4, 7, 16, scale=3.0), _f32(rng, 4, 7, 16, scale=3.0), 2.5),
                   label="batch (4, 7, 16), w=2.5"),
              Case((_f32(rng, 3, 10, scale=50.0), _f32(rng, 3, 10, scale=50.0), 4.0),
                   label="large logits, w=4")]
    return cases


def _log_mix(c, u, w):
    return jnp.log((1 - w) * jax.nn.softmax(u, -1) + w * jax.nn.softmax(c, -1) + 1e-30)


CFG_MISTAKES = {
    "the two models are swapped: l_c + w (l_u - l_c)": lambda c, u, w: c + w * (u - c),
    "the (1 + w) convention: l_c + w (l_c - l_u), which is not the conditional model at w = 0 "
    "(see the docstring)": lambda c, u, w: c + w * (c - u),
    "the probabilities are mixed instead of the logits": _log_mix,
}

register(
    "var.guided_logits",
    title="Classifier-free guidance on logits",
    points=2,
    reference=guided_logits_reference,
    cases=_cfg_cases,
    rtol=1e-5, atol=1e-4,
    wrong=CFG_MISTAKES,
    hint="start from the unconditional logits and move w times along the difference that the "
         "label makes",
)
