r"""Causal self-attention and the pieces of the modern transformer block.

* :func:`causal_mask` — $M_{ij} = [j \le i]$: position $i$ may look at itself and the past.
* :func:`scaled_dot_product_attention` —
  $\mathrm{Attn}(Q,K,V) = \mathrm{softmax}\big(QK^\top/\sqrt{d} + \log M\big)\,V$.
* :func:`rope` — rotary position embeddings (Su et al. 2021): rotate each pair
  $(x_{2i}, x_{2i+1})$ by the angle $p\,\theta_i$, $\theta_i = b^{-2i/d}$, so that
  $\langle R_p q, R_s k\rangle$ depends on $p - s$ only.
* :func:`rms_norm` / :class:`RMSNorm` — $x / \sqrt{\overline{x^2} + \epsilon} \odot g$
  (Zhang & Sennrich 2019).
* :class:`SwiGLU` — $W_2\,(\mathrm{silu}(W_1 x) \odot W_3 x)$ (Shazeer 2020).
* :class:`CausalSelfAttention` — multi-head attention with grouped-query attention (Ainslie et
  al. 2023): $H$ query heads share $G$ key/value heads, $H/G$ query heads per group; $G = H$ is
  multi-head attention, $G = 1$ multi-query attention (Shazeer 2019). It runs on a whole sequence
  (training, prefill) or one token at a time against a key/value cache (decoding).
* :func:`gqa_attention` — causal grouped-query attention on flat projections (T, H d_head) and
  (T, G d_head): head $h$ is features $h d_{head} .. (h+1) d_{head} - 1$ and reads key/value head
  $\lfloor h G / H \rfloor$ (the chapter-06 exercise's reference).
* :func:`kv_cache_bytes_per_token` — $2 \cdot L \cdot G \cdot d_{head} \cdot$ bytes per number.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from arcourse._checks import check_int as _check_int
from arcourse.layers import GeluMLP, RMSNorm, SwiGLU, rms_norm

__all__ = [
    "causal_mask",
    "attention_weights",
    "scaled_dot_product_attention",
    "rope_angles",
    "rope",
    "rms_norm",
    "RMSNorm",
    "SwiGLU",
    "GeluMLP",
    "LayerKV",
    "CausalSelfAttention",
    "attend_with_cache",
    "gqa_attention",
    "grouped_attention_weights",
    "kv_cache_bytes_per_token",
]


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------
def causal_mask(size: int) -> jax.Array:
    r"""Boolean ``(size, size)`` mask with ``mask[i, j] = j <= i`` (lower triangle and diagonal)."""
    size = _check_int("size", size)
    return jnp.tril(jnp.ones((size, size), dtype=bool))


def attention_weights(q: jax.Array, k: jax.Array, mask: jax.Array | None = None) -> jax.Array:
    r"""$A = \mathrm{softmax}_j\big(q_i \cdot k_j / \sqrt{d}\big)$ over the allowed $j$.

    ``q`` (..., Tq, d), ``k`` (..., Tk, d), boolean ``mask`` broadcastable to (..., Tq, Tk)
    (True = may attend). Returns (..., Tq, Tk), rows summing to one. Masked scores are set to the
    most negative finite number, not $-\infty$, so a fully masked row gives no NaN.
    """
    q, k = jnp.asarray(q), jnp.asarray(k)
    if q.ndim < 2 or k.ndim < 2:
        raise ValueError(f"q and k need at least 2 dimensions (T, d); got {q.shape} and {k.shape}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share their last (feature) size; got {q.shape} and {k.shape}")
    scores = jnp.einsum("...qd,...kd->...qk", q, k) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jax.nn.softmax(scores, axis=-1)


def scaled_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                                 mask: jax.Array | None = None) -> jax.Array:
    r"""$\mathrm{softmax}(QK^\top/\sqrt{d}\ \text{masked})\,V$.

    ``q`` (..., Tq, d), ``k`` (..., Tk, d), ``v`` (..., Tk, dv), ``mask`` (..., Tq, Tk) boolean,
    True where attending is allowed. Returns (..., Tq, dv).
    """
    v = jnp.asarray(v)
    if v.shape[-2] != jnp.shape(k)[-2]:
        raise ValueError(f"k and v must have the same number of positions; got {jnp.shape(k)} "
                         f"and {v.shape}")
    return jnp.einsum("...qk,...kd->...qd", attention_weights(q, k, mask), v)


# --------------------------------------------------------------------------------------------
# Rotary position embeddings
# --------------------------------------------------------------------------------------------
def rope_angles(positions: jax.Array, dim: int, base: float = 10000.0) -> jax.Array:
    r"""Angles $p\,\theta_i$ with $\theta_i = b^{-2i/d}$, $i = 0..d/2-1$: shape positions.shape + (d/2,)."""
    dim = _check_int("dim", dim, 2)
    if dim % 2:
        raise ValueError(f"dim must be even (RoPE rotates pairs of features), got {dim}")
    if base <= 1:
        raise ValueError(f"base must be > 1, got {base!r}")
    theta = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    return jnp.asarray(positions, jnp.float32)[..., None] * theta


def rope(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    r"""Rotate every pair $(x_{2i}, x_{2i+1})$ of ``x`` by the angle $p\,\theta_i$.

    $$\begin{pmatrix} x'_{2i} \\ x'_{2i+1} \end{pmatrix} =
      \begin{pmatrix} \cos p\theta_i & -\sin p\theta_i \\ \sin p\theta_i & \cos p\theta_i
      \end{pmatrix} \begin{pmatrix} x_{2i} \\ x_{2i+1} \end{pmatrix}$$

    ``x`` (..., T, d) with d even; integer ``positions`` broadcastable to ``x.shape[:-1]``: the
    position $p$ of each vector. A rotation preserves norms, and $\langle R_p q, R_s k \rangle$ is a function
    of $p - s$: attention scores see relative positions only.
    """
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] % 2:
        raise ValueError(f"x must have an even last dimension; got shape {x.shape}")
    ang = rope_angles(positions, x.shape[-1], base)  # (..., T, d/2)
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    out = jnp.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------------------------
# Multi-head / grouped-query attention with a KV cache
# --------------------------------------------------------------------------------------------
class LayerKV(NamedTuple):
    """One layer's key/value cache: ``k`` and ``v`` of shape (B, S, G, d_head)."""

    k: jax.Array
    v: jax.Array


def _by_group(q, k):
    """Arrange query heads by their key/value head: q (B, Tq, H, dh) -> (B, G, H/G, Tq, dh), k
    (B, Tk, G, dh) -> (B, G, 1, Tk, dh). Query head h reads key/value head h // (H / G): the one
    place where the GQA head mapping is written."""
    B, Tq, H, dh = q.shape
    G = k.shape[2]
    qg = q.reshape(B, Tq, G, H // G, dh).transpose(0, 2, 3, 1, 4)
    return qg, k.transpose(0, 2, 1, 3)[:, :, None]


def _grouped_attention(q, k, v, mask):
    """q (B, Tq, H, dh); k, v (B, Tk, G, dh); mask broadcastable to (B, Tq, Tk) -> (B, Tq, H, dh)."""
    B, Tq, H, dh = q.shape
    qg, kg = _by_group(q, k)
    _, vg = _by_group(q, v)
    out = scaled_dot_product_attention(qg, kg, vg, mask[:, None, None])  # (B, G, H/G, Tq, dh)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, Tq, H, dh)


def grouped_attention_weights(q, k, mask):
    """The attention weights of :func:`_grouped_attention`, per query head: (B, H, Tq, Tk)."""
    B, Tq, H, _ = q.shape
    qg, kg = _by_group(q, k)
    w = attention_weights(qg, kg, mask[:, None, None])  # (B, G, H/G, Tq, Tk)
    return w.reshape(B, H, Tq, k.shape[1])


class CausalSelfAttention(nnx.Module):
    r"""Causal multi-head self-attention with ``num_kv_heads`` key/value heads (GQA).

    $\mathrm{head}_h = \mathrm{Attn}(X W^Q_h,\ X W^K_{g(h)},\ X W^V_{g(h)})$ with
    $g(h) = \lfloor h G / H \rfloor$; the heads are concatenated and projected by $W^O$.
    ``num_kv_heads = num_heads`` is MHA, ``num_kv_heads = 1`` is MQA. With ``use_rope`` the
    queries and keys are rotated by their absolute positions (:func:`rope`).
    """

    def __init__(self, dim: int, num_heads: int, *, num_kv_heads: int | None = None,
                 use_rope: bool = True, rope_base: float = 10000.0, rngs: nnx.Rngs):
        dim, num_heads = _check_int("dim", dim), _check_int("num_heads", num_heads)
        num_kv_heads = num_heads if num_kv_heads is None else _check_int("num_kv_heads",
                                                                         num_kv_heads)
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be divisible by "
                             f"num_kv_heads={num_kv_heads}")
        self.dim, self.num_heads, self.num_kv_heads = dim, num_heads, num_kv_heads
        self.head_dim = dim // num_heads
        if use_rope and self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head size, got dim/num_heads={self.head_dim}")
        self.use_rope, self.rope_base = use_rope, rope_base
        self.wq = nnx.Linear(dim, num_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.wk = nnx.Linear(dim, num_kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.wv = nnx.Linear(dim, num_kv_heads * self.head_dim, use_bias=False, rngs=rngs)
        self.wo = nnx.Linear(num_heads * self.head_dim, dim, use_bias=False, rngs=rngs)

    def qkv(self, x, positions):
        """Project ``x`` (B, T, dim) to q (B, T, H, dh), k and v (B, T, G, dh); RoPE on q, k."""
        B, T, _ = x.shape
        q = self.wq(x).reshape(B, T, self.num_heads, self.head_dim)
        k = self.wk(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        v = self.wv(x).reshape(B, T, self.num_kv_heads, self.head_dim)
        if self.use_rope:
            pos = jnp.asarray(positions)[:, None]  # (T, 1): the same position for every head
            q, k = rope(q, pos, self.rope_base), rope(k, pos, self.rope_base)
        return q, k, v

    def __call__(self, x, *, return_kv: bool = False):
        """Self-attention over a whole sequence ``x`` (B, T, dim) -> (B, T, dim).

        With ``return_kv`` also returns the :class:`LayerKV` of the sequence (for a prefill).
        """
        B, T, _ = x.shape
        q, k, v = self.qkv(x, jnp.arange(T))
        out = _grouped_attention(q, k, v, causal_mask(T)[None])
        y = self.wo(out.reshape(B, T, self.dim))
        return (y, LayerKV(k, v)) if return_kv else y

    def extend(self, x, cache: LayerKV, pos):
        """``K`` new tokens per row: ``x`` (B, K, dim) at positions ``pos .. pos+K-1`` (``pos`` a
        traced int).

        Writes their keys and values into ``cache`` from ``pos`` on; token ``i`` attends over
        positions ``0..pos+i``. Returns (y (B, K, dim), the updated cache). ``K = 1`` is one
        decoding step; ``K > 1`` scores several tokens at once (speculative decoding).
        """
        B, K, _ = x.shape
        positions = pos + jnp.arange(K)
        q, k, v = self.qkv(x, positions)
        ck = jax.lax.dynamic_update_slice_in_dim(cache.k, k.astype(cache.k.dtype), pos, axis=1)
        cv = jax.lax.dynamic_update_slice_in_dim(cache.v, v.astype(cache.v.dtype), pos, axis=1)
        mask = (jnp.arange(ck.shape[1])[None, :] <= positions[:, None])[None]  # (1, K, S)
        out = _grouped_attention(q, ck, cv, mask)
        return self.wo(out.reshape(B, K, self.dim)), LayerKV(ck, cv)

    def decode(self, x, cache: LayerKV, pos):
        """One new token per row: ``x`` (B, dim) at position ``pos``; :meth:`extend` with K = 1.
        Returns (y (B, dim), the updated cache)."""
        y, cache = self.extend(x[:, None, :], cache, pos)
        return y[:, 0], cache


def attend_with_cache(q, k_new, v_new, k_cache, v_cache, pos):
    r"""One cached decode step of one attention layer (no projections), the exercise's reference.

    ``q``, ``k_new``, ``v_new``: (H, d) for the token at position ``pos``; ``k_cache``,
    ``v_cache``: (S, H, d). Write ``k_new``/``v_new`` at row ``pos``, then each head attends over
    rows $0..pos$: $o_h = \sum_{j \le pos} \mathrm{softmax}_j(q_h \cdot K_{j,h}/\sqrt d)\,V_{j,h}$.
    Returns (o (H, d), k_cache, v_cache).
    """
    k_cache = jax.lax.dynamic_update_slice_in_dim(k_cache, k_new[None], pos, axis=0)
    v_cache = jax.lax.dynamic_update_slice_in_dim(v_cache, v_new[None], pos, axis=0)
    mask = (jnp.arange(k_cache.shape[0]) <= pos)[None, None, :]  # (1, 1, S)
    out = scaled_dot_product_attention(q[:, None, :], k_cache.swapaxes(0, 1),
                                       v_cache.swapaxes(0, 1), mask)
    return out[:, 0, :], k_cache, v_cache


def gqa_attention(q, k, v, num_heads: int, num_kv_heads: int):
    r"""Causal grouped-query attention on flat projections, one sequence.

    ``q`` (T, H * d) holds the H query heads side by side (head $h$ is features
    $h d .. (h+1) d - 1$), ``k`` and ``v`` (T, G * d) the G key/value heads in the same layout.
    Query head $h$ attends, causally and with scores divided by $\sqrt d$, over key/value head
    $g(h) = \lfloor h G / H \rfloor$: the heads are grouped, $H/G$ consecutive query heads per
    key/value head. Returns the heads' outputs side by side again, (T, H * d): the layout
    :class:`CausalSelfAttention` feeds to $W^O$.
    """
    num_heads, num_kv_heads = _check_int("num_heads", num_heads), _check_int("num_kv_heads",
                                                                             num_kv_heads)
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if num_heads % num_kv_heads:
        raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
    T, width = q.shape
    if width % num_heads or k.shape != (T, width // num_heads * num_kv_heads) or k.shape != v.shape:
        raise ValueError(f"q must be (T, H*d) and k, v (T, G*d) with H={num_heads}, "
                         f"G={num_kv_heads}; got {q.shape}, {k.shape}, {v.shape}")
    d = width // num_heads
    out = _grouped_attention(q.reshape(1, T, num_heads, d), k.reshape(1, T, num_kv_heads, d),
                             v.reshape(1, T, num_kv_heads, d), causal_mask(T)[None])
    return out.reshape(T, width)


def kv_cache_bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int,
                             bytes_per_number: int = 4) -> int:
    r"""Bytes the KV cache holds per token: $2 \cdot L \cdot G \cdot d_{head} \cdot b$.

    The 2 counts keys and values; $G$ is the number of key/value heads ($H$ for MHA, $1$ for
    MQA), not the number of query heads.
    """
    return (2 * _check_int("num_layers", num_layers) * _check_int("num_kv_heads", num_kv_heads)
            * _check_int("head_dim", head_dim) * _check_int("bytes_per_number", bytes_per_number))
