"""Chapter 06 (attention): the causal mask, one attention head, grouped-query attention's head
mapping, the KV-cache size per token, RoPE, one cached decode step.

Each grader compares with the reference on fixed and random cases; when the answer differs, the
platform tries the classic mistakes of that exercise and names the one the answer matches on
every case.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import attention
from arcourse.course.grading import Case, CheckFailure, device_array, register
from arcourse.course.grading import normal_array as _f32

# --------------------------------------------------------------------------------------------
# attention.causal_mask
# --------------------------------------------------------------------------------------------
MASK_MISTAKES = {
    "the upper triangle (jnp.triu): every position sees the future, not the past":
        lambda n: jnp.triu(jnp.ones((n, n), bool)),
    "shifted by one: the diagonal is hidden (j < i), so a position cannot see itself":
        lambda n: jnp.tril(jnp.ones((n, n), bool), -1),
    "shifted by one: j <= i + 1, so every position sees the next token, the one it predicts":
        lambda n: jnp.tril(jnp.ones((n, n), bool), 1),
}

register(
    "attention.causal_mask",
    title="The causal mask",
    points=2,
    reference=attention.causal_mask,
    cases=[Case((n,), label=f"size {n}") for n in (1, 2, 5, 8)],
    rtol=1e-5, atol=1e-5,
    wrong={**MASK_MISTAKES, "all True: no mask at all":
           lambda n: jnp.ones((n, n), bool)},
    hint="Row i is the query, column j the key. Which entries of the matrix have j <= i: the "
         "lower triangle with or without the diagonal? A position's own token is part of its "
         "context. jnp has a function that keeps one triangle of a matrix.",
)


# --------------------------------------------------------------------------------------------
# attention.causal_attention: one head
# --------------------------------------------------------------------------------------------
@jax.jit  # compiled once per shape: the check runs in a fraction of a second
def _causal_attention(q, k, v):
    return attention.scaled_dot_product_attention(q, k, v, attention.causal_mask(q.shape[0]))


def causal_attention(q, k, v):
    r"""One causal head: $\mathrm{softmax}(QK^\top/\sqrt d + \text{mask})V$, q, k (T, d), v (T, dv)."""
    return _causal_attention(q, k, v)


def _attn_cases(rng):
    shapes = [(1, 4, 4), (5, 8, 8), (7, 16, 3), (12, 32, 32)]
    cases = [Case((_f32(rng, t, d, scale=2.0), _f32(rng, t, d, scale=2.0), _f32(rng, t, dv)),
                  label=f"T={t}, d={d}, dv={dv}") for t, d, dv in shapes]
    # scores in the hundreds: exp without subtracting the row maximum overflows
    cases.append(Case((_f32(rng, 6, 8, scale=12.0), _f32(rng, 6, 8, scale=12.0), _f32(rng, 6, 5)),
                      label="T=6, d=8, large scores"))
    return cases


def _attn_with(q, k, v, *, scale=True, shift=0, axis=-1):
    s = q @ k.T / (math.sqrt(q.shape[-1]) if scale else 1.0)
    mask = jnp.tril(jnp.ones((q.shape[0], q.shape[0]), bool), shift)
    s = jnp.where(mask, s, -jnp.inf)
    return jax.nn.softmax(s, axis=axis) @ v


ATTN_MISTAKES = {
    "the scores are not divided by sqrt(d)": lambda q, k, v: _attn_with(q, k, v, scale=False),
    "the mask is shifted by one: position i attends to j <= i+1 (it sees the next token)":
        lambda q, k, v: _attn_with(q, k, v, shift=1),
    "the mask is shifted by one: position i attends to j < i only (row 0 sees nothing: NaN)":
        lambda q, k, v: _attn_with(q, k, v, shift=-1),
    "softmax over the query axis (axis 0) instead of the key axis":
        lambda q, k, v: _attn_with(q, k, v, axis=0),
    "the mask is applied after the softmax (future weights zeroed, rows no longer sum to one)":
        lambda q, k, v: (jax.nn.softmax(q @ k.T / math.sqrt(q.shape[-1]), axis=-1)
                         * jnp.tril(jnp.ones((q.shape[0], q.shape[0])))) @ v,
    "the scores are divided by d, not sqrt(d)":
        lambda q, k, v: jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((q.shape[0],) * 2, bool)),
                                                 q @ k.T / q.shape[-1], -jnp.inf), -1) @ v,
}

register(
    "attention.causal_attention",
    title="Causal attention for one head",
    points=3,
    reference=causal_attention,
    cases=_attn_cases,
    rtol=1e-4, atol=1e-5,
    wrong=ATTN_MISTAKES,
    hint="Three steps: a (T, T) matrix of scores, query i against key j, scaled by one over the "
         "square root of the feature size; the future (j > i) removed BEFORE the softmax, so that "
         "each row renormalises over the past; the softmax taken across keys (each row sums to "
         "one), then the weighted average of the value rows.",
)


# --------------------------------------------------------------------------------------------
# attention.rope
# --------------------------------------------------------------------------------------------
_rope = jax.jit(attention.rope)


def rope_reference(x, positions):
    r"""Rotate each pair $(x_{2i}, x_{2i+1})$ of ``x`` (T, d) by $p_t \cdot 10000^{-2i/d}$."""
    return _rope(x, positions)


def _rope_cases(rng):
    cases = [Case((_f32(rng, 1, 2), device_array([3], np.int32)), label="one pair, position 3"),
             Case((_f32(rng, 6, 8), device_array(np.arange(6), np.int32)),
                  label="positions 0..5, d=8")]
    for t, d in [(5, 16), (9, 32)]:
        pos = device_array(rng.integers(0, 200, size=t), np.int32)
        cases.append(Case((_f32(rng, t, d), pos), label=f"random positions, d={d}"))
    return cases


def _rope_with(x, positions, *, exponent_factor=2, half_split=False, sign=1.0):
    d = x.shape[-1]
    theta = 10000.0 ** (-exponent_factor * jnp.arange(d // 2, dtype=jnp.float32) / d)
    ang = jnp.asarray(positions, jnp.float32)[:, None] * theta
    cos, sin = jnp.cos(ang), sign * jnp.sin(ang)
    if half_split:
        x1, x2 = x[:, : d // 2], x[:, d // 2:]
        return jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    x1, x2 = x[:, 0::2], x[:, 1::2]
    return jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], -1).reshape(x.shape)


ROPE_MISTAKES = {
    "the frequencies are 10000^(-i/d), not 10000^(-2i/d) (the pair index i counts pairs)":
        lambda x, p: _rope_with(x, p, exponent_factor=1),
    "the pairs are (i, i + d/2) (the 'half-split' layout); this exercise rotates adjacent "
    "pairs (2i, 2i+1)": lambda x, p: _rope_with(x, p, half_split=True),
    "rotated the wrong way (angle -p*theta): the sin terms have the wrong sign":
        lambda x, p: _rope_with(x, p, sign=-1.0),
    "rotated row t by its index t, not by positions[t]":
        lambda x, p: _rope_with(x, jnp.arange(x.shape[0])),
}

register(
    "attention.rope",
    title="Rotary position embeddings",
    points=3,
    reference=rope_reference,
    cases=_rope_cases,
    rtol=1e-4, atol=1e-4,
    wrong=ROPE_MISTAKES,
    hint="Build a (T, d/2) table of angles: row t is positions[t] times the d/2 frequencies, "
         "pair i's frequency being 10000 to the power -2i/d (i counts pairs, so it runs to d/2 - 1). "
         "The even features are the first coordinate of each pair, the odd ones the second. "
         "Rotate each pair by the 2x2 matrix of the text, then put the two rotated coordinates "
         "back in their places 2i and 2i+1 (stack on a new last axis, then reshape).",
)


# --------------------------------------------------------------------------------------------
# attention.attend_with_cache: one cached decode step
# --------------------------------------------------------------------------------------------
def _cache_cases(rng):
    cases = []
    for s, h, d, pos in [(4, 1, 4, 0), (6, 2, 8, 3), (8, 4, 16, 7), (16, 3, 8, 9)]:
        kc = _f32(rng, s, h, d)
        vc = _f32(rng, s, h, d)
        # rows beyond pos hold junk from an earlier sequence: they must be ignored
        cases.append(Case((_f32(rng, h, d, scale=2.0), _f32(rng, h, d, scale=2.0), _f32(rng, h, d),
                           kc, vc, pos), label=f"S={s}, H={h}, d={d}, pos={pos}"))
    return cases


def _cache_with(q, k_new, v_new, kc, vc, pos, *, write_at=0, strict=False, scale=True,
                write=True, masked=True):
    if write:
        kc = kc.at[pos + write_at].set(k_new)
        vc = vc.at[pos + write_at].set(v_new)
    s = jnp.einsum("hd,shd->hs", q, kc) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    j = jnp.arange(kc.shape[0])
    allowed = (j < pos) if strict else (j <= pos)
    if masked:
        s = jnp.where(allowed[None], s, -jnp.inf)
    out = jnp.einsum("hs,shd->hd", jax.nn.softmax(s, -1), vc)
    return out, kc, vc


def _cache_sliced(q, k_new, v_new, kc, vc, pos):
    """Right numbers with a concrete pos; a traced pos cannot size a slice."""
    kc, vc = kc.at[pos].set(k_new), vc.at[pos].set(v_new)
    s = jnp.einsum("hd,shd->hs", q, kc[: pos + 1]) / math.sqrt(q.shape[-1])
    return jnp.einsum("hs,shd->hd", jax.nn.softmax(s, -1), vc[: pos + 1]), kc, vc


CACHE_MISTAKES = {
    "the mask is shifted by one: attends to rows j < pos, missing the token just written":
        lambda *a: _cache_with(*a, strict=True),
    "the scores are not divided by sqrt(d)": lambda *a: _cache_with(*a, scale=False),
    "the new key and value are written at row pos + 1 instead of row pos":
        lambda *a: _cache_with(*a, write_at=1),
    "the new key and value are never written into the cache":
        lambda *a: _cache_with(*a, write=False),
    "attends over every row of the cache: rows after pos hold junk from an earlier sequence":
        lambda *a: _cache_with(*a, masked=False),
    "slices the cache to rows 0..pos (k_cache[:pos + 1]): a slice's size must be known when "
    "the function is compiled, and under jax.jit pos is traced": _cache_sliced,
}


def _cache_test(fn, ex):
    """The cases as usual, then one case with ``pos`` traced under ``jax.jit``, as in decoding."""
    summary = dataclasses.replace(ex, test=None).run(fn)
    case = ex.make_cases()[2]
    q, k_new, v_new, kc, vc, pos = case.args
    try:
        got = jax.jit(fn)(q, k_new, v_new, kc, vc, device_array(pos, np.int32))
    except Exception as e:  # noqa: BLE001 - the learner's code under jit may raise anything
        raise CheckFailure(
            f"{case.label} with pos traced under jax.jit (as in a compiled decoding loop): your "
            f"function raised {type(e).__name__}. Inside jit, pos is not a Python int: write "
            "with .at[pos].set(...) and hide the rows after pos with a mask over all S rows, "
            "not a slice") from None
    from arcourse.course.grading import assert_matches

    assert_matches(got, ex.reference(*case.args), rtol=ex.rtol, atol=ex.atol,
                   where=f"{case.label}, pos traced under jax.jit")
    return summary + " and a traced pos under jax.jit"


register(
    "attention.attend_with_cache",
    title="One cached decode step",
    points=3,
    reference=jax.jit(attention.attend_with_cache),
    cases=_cache_cases,
    test=_cache_test,
    rtol=1e-4, atol=1e-5,
    wrong=CACHE_MISTAKES,
    hint="First update the two caches: the new key and value belong in row pos (arrays are "
         "immutable: the .at[...].set(...) idiom returns an updated copy). Then, for every head h, "
         "score the query against the keys of all S rows of that head, scaled by one over the "
         "square root of d; rows after pos must get weight zero, so hide them with a mask built "
         "by comparing the row index with pos (a comparison works on a traced pos, a slice does "
         "not). Softmax over the rows, and average the value rows with those weights.",
)


# --------------------------------------------------------------------------------------------
# attention.gqa_attention: splitting heads for grouped-query attention
# --------------------------------------------------------------------------------------------
_gqa = jax.jit(attention.gqa_attention, static_argnums=(3, 4))


def gqa_reference(q, k, v, num_heads, num_kv_heads):
    r"""Causal GQA on flat projections: q (T, H*d), k, v (T, G*d) -> (T, H*d); head $h$ reads
    key/value head $\lfloor h G / H \rfloor$."""
    return _gqa(q, k, v, num_heads, num_kv_heads)


def _gqa_cases(rng):
    cases = []
    for t, h, g, d, scale in [(1, 2, 1, 4, 1.0), (5, 4, 4, 8, 1.5), (6, 4, 1, 8, 1.5),
                              (7, 4, 2, 4, 1.5), (9, 6, 3, 4, 1.5), (8, 8, 2, 4, 1.5),
                              (6, 4, 2, 8, 10.0)]:
        label = f"T={t}, H={h}, G={g}, d={d}" + (", large scores" if scale > 2 else "")
        cases.append(Case((_f32(rng, t, h * d, scale=scale), _f32(rng, t, g * d, scale=scale),
                           _f32(rng, t, g * d), h, g), label=label))
    return cases


def _gqa_with(q, k, v, H, G, *, kv_of=None, split="head-major", merge="head-major",
              causal=True, scale=True):
    T = q.shape[0]
    d = q.shape[1] // H

    def heads(x, n):
        if split == "head-major":
            return x.reshape(T, n, d).transpose(1, 0, 2)  # (n, T, d)
        return x.reshape(T, d, n).transpose(2, 0, 1)  # feature-major: head h = features h::n

    qh, kh, vh = heads(q, H), heads(k, G), heads(v, G)
    kv_of = (lambda h: h // (H // G)) if kv_of is None else kv_of
    idx = jnp.asarray([kv_of(h) for h in range(H)])
    kh, vh = kh[idx], vh[idx]
    s = jnp.einsum("htd,hsd->hts", qh, kh) / (math.sqrt(d) if scale else 1.0)
    if causal:
        s = jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)
    out = jnp.einsum("hts,hsd->htd", jax.nn.softmax(s, -1), vh)  # (H, T, d)
    if merge == "head-major":
        return out.transpose(1, 0, 2).reshape(T, H * d)
    return out.reshape(T, H * d)  # forgot to move the head axis back after the time axis


GQA_MISTAKES = {
    "interleaved mapping: query head h reads key/value head h % G (jnp.tile of the key/value "
    "heads); grouped-query attention gives H/G CONSECUTIVE query heads to each key/value head "
    "(jnp.repeat)": lambda q, k, v, H, G: _gqa_with(q, k, v, H, G, kv_of=lambda h: h % G),
    "split the features the wrong way: head h is the contiguous block of features "
    "h*d .. (h+1)*d - 1, not every H-th feature": lambda q, k, v, H, G: _gqa_with(
        q, k, v, H, G, split="feature-major", merge="feature-major"),
    "the heads are merged back in the wrong order: an output row must be the H heads' outputs "
    "side by side for that position (move the head axis next to the feature axis before "
    "reshaping)": lambda q, k, v, H, G: _gqa_with(q, k, v, H, G, merge="time-major"),
    "no causal mask: position i reads the future": lambda q, k, v, H, G: _gqa_with(
        q, k, v, H, G, causal=False),
    "the scores are not divided by sqrt(d) (d is the head size, not H*d)":
        lambda q, k, v, H, G: _gqa_with(q, k, v, H, G, scale=False),
    "the scores are divided by the square root of the whole width H*d, not of the head size d":
        lambda q, k, v, H, G: _gqa_with(q * math.sqrt(1.0 / H), k, v, H, G),
}

register(
    "attention.gqa_attention",
    title="Splitting heads for grouped-query attention",
    points=3,
    reference=gqa_reference,
    cases=_gqa_cases,
    rtol=1e-4, atol=1e-5,
    wrong=GQA_MISTAKES,
    hint="Step 1: from the widths, the head size d is q's width over H, and k and v hold G heads "
         "of that size. Step 2: reshape each projection so that a head axis appears; head h must "
         "be the contiguous block of features h*d .. (h+1)*d - 1. Step 3: decide, for every query "
         "head, which key/value head it reads: the query heads come in G groups of H/G "
         "neighbours, and group g shares key/value head g; make the key/value heads as many as "
         "the query heads by repeating each one H/G times in place (not by tiling the whole set). "
         "Step 4: causal attention for every head at once (the reference attention accepts a "
         "leading head axis). Step 5: put the heads' outputs "
         "back side by side for each position, the inverse of step 2.",
)


# --------------------------------------------------------------------------------------------
# attention.kv_cache_bytes
# --------------------------------------------------------------------------------------------
def kv_cache_bytes(num_layers, num_heads, num_kv_heads, head_dim, bytes_per_number):
    r"""Bytes of KV cache per token of a model with ``num_heads`` query heads sharing
    ``num_kv_heads`` key/value heads: $2 \cdot L \cdot G \cdot d_{head} \cdot b$."""
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
    return attention.kv_cache_bytes_per_token(num_layers, num_kv_heads, head_dim, bytes_per_number)


def _bytes_cases(rng):
    return [Case((12, 12, 12, 64, 2), label="GPT-2 small, MHA, bf16"),
            Case((32, 32, 8, 128, 2), label="Llama-like, GQA 32/8, bf16"),
            Case((2, 4, 1, 16, 4), label="MQA, float32"),
            Case((3, 8, 2, 8, 4), label="GQA 8/2, float32"),
            Case((1, 6, 3, 8, 1), label="GQA 6/3, one byte per number (int8)")]


def _whole_numbers_as_int(fn):
    """The answer with a whole-number float (4096.0) read as the integer it holds: the docstring
    accepts an int or a float of a whole number."""

    def wrapped(*args, **kwargs):
        out = fn(*args, **kwargs)
        try:
            a = np.asarray(out)
        except Exception:  # noqa: BLE001 - let the comparison describe what came back
            return out
        if a.dtype.kind == "f" and a.ndim == 0 and np.isfinite(a) and float(a) == round(float(a)):
            return int(round(float(a)))
        return out

    return wrapped


def _bytes_test(fn, ex):
    return dataclasses.replace(ex, test=None).run(_whole_numbers_as_int(fn))


register(
    "attention.kv_cache_bytes",
    title="KV-cache bytes per token",
    points=1,
    reference=kv_cache_bytes,
    cases=_bytes_cases,
    test=_bytes_test,
    rtol=1e-5, atol=1e-5,
    wrong={
        "counted only the keys (or only the values): the factor 2 is missing":
            lambda L, H, G, dh, b: L * G * dh * b,
        "used the number of query heads: only the key/value heads are cached":
            lambda L, H, G, dh, b: 2 * L * H * dh * b,
        "bits instead of bytes": lambda L, H, G, dh, b: 2 * L * G * dh * b * 8,
        "used the group size H/G (query heads per key/value head) instead of the number of "
        "key/value heads G":
            lambda L, H, G, dh, b: 2 * L * (H // G) * dh * b,
    },
    hint="What is stored for one token? For every layer, for every key/value head (the query "
         "heads share them, so count G, not H), a key vector and a value vector of d_head numbers "
         "each, and every number takes bytes_per_number bytes. Multiply the counts.",
)
