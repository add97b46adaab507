r"""A small GPT: token embedding, pre-norm transformer blocks on a residual stream, a linear head.

$$h_0 = E[x] \,(+\, P), \qquad
  h' = h + \mathrm{Attn}(\mathrm{Norm}(h)), \qquad
  h_{\ell+1} = h' + \mathrm{MLP}(\mathrm{Norm}(h')), \qquad
  \mathrm{logits} = \mathrm{Norm}(h_L)\, W_{out}$$

The block is configurable so that a chapter can measure what each modern piece buys: position
``"rope"`` / ``"learned"`` / ``"none"``, norm ``"rms"`` / ``"layer"``, MLP ``"swiglu"`` /
``"gelu"``, and ``num_kv_heads`` for grouped-query attention.

Decoding uses a key/value cache (:class:`KVCache`): :meth:`GPT.prefill` runs the prompt in one
parallel pass and stores every layer's keys and values, then :meth:`GPT.decode_step` feeds one
token per row, computing only that token's queries, keys and values. :func:`kv_cache_decoder` and
:func:`uncached_decoder` wrap a model as the ``step_fn`` / ``prefill_fn`` pair (and its state)
that ``arcourse.decoding.generate`` runs inside one compiled loop.

:func:`copy_task` is a synthetic task where attention's direct access to the past wins: a random
string followed by its exact repeat.
"""

from __future__ import annotations

import functools
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
from arcourse.metrics import nll_from_logits

__all__ = [
    "GPTConfig",
    "Block",
    "GPT",
    "KVCache",
    "kv_cache_decoder",
    "uncached_decoder",
    "next_token_loss",
    "copy_task",
    "masked_next_token_loss",
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

    def decode(self, h, cache: LayerKV, pos):
        a, cache = self.attn.decode(self.norm1(h), cache, pos)
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
        from arcourse.attention import attention_weights, causal_mask

        tokens = jnp.asarray(tokens)
        h = self.embed_tokens(tokens)
        T = tokens.shape[1]
        maps = []
        for block in self.blocks:
            q, k, _ = block.attn.qkv(block.norm1(h), jnp.arange(T))
            group = self.cfg.num_heads // self.cfg.kv_heads
            k = jnp.repeat(k, group, axis=2)  # query head h reads key head h // group
            maps.append(attention_weights(q.swapaxes(1, 2), k.swapaxes(1, 2), causal_mask(T)))
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
    def init_cache(self, batch_size: int, max_len: int, dtype=jnp.float32) -> KVCache:
        """An empty cache for ``batch_size`` rows and up to ``max_len`` positions."""
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

    def decode_step(self, cache: KVCache, tokens):
        """Feed one token per row (B,) at position ``cache.length``: (logits (B, V), cache)."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 1:
            raise ValueError(f"tokens must have shape (batch,), got {tokens.shape}")
        pos = cache.length
        h = self.embed(tokens)
        if self.cfg.position == "learned":
            h = h + self.pos_embed[...][pos]
        layers = []
        for block, kv in zip(self.blocks, cache.layers):
            h, kv = block.decode(h, kv, pos)
            layers.append(kv)
        return self.head(self.norm(h)), KVCache(tuple(layers), pos + 1)


@functools.lru_cache(maxsize=64)
def _cached_fns(graphdef):
    def step_fn(state, tokens):
        params, cache = state
        logits, cache = nnx.merge(graphdef, params).decode_step(cache, tokens)
        return logits, (params, cache)

    def prefill_fn(state, prompt):
        params, cache = state
        logits, cache = nnx.merge(graphdef, params).prefill(cache, prompt)
        return logits, (params, cache)

    return step_fn, prefill_fn


@functools.lru_cache(maxsize=64)
def _uncached_fns(graphdef):
    def step_fn(state, tokens):
        params, buf, n = state
        buf = jax.lax.dynamic_update_slice_in_dim(buf, tokens[:, None].astype(buf.dtype), n, 1)
        logits = nnx.merge(graphdef, params)(buf)
        return jax.lax.dynamic_index_in_dim(logits, n, 1, keepdims=False), (params, buf, n + 1)

    def prefill_fn(state, prompt):
        params, buf, _ = state
        P = prompt.shape[1]
        buf = jax.lax.dynamic_update_slice_in_dim(buf, prompt.astype(buf.dtype), 0, 1)
        logits = nnx.merge(graphdef, params)(buf)
        return logits[:, P - 1], (params, buf, jnp.asarray(P, jnp.int32))

    return step_fn, prefill_fn


def kv_cache_decoder(model: GPT, batch_size: int, max_len: int):
    """``(step_fn, prefill_fn, state)`` for ``arcourse.decoding.generate``, with a KV cache.

    The state is ``(parameters, KVCache)``: the parameters are a snapshot passed as arguments,
    not baked into the compiled code, and models of the same structure share one ``step_fn``,
    so a retrained model never recompiles. ``max_len`` must hold the prompt and the tokens.

    >>> step_fn, prefill_fn, state = kv_cache_decoder(model, batch, max_len)
    >>> generate(step_fn, state, prompt, n, key, prefill_fn=prefill_fn)
    """
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT, got {type(model).__name__}")
    graphdef, params = nnx.split(model)
    step_fn, prefill_fn = _cached_fns(graphdef)
    return step_fn, prefill_fn, (params, model.init_cache(batch_size, max_len))


def uncached_decoder(model: GPT, batch_size: int, max_len: int):
    """The baseline, same interface: every step reruns the whole forward pass over a fixed
    ``max_len`` window of the tokens so far (zero-padded; the causal mask hides the padding).
    The state is ``(parameters, tokens (B, max_len), length)``."""
    if not isinstance(model, GPT):
        raise TypeError(f"model must be a GPT, got {type(model).__name__}")
    batch_size, max_len = _check_int("batch_size", batch_size), _check_int("max_len", max_len)
    if model.cfg.position == "learned" and max_len > model.cfg.context:
        raise ValueError(f"max_len={max_len} exceeds the learned position table "
                         f"(context={model.cfg.context})")
    graphdef, params = nnx.split(model)
    step_fn, prefill_fn = _uncached_fns(graphdef)
    state = (params, jnp.zeros((batch_size, max_len), jnp.int32), jnp.zeros((), jnp.int32))
    return step_fn, prefill_fn, state


# --------------------------------------------------------------------------------------------
# Losses and the synthetic copy task
# --------------------------------------------------------------------------------------------
def next_token_loss(model, batch):
    """Mean NLL (nats) of ``batch = (inputs, targets)``, each (B, T): teacher forcing."""
    x, y = batch
    return nll_from_logits(model(x), y)


def masked_next_token_loss(model, batch):
    """Mean NLL over the positions where ``mask`` is true, ``batch = (inputs, targets, mask)``."""
    x, y, m = batch
    return nll_from_logits(model(x), y, m)


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


def num_params(model: nnx.Module) -> int:
    """The number of trainable parameters."""
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
