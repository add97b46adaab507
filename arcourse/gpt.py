r"""A small GPT: token embedding, pre-norm transformer blocks on a residual stream, a linear head.

$$h_0 = E[x] \,(+\, P), \qquad
  h' = h + \mathrm{Attn}(\mathrm{Norm}(h)), \qquad
  h_{\ell+1} = h' + \mathrm{MLP}(\mathrm{Norm}(h')), \qquad
  \mathrm{logits} = \mathrm{Norm}(h_L)\, W_{out}$$

The block is configurable so that a chapter can measure what each modern piece buys: position
``"rope"`` / ``"learned"`` / ``"none"``, norm ``"rms"`` / ``"layer"``, MLP ``"swiglu"`` /
``"gelu"``, and ``num_kv_heads`` for grouped-query attention.

A GPT implements the course's decoding interface (``arcourse.decoding``) with a key/value cache
(:class:`KVCache`) as its state: :meth:`GPT.prefill` runs the prompt in one parallel pass and
stores every layer's keys and values, then :meth:`GPT.step` feeds one token per row, computing
only that token's queries, keys and values. :class:`UncachedGPT` is the naive decoder with the
same interface, rerunning the whole forward pass at every step. :class:`CroppedGPT` generates
past the trained context the standard way, running the model on the last ``context`` tokens only.

:func:`copy_task` is a synthetic task where attention's direct access to the past wins: a random
string followed by its exact repeat. :func:`induction_task` repeats a random string at a random
offset, so that copying needs an induction head: find the earlier occurrence of the current
symbol by content, read what followed it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse.attention import (
    CausalSelfAttention,
    GeluMLP,
    LayerKV,
    RMSNorm,
    SwiGLU,
    _check_int,
)

__all__ = [
    "GPTConfig",
    "Block",
    "GPT",
    "KVCache",
    "UncachedGPT",
    "CroppedGPT",
    "copy_task",
    "induction_task",
    "num_params",
]


@dataclass(frozen=True)
class GPTConfig:
    """The sizes and the choice of pieces of a :class:`GPT`."""

    vocab_size: int
    context: int = 128
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    position: str = "rope"  # "rope" | "learned" | "none"
    norm: str = "rms"  # "rms" | "layer"
    mlp: str = "swiglu"  # "swiglu" | "gelu"
    mlp_hidden: int | None = None  # default: 4*dim for GELU, 8*dim/3 (rounded up to 8) for SwiGLU
    rope_base: float = 10000.0

    def __post_init__(self):
        for name in ("vocab_size", "context", "dim", "num_layers", "num_heads"):
            _check_int(name, getattr(self, name))
        if self.num_kv_heads is not None:
            _check_int("num_kv_heads", self.num_kv_heads)
        if self.mlp_hidden is not None:
            _check_int("mlp_hidden", self.mlp_hidden)
        choices = {"position": ("rope", "learned", "none"), "norm": ("rms", "layer"),
                   "mlp": ("swiglu", "gelu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")

    @property
    def kv_heads(self) -> int:
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def hidden(self) -> int:
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "gelu":
            return 4 * self.dim
        return -(-8 * self.dim // 3 // 8) * 8


def _norm(cfg: GPTConfig, rngs: nnx.Rngs):
    return RMSNorm(cfg.dim) if cfg.norm == "rms" else nnx.LayerNorm(cfg.dim, rngs=rngs)


class Block(nnx.Module):
    """A pre-norm transformer block: $h + \\mathrm{Attn}(N(h))$, then $+ \\mathrm{MLP}(N(\\cdot))$."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.norm1 = _norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg.dim, cfg.num_heads, num_kv_heads=cfg.kv_heads,
                                        use_rope=cfg.position == "rope",
                                        rope_base=cfg.rope_base, rngs=rngs)
        self.norm2 = _norm(cfg, rngs)
        mlp = SwiGLU if cfg.mlp == "swiglu" else GeluMLP
        self.mlp = mlp(cfg.dim, cfg.hidden, rngs=rngs)

    def __call__(self, h, *, return_kv: bool = False):
        a = self.attn(self.norm1(h), return_kv=return_kv)
        a, kv = a if return_kv else (a, None)
        h = h + a
        h = h + self.mlp(self.norm2(h))
        return (h, kv) if return_kv else h

    def extend(self, h, cache: LayerKV, pos):
        """The block on ``K`` new positions (B, K, dim) against the layer's KV cache."""
        a, cache = self.attn.extend(self.norm1(h), cache, pos)
        h = h + a
        return h + self.mlp(self.norm2(h)), cache


class KVCache(NamedTuple):
    """Every layer's keys and values, (B, S, G, d_head) each, and how many positions are filled."""

    layers: tuple[LayerKV, ...]
    length: jax.Array  # int32 scalar

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for kv in self.layers for a in kv)


class GPT(nnx.Module):
    """A decoder-only transformer; see the module docstring for the equations."""

    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, GPTConfig):
            raise TypeError(f"cfg must be a GPTConfig, got {type(cfg).__name__}")
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"dim={cfg.dim} must be divisible by num_heads={cfg.num_heads}")
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
        if cfg.position == "learned":
            self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(),
                                                                (cfg.context, cfg.dim)))
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = _norm(cfg, rngs)
        self.head = nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False, rngs=rngs)

    # ---------------------------------------------------------------- the parallel forward pass
    def embed_tokens(self, tokens, positions=None):
        """Token embeddings (plus learned position embeddings): (B, T) -> (B, T, dim)."""
        tokens = jnp.asarray(tokens)
        h = self.embed(tokens)
        if self.cfg.position == "learned":
            pos = jnp.arange(tokens.shape[-1]) if positions is None else positions
            h = h + self.pos_embed[...][pos]
        return h

    def from_embeddings(self, h):
        """The rest of the network from the input embeddings ``h`` (B, T, dim) to the logits.

        Separate from the token lookup so that gradients with respect to the inputs exist.
        """
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def attention_maps(self, tokens):
        """The attention weights of every layer and head: (B, T) -> (L, B, H, T, T).

        Row i of a map is the distribution over the positions j <= i that position i reads.
        """
        from arcourse.attention import causal_mask, grouped_attention_weights

        tokens = jnp.asarray(tokens)
        h = self.embed_tokens(tokens)
        T = tokens.shape[1]
        maps = []
        for block in self.blocks:  # the same projections and head grouping the forward pass runs
            q, k, _ = block.attn.qkv(block.norm1(h), jnp.arange(T))
            maps.append(grouped_attention_weights(q, k, causal_mask(T)[None]))
            h = block(h)
        return jnp.stack(maps)

    def __call__(self, tokens):
        """Teacher forcing: ``tokens`` int (B, T) -> logits (B, T, V); position t predicts t+1."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, time), got {tokens.shape}")
        if self.cfg.position == "learned" and tokens.shape[1] > self.cfg.context:
            raise ValueError(f"a sequence of {tokens.shape[1]} tokens is longer than the learned "
                             f"position table (context={self.cfg.context})")
        return self.from_embeddings(self.embed_tokens(tokens))

    # ---------------------------------------------------------------- decoding with a KV cache
    def init_state(self, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty KV cache for ``batch_size`` rows and up to ``max_len`` positions."""
        batch_size, max_len = _check_int("batch_size", batch_size), _check_int("max_len", max_len)
        if self.cfg.position == "learned" and max_len > self.cfg.context:
            raise ValueError(f"max_len={max_len} exceeds the learned position table "
                             f"(context={self.cfg.context})")
        shape = (batch_size, max_len, self.cfg.kv_heads, self.cfg.head_dim)
        layers = tuple(LayerKV(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
                       for _ in range(self.cfg.num_layers))
        return KVCache(layers, jnp.zeros((), jnp.int32))

    def prefill(self, cache: KVCache, prompt):
        """Run the prompt (B, P) in one parallel pass from an empty cache.

        Returns (logits of the last prompt position (B, V), the cache holding positions 0..P-1).
        """
        prompt = jnp.asarray(prompt)
        if prompt.ndim != 2 or prompt.shape[0] != cache.layers[0].k.shape[0]:
            raise ValueError(f"prompt must have shape (batch={cache.layers[0].k.shape[0]}, P), "
                             f"got {prompt.shape}")
        if prompt.shape[1] > cache.layers[0].k.shape[1]:
            raise ValueError(f"a prompt of {prompt.shape[1]} tokens does not fit in a cache of "
                             f"{cache.layers[0].k.shape[1]} positions")
        h = self.embed_tokens(prompt)
        layers = []
        for block, kv in zip(self.blocks, cache.layers):
            h, new = block(h, return_kv=True)
            layers.append(LayerKV(
                jax.lax.dynamic_update_slice_in_dim(kv.k, new.k.astype(kv.k.dtype), 0, axis=1),
                jax.lax.dynamic_update_slice_in_dim(kv.v, new.v.astype(kv.v.dtype), 0, axis=1)))
        logits = self.head(self.norm(h[:, -1]))
        return logits, KVCache(tuple(layers), jnp.asarray(prompt.shape[1], jnp.int32))

    def step(self, cache: KVCache, tokens):
        """Feed one token per row (B,) at position ``cache.length``: (logits (B, V), cache)."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must have shape (batch,), got {tokens.shape}")
        logits, cache = self.extend(cache, tokens[:, None])
        return logits[:, 0], cache

    def extend(self, cache: KVCache, tokens, *, return_hidden: bool = False):
        """Score ``K`` tokens per row (B, K) at positions ``cache.length ..`` in one pass.

        Token ``i`` attends over the cached positions and the new tokens ``<= i``; its keys and
        values are written at ``cache.length + i``. Returns (logits (B, K, V), where row ``i``
        predicts the token after token ``i``, the cache with ``length + K``): the same numbers as
        ``K`` calls of :meth:`step`, for the price of about one (speculative decoding, chapter 12).
        With ``return_hidden`` the first item is the residual stream before the final norm
        (B, K, dim) instead of the logits (multi-token heads read it). The cache must hold
        ``length + K`` positions.
        """
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or tokens.shape[0] != cache.layers[0].k.shape[0]:
            raise ValueError(f"tokens must have shape (batch={cache.layers[0].k.shape[0]}, K), "
                             f"got {tokens.shape}")
        K, S = tokens.shape[1], cache.layers[0].k.shape[1]
        if K > S:
            raise ValueError(f"{K} tokens do not fit in a cache of {S} positions")
        pos = cache.length
        h = self.embed_tokens(tokens, pos + jnp.arange(K))
        layers = []
        for block, kv in zip(self.blocks, cache.layers):
            h, kv = block.extend(h, kv, pos)
            layers.append(kv)
        cache = KVCache(tuple(layers), pos + K)
        return (h, cache) if return_hidden else (self.head(self.norm(h)), cache)


class UncachedGPT(nnx.Module):
    """The naive decoder, the one deliberate alternative to the KV cache, with the same decoding
    interface: every step reruns the whole forward pass of ``model`` over a fixed window of
    ``max_len`` positions holding the tokens so far (zero-padded; the causal mask hides the
    padding). Its state is ``(tokens (B, max_len), length)``."""

    def __init__(self, model: GPT):
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a GPT, got {type(model).__name__}")
        self.model = model

    def init_state(self, batch_size: int, max_len: int):
        batch_size, max_len = _check_int("batch_size", batch_size), _check_int("max_len", max_len)
        if self.model.cfg.position == "learned" and max_len > self.model.cfg.context:
            raise ValueError(f"max_len={max_len} exceeds the learned position table "
                             f"(context={self.model.cfg.context})")
        return jnp.zeros((batch_size, max_len), jnp.int32), jnp.zeros((), jnp.int32)

    def prefill(self, state, prompt):
        buf, _ = state
        P = prompt.shape[1]
        buf = jax.lax.dynamic_update_slice_in_dim(buf, prompt.astype(buf.dtype), 0, 1)
        return self.model(buf)[:, P - 1], (buf, jnp.asarray(P, jnp.int32))

    def step(self, state, tokens):
        buf, n = state
        buf = jax.lax.dynamic_update_slice_in_dim(buf, tokens[:, None].astype(buf.dtype), n, 1)
        logits = jax.lax.dynamic_index_in_dim(self.model(buf), n, 1, keepdims=False)
        return logits, (buf, n + 1)


class CroppedGPT(nnx.Module):
    """Generating past the trained context the standard way (GPT-2's sampling code, nanoGPT): every
    step runs ``model`` on the last ``window`` tokens only (default ``model.cfg.context``), so the
    positions restart at 0 in every window and the model never meets a position, or a
    query-key offset, beyond those it was trained on. No KV cache: once the window slides, the
    first token is dropped, and every later position's keys and values above the first layer
    depended on it, so each step recomputes the window. Its state is
    ``(tokens (B, window), length)``; ``max_len`` is not limited by the window."""

    def __init__(self, model: GPT, window: int | None = None):
        if not isinstance(model, GPT):
            raise TypeError(f"model must be a GPT, got {type(model).__name__}")
        self.model = model
        self.window = model.cfg.context if window is None else _check_int("window", window)
        if self.window > model.cfg.context and model.cfg.position == "learned":
            raise ValueError(f"window={self.window} exceeds the learned position table "
                             f"(context={model.cfg.context})")

    def init_state(self, batch_size: int, max_len: int):
        batch_size, _ = _check_int("batch_size", batch_size), _check_int("max_len", max_len)
        return jnp.zeros((batch_size, self.window), jnp.int32), jnp.zeros((), jnp.int32)

    def prefill(self, state, prompt):
        buf, _ = state
        prompt = jnp.asarray(prompt).astype(buf.dtype)
        P, W = prompt.shape[1], self.window
        if P >= W:
            buf = prompt[:, -W:]
            return self.model(buf)[:, -1], (buf, jnp.asarray(P, jnp.int32))
        buf = jax.lax.dynamic_update_slice_in_dim(buf, prompt, 0, 1)
        return self.model(buf)[:, P - 1], (buf, jnp.asarray(P, jnp.int32))

    def step(self, state, tokens):
        buf, n = state
        W = self.window
        buf = jnp.where(n >= W, jnp.roll(buf, -1, axis=1), buf)  # a full window slides by one
        at = jnp.minimum(n, W - 1)
        buf = jax.lax.dynamic_update_slice_in_dim(buf, tokens[:, None].astype(buf.dtype), at, 1)
        logits = jax.lax.dynamic_index_in_dim(self.model(buf), at, 1, keepdims=False)
        return logits, (buf, n + 1)


# --------------------------------------------------------------------------------------------
# Losses and the synthetic copy task
# --------------------------------------------------------------------------------------------
def copy_task(key: jax.Array, batch_size: int, length: int, vocab_size: int):
    r"""A random string of ``length`` symbols followed by its repeat: $s = (u_1..u_L, u_1..u_L)$.

    Returns ``(inputs, targets, mask)``, each (B, 2L-1): ``inputs = s[:-1]``,
    ``targets = s[1:]`` and ``mask`` true on the targets that the repeat makes predictable
    (the second copy, indices $\ge L-1$). There the best possible loss is 0; on the first copy it
    is $\ln V$. Traceable under ``jit``.
    """
    batch_size = _check_int("batch_size", batch_size)
    length, vocab_size = _check_int("length", length, 2), _check_int("vocab_size", vocab_size, 2)
    u = jax.random.randint(key, (batch_size, length), 0, vocab_size, dtype=jnp.int32)
    s = jnp.concatenate([u, u], axis=1)
    mask = jnp.broadcast_to(jnp.arange(2 * length - 1) >= length - 1, (batch_size, 2 * length - 1))
    return s[:, :-1], s[:, 1:], mask


def induction_task(key: jax.Array, batch_size: int, max_repeat: int, vocab_size: int,
                   min_repeat: int = 2):
    r"""Repeated random sequences at a random offset: where only an induction head can copy.

    Each row is $s = (u_1..u_L,\ u_1..u_L,\ r_1..r_{2M-2L})$ of $2M$ symbols, $M$ = ``max_repeat``:
    $L$ distinct random symbols (drawn without replacement, so every symbol of the first copy
    has one earlier occurrence), their exact repeat, then random filler. $L$ is drawn per row,
    uniformly in ``min_repeat .. max_repeat``, so the repeat is at no fixed offset: a head that
    attends a fixed number of positions back cannot copy it; one that finds the previous
    occurrence of the current symbol by content and reads the symbol after it can.

    Returns ``(inputs, targets, repeat, first)``, each (B, 2M-1): ``inputs = s[:-1]``,
    ``targets = s[1:]``; ``repeat`` is true on the targets $u_2..u_L$ of the second copy (the
    ones the first copy makes predictable: best loss 0), ``first`` on the targets $u_2..u_L$ of
    the first copy (unpredictable: about $\ln V$). ``lm_loss`` reads ``repeat`` as its mask.
    Traceable under ``jit``.
    """
    batch_size = _check_int("batch_size", batch_size)
    max_repeat, vocab_size = _check_int("max_repeat", max_repeat, 2), _check_int("vocab_size",
                                                                                 vocab_size, 2)
    min_repeat = _check_int("min_repeat", min_repeat, 2)
    if min_repeat > max_repeat or max_repeat > vocab_size:
        raise ValueError(f"need 2 <= min_repeat <= max_repeat <= vocab_size, got min_repeat="
                         f"{min_repeat}, max_repeat={max_repeat}, vocab_size={vocab_size}")
    k_u, k_len, k_fill = jax.random.split(key, 3)
    n = 2 * max_repeat
    first = jax.vmap(lambda k: jax.random.permutation(k, vocab_size)[:max_repeat])(
        jax.random.split(k_u, batch_size)).astype(jnp.int32)
    fill = jax.random.randint(k_fill, (batch_size, n), 0, vocab_size, dtype=jnp.int32)
    u = fill.at[:, :max_repeat].set(first)
    L = jax.random.randint(k_len, (batch_size, 1), min_repeat, max_repeat + 1)
    i = jnp.arange(n)[None]
    s = jnp.take_along_axis(u, jnp.where((i >= L) & (i < 2 * L), i - L, i), axis=1)
    t = jnp.arange(n - 1)[None]  # the target at t is s[t + 1]
    repeat = (t >= L) & (t <= 2 * L - 2)
    first_copy = jnp.broadcast_to(t <= L - 2, repeat.shape)
    return s[:, :-1], s[:, 1:], repeat, first_copy


def num_params(model: nnx.Module) -> int:
    """The number of trainable parameters."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
