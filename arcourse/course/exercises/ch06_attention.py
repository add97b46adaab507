"""Chapter 06 (attention): the causal mask, one attention head, RoPE, one cached decode step,
the KV-cache size per token.

Each grader compares with the reference on fixed and random cases; when the answer differs, it
also tries the classic mistakes of that exercise and names the one the answer matches.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from arcourse import attention
from arcourse.course.grading import Case, register


def _f32(rng, *shape, scale=1.0):
    return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


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
    hint="mask[i, j] is True exactly when j <= i: jnp.tril of a (size, size) array of True",
)


# --------------------------------------------------------------------------------------------
# attention.causal_attention: one head
# --------------------------------------------------------------------------------------------
def causal_attention(q, k, v):
    r"""One causal head: $\mathrm{softmax}(QK^\top/\sqrt d + \text{mask})V$, q, k (T, d), v (T, dv)."""
    return attention.scaled_dot_product_attention(q, k, v, attention.causal_mask(q.shape[0]))


def _attn_cases(rng):
    shapes = [(1, 4, 4), (5, 8, 8), (7, 16, 3), (12, 32, 32)]
    return [Case((_f32(rng, t, d, scale=2.0), _f32(rng, t, d, scale=2.0), _f32(rng, t, dv)),
                 label=f"T={t}, d={d}, dv={dv}") for t, d, dv in shapes]


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
}

register(
    "attention.causal_attention",
    title="Causal attention for one head",
    points=3,
    reference=causal_attention,
    cases=_attn_cases,
    rtol=1e-4, atol=1e-5,
    wrong=ATTN_MISTAKES,
    hint="scores = q @ k.T / sqrt(d); set the scores where j > i to -inf (jnp.where with the "
         "causal mask); softmax over the last axis; multiply by v",
)


# --------------------------------------------------------------------------------------------
# attention.rope
# --------------------------------------------------------------------------------------------
def rope_reference(x, positions):
    r"""Rotate each pair $(x_{2i}, x_{2i+1})$ of ``x`` (T, d) by $p_t \cdot 10000^{-2i/d}$."""
    return attention.rope(x, positions)


def _rope_cases(rng):
    cases = [Case((_f32(rng, 1, 2), jnp.array([3])), label="one pair, position 3"),
             Case((_f32(rng, 6, 8), jnp.arange(6)), label="positions 0..5, d=8")]
    for t, d in [(5, 16), (9, 32)]:
        pos = jnp.asarray(rng.integers(0, 200, size=t), jnp.int32)
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
}

register(
    "attention.rope",
    title="Rotary position embeddings",
    points=3,
    reference=rope_reference,
    cases=_rope_cases,
    rtol=1e-4, atol=1e-4,
    wrong=ROPE_MISTAKES,
    hint="theta = 10000 ** (-jnp.arange(0, d, 2) / d); angles = positions[:, None] * theta; "
         "x1, x2 = x[:, 0::2], x[:, 1::2]; stack (x1 cos - x2 sin, x1 sin + x2 cos) on a new "
         "last axis and reshape back to (T, d)",
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
                write=True):
    if write:
        kc = kc.at[pos + write_at].set(k_new)
        vc = vc.at[pos + write_at].set(v_new)
    s = jnp.einsum("hd,shd->hs", q, kc) / (math.sqrt(q.shape[-1]) if scale else 1.0)
    j = jnp.arange(kc.shape[0])
    allowed = (j < pos) if strict else (j <= pos)
    s = jnp.where(allowed[None], s, -jnp.inf)
    out = jnp.einsum("hs,shd->hd", jax.nn.softmax(s, -1), vc)
    return out, kc, vc


CACHE_MISTAKES = {
    "the mask is shifted by one: attends to rows j < pos, missing the token just written":
        lambda *a: _cache_with(*a, strict=True),
    "the scores are not divided by sqrt(d)": lambda *a: _cache_with(*a, scale=False),
    "the new key and value are written at row pos + 1 instead of row pos":
        lambda *a: _cache_with(*a, write_at=1),
    "the new key and value are never written into the cache":
        lambda *a: _cache_with(*a, write=False),
}

register(
    "attention.attend_with_cache",
    title="One cached decode step",
    points=3,
    reference=attention.attend_with_cache,
    cases=_cache_cases,
    rtol=1e-4, atol=1e-5,
    wrong=CACHE_MISTAKES,
    hint="k_cache = k_cache.at[pos].set(k_new) (same for v); scores[h, j] = q[h] . k_cache[j, h] "
         "/ sqrt(d); keep j <= pos; softmax over j; out[h] = sum_j weights[h, j] v_cache[j, h]",
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
            Case((3, 8, 2, 8, 4), label="GQA 8/2, float32")]


register(
    "attention.kv_cache_bytes",
    title="KV-cache bytes per token",
    points=1,
    reference=kv_cache_bytes,
    cases=_bytes_cases,
    rtol=1e-5, atol=1e-5,
    wrong={
        "counted only the keys (or only the values): the factor 2 is missing":
            lambda L, H, G, dh, b: L * G * dh * b,
        "used the number of query heads: only the key/value heads are cached":
            lambda L, H, G, dh, b: 2 * L * H * dh * b,
        "bits instead of bytes": lambda L, H, G, dh, b: 2 * L * G * dh * b * 8,
    },
    hint="keys and values (2) for every layer (L), key/value head (G) and feature (d_head), "
         "each taking bytes_per_number bytes",
)
