r"""VAR: visual autoregressive modelling by next-scale prediction (Tian et al. 2024), chapter 09.

An image is tokenised at $K$ scales $s_1 < \dots < s_K$ by a **multi-scale residual VQ-VAE**: the
encoder maps the image to a latent $f \in \mathbb{R}^{S \times S \times D}$ ($S = s_K$), and the
residual is quantised coarse to fine with one shared codebook $E \in \mathbb{R}^{V \times D}$,

$$r_0 = f, \quad z_k = \arg\min_v \big\| \mathrm{down}_{s_k}(r_{k-1}) - e_v \big\|^2 \ \text{(per cell)},
  \quad r_k = r_{k-1} - \mathrm{up}_S(E[z_k]), \qquad
  \hat f = \sum_{k=1}^K \mathrm{up}_S(E[z_k]) = f - r_K .$$

``down`` is area averaging and ``up`` bilinear interpolation (:func:`resize`). The decoder maps
$\hat f$ back to pixels; gradients cross the quantiser by the straight-through estimator
$f + \mathrm{sg}(\hat f - f)$ (:func:`straight_through`).

The **VAR transformer** then models $p(z_1, \dots, z_K \mid y) = \prod_k p(z_k \mid z_{<k}, y)$:
all $s_k^2$ tokens of scale $k$ at once, given every coarser scale. With $s_1 = 1$ it reads one
sequence of $N = \sum_k s_k^2$ positions (the class token, then the $N - 1$
:func:`next_scale_inputs`), under the **block-causal mask** (:func:`block_causal_mask`): a token
sees its own scale and every coarser one, never a finer one. Generation takes $K$ steps.
The same transformer with a plain causal mask and the previous token as input is a raster-order
autoregressive model over the same $N$ tokens: $N$ steps (``mode="ar"``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse._checks import as_array, check_choice, check_int, check_positive_float
from arcourse.attention import causal_mask, scaled_dot_product_attention
from arcourse.layers import RMSNorm, SwiGLU, rms_norm

__all__ = [
    "check_scales",
    "token_levels",
    "block_causal_mask",
    "area_matrix",
    "bilinear_matrix",
    "resize",
    "downsample",
    "upsample",
    "quantise_step",
    "multiscale_quantise",
    "scale_contributions",
    "next_scale_inputs",
    "straight_through",
    "guided_logits",
    "VQVAE",
    "VARTransformer",
    "token_loss",
    "sample",
    "code_usage",
]


# --------------------------------------------------------------------------------------------
# Scales and the block-causal mask
# --------------------------------------------------------------------------------------------
def check_scales(scales, *, first_is_one: bool = False) -> tuple[int, ...]:
    """``scales`` as a tuple of strictly increasing positive ints (starting at 1 if
    ``first_is_one``: VAR's first scale is the single token predicted from the class token)."""
    if isinstance(scales, int | np.integer) or len(scales) == 0:
        raise ValueError(f"scales must be a non-empty sequence of sizes, got {scales!r}")
    out = tuple(check_int(f"scales[{i}]", s) for i, s in enumerate(scales))
    if any(b <= a for a, b in zip(out, out[1:])):
        raise ValueError(f"scales must be strictly increasing, got {out}")
    if first_is_one and out[0] != 1:
        raise ValueError(f"the first scale must be 1 (one token, predicted from the class token), "
                         f"got {out}")
    return out


def token_levels(scales) -> np.ndarray:
    r"""The scale index $k$ of every token, in sequence order: ``int32[N]``, $N = \sum_k s_k^2$."""
    scales = check_scales(scales)
    return np.repeat(np.arange(len(scales), dtype=np.int32), [s * s for s in scales])


def block_causal_mask(scales) -> jax.Array:
    r"""Boolean ``(N, N)`` mask, $M_{ij} = [\,k(j) \le k(i)\,]$ with $k(\cdot)$ the scale of a token.

    Full attention inside a scale and to every coarser scale, none to a finer one. For
    ``scales = (1, 2)``: row 0 sees column 0; rows 1-4 see columns 0-4.
    """
    lv = token_levels(scales)
    return jnp.asarray(lv[None, :] <= lv[:, None])


# --------------------------------------------------------------------------------------------
# Resizing: area averaging down, bilinear up
# --------------------------------------------------------------------------------------------
@functools.cache
def area_matrix(size_out: int, size_in: int) -> np.ndarray:
    r"""$A \in \mathbb{R}^{s \times S}$: output cell $i$ averages the input interval
    $[iS/s, (i+1)S/s)$, weighting each input cell by its overlap (area interpolation).

    Rows sum to one; $A = I$ when $s = S$.
    """
    s, S = check_int("size_out", size_out), check_int("size_in", size_in)
    a = np.zeros((s, S))
    for i in range(s):
        lo, hi = i * S / s, (i + 1) * S / s
        for j in range(S):
            a[i, j] = max(0.0, min(hi, j + 1) - max(lo, j))
    a /= a.sum(1, keepdims=True)
    a.setflags(write=False)
    return a


@functools.cache
def bilinear_matrix(size_out: int, size_in: int) -> np.ndarray:
    r"""$U \in \mathbb{R}^{S \times s}$: linear interpolation with half-pixel centres (input cell
    $j$ sits at $(j + \frac12)\,S/s$), edges clamped. Rows sum to one; $U = I$ when $S = s$."""
    S, s = check_int("size_out", size_out), check_int("size_in", size_in)
    u = np.zeros((S, s))
    for i in range(S):
        x = min(max((i + 0.5) * s / S - 0.5, 0.0), s - 1.0)
        j = int(np.floor(x))
        w = x - j
        u[i, j] += 1.0 - w
        u[i, min(j + 1, s - 1)] += w
    u.setflags(write=False)
    return u


def resize(x: jax.Array, size: int) -> jax.Array:
    r"""Resize the two axes before the last of ``x`` (..., h, h, D) to (..., size, size, D).

    Down (``size < h``): area averaging, :func:`area_matrix`. Up: bilinear, :func:`bilinear_matrix`.
    Same size: ``x`` unchanged. Both are linear maps $X \mapsto M X M^\top$ per feature.
    """
    x = jnp.asarray(x)
    size = check_int("size", size)
    if x.ndim < 3 or x.shape[-3] != x.shape[-2]:
        raise ValueError(f"x must have shape (..., h, h, D) with a square grid, got {x.shape}")
    h = x.shape[-2]
    if size == h:
        return x
    m = area_matrix(size, h) if size < h else bilinear_matrix(size, h)
    m = jnp.asarray(m, x.dtype)
    return jnp.einsum("ij,...jkd,lk->...ild", m, x, m)


def downsample(x: jax.Array, size: int) -> jax.Array:
    """Area-average (..., h, h, D) down to (..., size, size, D), ``size <= h``."""
    if size > jnp.shape(x)[-2]:
        raise ValueError(f"downsample needs size <= {jnp.shape(x)[-2]}, got {size}")
    return resize(x, size)


def upsample(x: jax.Array, size: int) -> jax.Array:
    """Bilinearly interpolate (..., h, h, D) up to (..., size, size, D), ``size >= h``."""
    if size < jnp.shape(x)[-2]:
        raise ValueError(f"upsample needs size >= {jnp.shape(x)[-2]}, got {size}")
    return resize(x, size)


# --------------------------------------------------------------------------------------------
# The multi-scale residual quantiser
# --------------------------------------------------------------------------------------------
def _nearest_code(r: jax.Array, codebook: jax.Array) -> jax.Array:
    """argmin_v ||r - e_v||^2 over the last axis of r (..., D) -> int32 (...)."""
    d2 = (jnp.sum(r * r, -1, keepdims=True) - 2.0 * r @ codebook.T
          + jnp.sum(codebook * codebook, -1))
    return jnp.argmin(d2, axis=-1).astype(jnp.int32)


def quantise_step(rest: jax.Array, codebook: jax.Array, size: int):
    r"""One step of residual quantisation at scale ``size``.

    $z = \arg\min_v \|\mathrm{down}_{s}(r) - e_v\|^2$ per cell of the $s \times s$ grid,
    $c = \mathrm{up}_S(E[z])$, and the new residual $r - c$.

    ``rest`` (..., S, S, D), ``codebook`` (V, D). Returns ``(tokens int32 (..., s, s),
    contribution (..., S, S, D), new_rest (..., S, S, D))``.
    """
    rest, codebook = jnp.asarray(rest), jnp.asarray(codebook)
    if codebook.ndim != 2 or rest.ndim < 3 or rest.shape[-1] != codebook.shape[1]:
        raise ValueError(f"rest must be (..., S, S, D) and codebook (V, D) with the same D; got "
                         f"{rest.shape} and {codebook.shape}")
    S = rest.shape[-2]
    tokens = _nearest_code(downsample(rest, size), codebook)
    part = upsample(codebook[tokens], S)
    return tokens, part, rest - part


def multiscale_quantise(f: jax.Array, codebook: jax.Array, scales):
    r"""Quantise ``f`` (..., S, S, D) at every scale, coarse to fine ($S$ = the last scale).

    Returns ``(tokens int32 (..., N), f_hat (..., S, S, D), residuals)``: the tokens of all scales
    flattened in sequence order (scale by scale, raster order inside a scale); the reconstruction
    $\hat f = \sum_k \mathrm{up}(E[z_k]) = f - r_K$; and the list of the $K$ downsampled residuals
    $\mathrm{down}_{s_k}(r_{k-1})$ (..., s_k, s_k, D) that the codes were matched to.
    """
    scales = check_scales(scales)
    f = jnp.asarray(f)
    if f.shape[-2] != scales[-1]:
        raise ValueError(f"f must be (..., {scales[-1]}, {scales[-1]}, D) for scales {scales}, "
                         f"got {f.shape}")
    rest, toks, seen = f, [], []
    for s in scales:
        seen.append(downsample(rest, s))
        z, _, rest = quantise_step(rest, codebook, s)
        toks.append(z.reshape(*z.shape[:-2], s * s))
    return jnp.concatenate(toks, axis=-1), f - rest, seen


def _split_tokens(tokens, scales):
    tokens = jnp.asarray(tokens)
    n = sum(s * s for s in scales)
    if tokens.shape[-1] != n:
        raise ValueError(f"tokens must end with an axis of N = {n} for scales {scales}, got "
                         f"{tokens.shape}")
    out, start = [], 0
    for s in scales:
        out.append(tokens[..., start:start + s * s].reshape(*tokens.shape[:-1], s, s))
        start += s * s
    return out


def scale_contributions(tokens: jax.Array, codebook: jax.Array, scales) -> jax.Array:
    r"""$c_k = \mathrm{up}_S(E[z_k])$ for every scale: ``tokens`` (..., N) -> (K, ..., S, S, D).

    Their sum over $k$ is the reconstruction $\hat f$; the partial sums are the coarse-to-fine
    reconstructions $\hat f_{\le k}$.
    """
    scales = check_scales(scales)
    codebook = jnp.asarray(codebook)
    return jnp.stack([upsample(codebook[z], scales[-1]) for z in _split_tokens(tokens, scales)])


def next_scale_inputs(tokens: jax.Array, codebook: jax.Array, scales) -> jax.Array:
    r"""The teacher-forced inputs of VAR: for $k = 1..K-1$, the cumulative reconstruction
    $\hat f_{\le k} = \sum_{j \le k} \mathrm{up}_S(E[z_j])$ area-downsampled to the next scale
    $s_{k+1}$ and flattened.

    ``tokens`` int (..., N), ``codebook`` (V, D) -> ``float (..., N - 1, D)``: the inputs at
    positions $1..N-1$ (position 0 holds the class token). The input of a scale-$k$ position depends
    only on the tokens of the scales before $k$. The first scale must be 1.
    """
    scales = check_scales(scales, first_is_one=True)
    parts = scale_contributions(tokens, codebook, scales)  # (K, ..., S, S, D)
    cum = jnp.cumsum(parts, axis=0)
    D = parts.shape[-1]
    ins = [downsample(cum[k], s).reshape(*cum.shape[1:-3], s * s, D)
           for k, s in enumerate(scales[1:])]
    if not ins:
        return jnp.zeros((*parts.shape[1:-3], 0, D), parts.dtype)
    return jnp.concatenate(ins, axis=-2)


def straight_through(f: jax.Array, f_hat: jax.Array) -> jax.Array:
    r"""$f + \mathrm{sg}(\hat f - f)$: the value of $\hat f$, the gradient of the identity in $f$.

    The quantiser's argmin has zero gradient almost everywhere; the straight-through estimator
    copies the decoder's gradient at $\hat f$ onto the encoder's output $f$ unchanged.
    """
    f = jnp.asarray(f)
    return f + jax.lax.stop_gradient(jnp.asarray(f_hat) - f)


def guided_logits(cond: jax.Array, uncond: jax.Array, scale) -> jax.Array:
    r"""Classifier-free guidance on logits: $\ell_u + w\,(\ell_c - \ell_u)$.

    $w = 1$ is the conditional model, $w = 0$ the unconditional one, $w > 1$ pushes further along
    what the label adds. (Sampling from $\mathrm{softmax}$ of this is $p_u^{1-w} p_c^{w}$,
    renormalised.)
    """
    cond, uncond = jnp.asarray(cond), jnp.asarray(uncond)
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond must have the same shape, got {cond.shape} and "
                         f"{uncond.shape}")
    return uncond + scale * (cond - uncond)


# --------------------------------------------------------------------------------------------
# The VQ-VAE
# --------------------------------------------------------------------------------------------
class Codebook(nnx.Variable):
    """Codebook state updated by exponential moving averages, not by the optimiser."""


class VQVAE(nnx.Module):
    r"""A multi-scale residual VQ-VAE for $8 \times 8$ images with ``levels`` grey levels.

    Encoder: conv $3\times3$ -> ReLU -> conv $4\times4$ stride 2 -> ReLU -> conv $1\times1$ ->
    :func:`~arcourse.layers.rms_norm` (no gain: every latent vector has unit RMS, which fixes the
    scale the encoder and the moving-average codebook would otherwise chase upwards together) to
    $f$ (B, 4, 4, D). Decoder: conv $3\times3$ -> ReLU -> nearest $\times 2$ -> conv $3\times3$ ->
    ReLU -> conv $3\times3$ to one channel, the image in units of the top grey level.

    The codebook $E$ (V, D) is shared by every scale and learned by exponential moving averages
    (van den Oord et al. 2017, appendix; Razavi et al. 2019) of the residual vectors assigned to
    each code, at every scale. Codebook collapse is remedied by **restarting dead codes**: a code
    whose moving-average share of assignments falls below ``dead_fraction / V`` is moved onto one
    of the residual vectors of the batch that are worst quantised.

    Loss: $\|\mathrm{dec}(f + \mathrm{sg}(\hat f - f)) - x\|^2 + \beta\,\|f - \mathrm{sg}(\hat f)\|^2$.
    """

    def __init__(self, *, scales=(1, 2, 3, 4), codebook_size: int = 32, code_dim: int = 8,
                 channels: int = 32, levels: int = 17, beta: float = 0.25, decay: float = 0.95,
                 dead_fraction: float = 0.05, restart: bool = True, rngs: nnx.Rngs):
        self.scales = check_scales(scales)
        if self.scales[-1] != 4:
            raise ValueError(f"the encoder makes a 4x4 latent: the last scale must be 4, got "
                             f"{self.scales}")
        self.V = check_int("codebook_size", codebook_size, 2)
        self.D = check_int("code_dim", code_dim)
        channels = check_int("channels", channels)
        self.levels = check_int("levels", levels, 2)
        self.beta = check_positive_float("beta", beta, allow_zero=True)
        if not 0.0 < decay < 1.0:
            raise ValueError(f"decay must lie in (0, 1), got {decay!r}")
        self.decay = float(decay)
        self.dead_fraction = check_positive_float("dead_fraction", dead_fraction, allow_zero=True)
        self.restart = bool(restart)
        conv = functools.partial(nnx.Conv, rngs=rngs)
        self.enc1 = conv(1, channels, (3, 3))
        self.enc2 = conv(channels, channels, (4, 4), strides=2)
        self.enc3 = conv(channels, self.D, (1, 1))
        self.dec1 = conv(self.D, channels, (3, 3))
        self.dec2 = conv(channels, channels, (3, 3))
        self.dec3 = conv(channels, 1, (3, 3))
        self.codebook = Codebook(0.1 * jax.random.normal(rngs.params(), (self.V, self.D)))
        self.ema_count = Codebook(jnp.zeros((self.V,)))
        self.ema_sum = Codebook(jnp.zeros((self.V, self.D)))
        self.usage = Codebook(jnp.zeros((self.V,)))  # moving-average share of assignments

    # -- the two halves ------------------------------------------------------------------------
    def encode(self, images: jax.Array) -> jax.Array:
        """int grey levels (B, 8, 8) -> latent f (B, 4, 4, D)."""
        x = jnp.asarray(images, jnp.float32)[..., None] / (self.levels - 1)
        h = nnx.relu(self.enc1(x))
        return rms_norm(self.enc3(nnx.relu(self.enc2(h))))

    def decode(self, f_hat: jax.Array) -> jax.Array:
        """latent (B, 4, 4, D) -> image (B, 8, 8) in grey-level units (not rounded, not clipped)."""
        h = nnx.relu(self.dec1(f_hat))
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = nnx.relu(self.dec2(h))
        return self.dec3(h)[..., 0] * (self.levels - 1)

    def tokenize(self, images: jax.Array) -> jax.Array:
        """Images (B, 8, 8) -> tokens int32 (B, N) of every scale."""
        return multiscale_quantise(self.encode(images), self.codebook[...], self.scales)[0]

    def decode_tokens(self, tokens: jax.Array, num_scales: int | None = None) -> jax.Array:
        r"""Tokens (B, N) -> images (B, 8, 8) from the first ``num_scales`` scales only:
        $\mathrm{dec}(\sum_{k \le K'} c_k)$ (all scales by default)."""
        parts = scale_contributions(tokens, self.codebook[...], self.scales)
        k = len(self.scales) if num_scales is None else check_int("num_scales", num_scales, 0,
                                                                  len(self.scales))
        return self.decode(parts[:k].sum(0))

    def reconstruct(self, images: jax.Array) -> jax.Array:
        """The autoencoder's reconstruction (B, 8, 8), grey-level units."""
        _, f_hat, _ = multiscale_quantise(self.encode(images), self.codebook[...], self.scales)
        return self.decode(f_hat)

    # -- training --------------------------------------------------------------------------------
    def loss(self, images: jax.Array, *, update: bool = False) -> jax.Array:
        r"""Mean squared reconstruction error (in units of the top grey level, squared) plus
        $\beta$ times the commitment loss; with ``update`` also one EMA step of the codebook."""
        f = self.encode(images)
        codebook = self.codebook[...]
        tokens, f_hat, seen = multiscale_quantise(f, codebook, self.scales)
        x = jnp.asarray(images, jnp.float32) / (self.levels - 1)
        rec = jnp.mean(jnp.square(self.decode(straight_through(f, f_hat)) / (self.levels - 1) - x))
        commit = jnp.mean(jnp.square(f - jax.lax.stop_gradient(f_hat)))
        if update:
            r = jnp.concatenate([v.reshape(-1, self.D) for v in seen])
            z = jnp.concatenate([t.reshape(-1) for t in _split_tokens(tokens, self.scales)])
            self._ema_update(jax.lax.stop_gradient(r), z)
        return rec + self.beta * commit

    def _ema_update(self, r: jax.Array, z: jax.Array) -> None:
        """One EMA step on residual vectors r (M, D) assigned to codes z (M,), then restarts."""
        g, V = self.decay, self.V
        onehot = jax.nn.one_hot(z, V, dtype=r.dtype)
        count = g * self.ema_count[...] + (1 - g) * onehot.sum(0)
        total = g * self.ema_sum[...] + (1 - g) * onehot.T @ r
        usage = g * self.usage[...] + (1 - g) * onehot.mean(0)
        codebook = jnp.where(count[:, None] > 1e-8, total / jnp.maximum(count, 1e-8)[:, None],
                             self.codebook[...])
        if self.restart:
            dead = usage < self.dead_fraction / V
            err = jnp.sum(jnp.square(r - self.codebook[...][z]), -1)
            worst = r[jax.lax.top_k(err, min(V, r.shape[0]))[1]]
            worst = jnp.concatenate([worst, jnp.zeros((V - worst.shape[0], r.shape[1]), r.dtype)])
            rank = jnp.clip(jnp.cumsum(dead) - 1, 0, V - 1)
            codebook = jnp.where(dead[:, None], worst[rank], codebook)
            count = jnp.where(dead, 1.0, count)
            total = jnp.where(dead[:, None], codebook, total)
            usage = jnp.where(dead, 1.0 / V, usage)
        self.codebook[...] = codebook
        self.ema_count[...] = count
        self.ema_sum[...] = total
        self.usage[...] = usage


def code_usage(tokens: jax.Array, codebook_size: int) -> dict:
    r"""How the codebook is used by ``tokens`` (any shape): counts (V,), the number of codes used,
    and the perplexity $\exp(-\sum_v p_v \ln p_v)$ of the empirical code distribution ($V$ at
    best, 1 when collapsed onto one code)."""
    V = check_int("codebook_size", codebook_size)
    counts = np.bincount(np.asarray(tokens).reshape(-1), minlength=V)[:V]
    p = counts / max(counts.sum(), 1)
    ent = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0))
    return {"counts": counts, "used": int((counts > 0).sum()), "perplexity": float(np.exp(ent))}


# --------------------------------------------------------------------------------------------
# The transformer: VAR (block-causal, next-scale) or raster AR (causal, next-token)
# --------------------------------------------------------------------------------------------
class MaskedSelfAttention(nnx.Module):
    r"""Multi-head self-attention under a given boolean mask (True = may attend):
    $\mathrm{softmax}(QK^\top/\sqrt{d} \text{ masked})V$ per head, then $W^O$."""

    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs):
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        lin = functools.partial(nnx.Linear, use_bias=False, rngs=rngs)
        self.wq, self.wk, self.wv, self.wo = lin(dim, dim), lin(dim, dim), lin(dim, dim), lin(dim, dim)

    def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
        B, T, dim = x.shape

        def heads(y):
            return y.reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

        out = scaled_dot_product_attention(heads(self.wq(x)), heads(self.wk(x)), heads(self.wv(x)),
                                           mask)
        return self.wo(out.transpose(0, 2, 1, 3).reshape(B, T, dim))


class Block(nnx.Module):
    """Pre-norm transformer block: $x + \\mathrm{Attn}(\\mathrm{RMSNorm}(x))$, then
    $x + \\mathrm{SwiGLU}(\\mathrm{RMSNorm}(x))$."""

    def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *, rngs: nnx.Rngs):
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = MaskedSelfAttention(dim, num_heads, rngs=rngs)
        self.mlp = SwiGLU(dim, mlp_hidden, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class VARTransformer(nnx.Module):
    r"""One transformer, two factorisations of the same $N$ tokens.

    * ``mode="var"``: the input at a scale-$k$ position is the cumulative reconstruction of the
      coarser scales downsampled to $s_k$ (:func:`next_scale_inputs`); the mask is
      :func:`block_causal_mask`; the output at every position of scale $k$ predicts its token:
      $p(z_k \mid z_{<k}, y)$, all $s_k^2$ tokens at once. $K$ generation steps.
    * ``mode="ar"``: the input at position $t \ge 1$ is the code vector of token $t-1$; the mask
      is :func:`arcourse.attention.causal_mask`: $p(z_t \mid z_{<t}, y)$. $N$ generation steps.

    Position 0 holds the class embedding (index ``num_classes`` = no class, for classifier-free
    guidance). Inputs (D) are projected to ``dim`` and get a learned position embedding and a
    learned scale embedding. ``codebook`` (V, D) is the VQ-VAE's, frozen.
    """

    def __init__(self, codebook: jax.Array, scales=(1, 2, 3, 4), *, mode: str = "var",
                 num_classes: int = 10, dim: int = 64, num_layers: int = 2, num_heads: int = 4,
                 mlp_hidden: int | None = None, rngs: nnx.Rngs):
        self.mode = check_choice("mode", mode, ("var", "ar"))
        self.scales = check_scales(scales, first_is_one=True)
        codebook = jnp.asarray(codebook, jnp.float32)
        if codebook.ndim != 2:
            raise ValueError(f"codebook must be (V, D), got {codebook.shape}")
        self.V, self.D = codebook.shape
        self.codebook = Codebook(codebook)
        self.num_classes = check_int("num_classes", num_classes)
        dim, num_layers = check_int("dim", dim), check_int("num_layers", num_layers)
        num_heads = check_int("num_heads", num_heads)
        self.N = int(sum(s * s for s in self.scales))
        self.class_embed = nnx.Embed(self.num_classes + 1, dim, rngs=rngs)
        self.proj = nnx.Linear(self.D, dim, rngs=rngs)
        init = nnx.initializers.normal(0.02)
        self.pos = nnx.Param(init(rngs.params(), (self.N, dim)))
        self.level = nnx.Param(init(rngs.params(), (len(self.scales), dim)))
        hidden = mlp_hidden or int(8 * dim / 3)
        self.blocks = nnx.List([Block(dim, num_heads, hidden, rngs=rngs) for _ in range(num_layers)])
        self.norm = RMSNorm(dim)
        self.head = nnx.Linear(dim, self.V, rngs=rngs)

    @property
    def mask(self) -> jax.Array:
        return block_causal_mask(self.scales) if self.mode == "var" else causal_mask(self.N)

    @property
    def groups(self) -> np.ndarray:
        """The generation step at which each position is drawn: its scale (VAR) or itself (AR)."""
        return token_levels(self.scales) if self.mode == "var" else np.arange(self.N, dtype=np.int32)

    @property
    def num_steps(self) -> int:
        return len(self.scales) if self.mode == "var" else self.N

    def inputs_from_tokens(self, tokens: jax.Array) -> jax.Array:
        """Teacher-forced inputs (B, N - 1, D) from the tokens (B, N) of the sequence."""
        codebook = self.codebook[...]
        if self.mode == "var":
            return next_scale_inputs(tokens, codebook, self.scales)
        return codebook[jnp.asarray(tokens)[..., :-1]]

    def logits_from_inputs(self, inputs: jax.Array, labels: jax.Array) -> jax.Array:
        """inputs (B, N - 1, D) float, labels int (B,) -> logits (B, N, V)."""
        inputs = jnp.asarray(inputs)
        if inputs.ndim != 3 or inputs.shape[1:] != (self.N - 1, self.D):
            raise ValueError(f"inputs must be (B, {self.N - 1}, {self.D}), got {inputs.shape}")
        x = jnp.concatenate([self.class_embed(labels)[:, None], self.proj(inputs)], axis=1)
        x = x + self.pos[...] + self.level[...][token_levels(self.scales)]
        mask = self.mask[None, None]
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.norm(x))

    def __call__(self, tokens: jax.Array, labels: jax.Array) -> jax.Array:
        """Teacher forcing: tokens int (B, N), labels int (B,) -> logits (B, N, V) of every token."""
        return self.logits_from_inputs(self.inputs_from_tokens(tokens), labels)


def token_loss(model: VARTransformer, tokens: jax.Array, labels: jax.Array) -> jax.Array:
    r"""Mean cross-entropy $-\frac{1}{BN}\sum \ln p(z_{b,t} \mid \cdot)$ in nats over every token."""
    logp = jax.nn.log_softmax(model(tokens, labels), -1)
    return -jnp.mean(jnp.take_along_axis(logp, jnp.asarray(tokens)[..., None], -1))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sample_loop(graphdef, state, key, labels, cfg_scale, temperature):
    model = nnx.merge(graphdef, state)
    B = labels.shape[0]
    groups = jnp.asarray(model.groups)
    both = jnp.concatenate([labels, jnp.full_like(labels, model.num_classes)])

    def body(step, carry):
        tokens, key = carry
        key, sub = jax.random.split(key)
        logits = model(jnp.concatenate([tokens, tokens]), both)  # (2B, N, V)
        guided = guided_logits(logits[:B], logits[B:], cfg_scale)
        draw = jax.random.categorical(sub, guided / temperature, axis=-1).astype(jnp.int32)
        return jnp.where(groups == step, draw, tokens), key

    tokens = jnp.zeros((B, model.N), jnp.int32)
    tokens, _ = jax.lax.fori_loop(0, model.num_steps, body, (tokens, key))
    return tokens


def sample(key: jax.Array, model: VARTransformer, labels, *, cfg_scale: float = 1.0,
           temperature: float = 1.0) -> jax.Array:
    r"""Class-conditional samples of the tokens (B, N), inside one compiled ``fori_loop``.

    Step $i$ runs the transformer on the tokens drawn so far (for the label and for "no class"),
    mixes the two by :func:`guided_logits` with weight ``cfg_scale``, and draws every position of
    generation group $i$ at once: the $s_i^2$ tokens of scale $i$ (VAR, $K$ steps) or token $i$
    (AR, $N$ steps). Each step recomputes the whole sequence (no key/value cache); the mask makes
    the undrawn positions invisible to the drawn ones.
    """
    labels = as_array(labels, np.int32)
    if labels.ndim != 1:
        raise ValueError(f"labels must be int (B,), got shape {labels.shape}")
    temperature = check_positive_float("temperature", temperature)
    if isinstance(cfg_scale, bool) or not isinstance(cfg_scale, int | float) or math.isnan(cfg_scale):
        raise ValueError(f"cfg_scale must be a number, got {cfg_scale!r}")
    graphdef, state = nnx.split(model)
    return _sample_loop(graphdef, state, key, labels, jnp.float32(cfg_scale),
                        jnp.float32(temperature))
