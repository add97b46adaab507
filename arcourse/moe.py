r"""Mixture-of-experts layers (chapter 10): routing, balance, capacity, expert parallelism.

A mixture-of-experts (MoE) feed-forward layer holds $E$ expert networks and lets each token use
only $k$ of them. A linear **router** scores the experts, $z = x W_r$, $p = \mathrm{softmax}(z)$;
the token goes to the $k$ experts of highest score and the layer returns their outputs weighted
by the (renormalised) probabilities:

$$\mathcal{T}(x) = \mathrm{top}_k(p + b), \qquad
  y = \sum_{i \in \mathcal{T}(x)} g_i(x)\, \mathrm{FFN}_i(x), \qquad
  g_i(x) = \frac{p_i}{\sum_{j \in \mathcal{T}(x)} p_j},$$

with SwiGLU experts $\mathrm{FFN}_i(x) = W_2^{(i)}(\mathrm{silu}(W_1^{(i)} x) \odot W_3^{(i)} x)$
(:class:`arcourse.layers.SwiGLU`, stacked over experts) and a selection bias $b$ that is zero
unless the auxiliary-loss-free balancing moves it.

Two ways to send tokens to experts and back:

* :func:`moe_capacity` (GShard, Switch): every expert has ``capacity`` slots,
  $C = \lceil c \cdot N k / E \rceil$ for $N$ tokens and a capacity factor $c$; the assignments
  over capacity are **dropped** (the token's residual stream passes them by). Fixed shapes: the
  experts run as one batched matmul over an $(E, C, d)$ buffer.
* :func:`moe_dropless` (MegaBlocks): the $Nk$ assignments are sorted by expert and each expert
  multiplies its contiguous group (``jax.lax.ragged_dot``); nothing is dropped.

Balance: :func:`load_balancing_loss` (Switch, $\alpha E \sum_i f_i P_i$, $=\alpha k$ when
balanced), :func:`router_z_loss` (ST-MoE, $\mathrm{mean}(\log\sum_i e^{z_i})^2$) and
:func:`bias_update` (DeepSeek-V3's auxiliary-loss-free balancing).

:class:`MoEGPT` is chapter 06's GPT with MoE feed-forward layers (optionally with a shared
expert), and :func:`expert_parallel_moe` runs a layer with its experts sharded over a device mesh,
exchanging tokens with ``all_to_all`` inside ``shard_map``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from arcourse._checks import check_choice, check_int, check_positive_float
from arcourse.gpt import GPT, GPTConfig
from arcourse.layers import SwiGLU

__all__ = [
    "top_k_gate",
    "expert_counts",
    "load_balancing_loss",
    "router_z_loss",
    "capacity",
    "capacity_positions",
    "bias_update",
    "swiglu_experts",
    "moe_capacity",
    "moe_dropless",
    "moe_dense_reference",
    "Experts",
    "MoELayer",
    "MoEConfig",
    "MoEGPT",
    "moe_lm_loss",
    "active_params_per_token",
    "expert_mesh",
    "expert_parallel_moe",
    "all_to_all_bytes_per_token",
]


def _check_probs_experts(probs, experts):
    probs, experts = jnp.asarray(probs), jnp.asarray(experts)
    if probs.ndim != 2 or experts.ndim != 2 or probs.shape[0] != experts.shape[0]:
        raise ValueError(f"probs must be (N, E) and experts (N, k) with the same N; got "
                         f"{probs.shape} and {experts.shape}")
    return probs, experts


# --------------------------------------------------------------------------------------------
# Routing and balance
# --------------------------------------------------------------------------------------------
def top_k_gate(probs: jax.Array, k: int, bias: jax.Array | None = None, *,
               normalize: bool = True) -> tuple[jax.Array, jax.Array]:
    r"""The top-$k$ gate: which $k$ experts each token uses and with what weight.

    ``probs`` (N, E) router probabilities; returns ``(weights (N, k) float, experts (N, k)
    int32)``, the experts in decreasing order of ``probs + bias`` (ties: the lower index first,
    as ``jax.lax.top_k``). The weights are the probabilities of the chosen experts, without the
    bias, renormalised to sum to 1 over the $k$ chosen (``normalize=False`` keeps the raw
    probabilities, as Switch does with $k=1$).
    """
    probs = jnp.asarray(probs)
    if probs.ndim != 2:
        raise ValueError(f"probs must have shape (N, E), got {probs.shape}")
    k = check_int("k", k, 1, probs.shape[1])
    scores = probs if bias is None else probs + jax.lax.stop_gradient(jnp.asarray(bias))
    _, experts = jax.lax.top_k(scores, k)
    weights = jnp.take_along_axis(probs, experts, axis=-1)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def expert_counts(experts: jax.Array, num_experts: int) -> jax.Array:
    """How many tokens chose each expert (all $k$ choices counted): (N, k) -> int32 (E,)."""
    experts = jnp.asarray(experts)
    num_experts = check_int("num_experts", num_experts)
    return jnp.zeros((num_experts,), jnp.int32).at[experts.reshape(-1)].add(1, mode="drop")


def load_balancing_loss(probs: jax.Array, experts: jax.Array, alpha: float = 1.0) -> jax.Array:
    r"""The Switch Transformer's load-balancing loss $\alpha\, E \sum_{i=1}^E f_i P_i$.

    $f_i = \frac1N \#\{t : i \in \mathcal{T}(x_t)\}$ is the fraction of the $N$ tokens that chose
    expert $i$ (it sums to $k$), $P_i = \frac1N\sum_t p_i(x_t)$ the mean router probability.
    Balanced routing ($f_i = k/E$, $P_i = 1/E$) gives $\alpha k$; concentrating the tokens and the
    probability on fewer experts raises it, up to $\alpha E$ when all tokens choose the same $k$
    experts and those hold all the probability. $f$ is a count (no gradient); the gradient
    reaches the router through $P$.
    """
    probs, experts = _check_probs_experts(probs, experts)
    n, e = probs.shape
    f = expert_counts(experts, e).astype(jnp.float32) / n
    p_mean = jnp.mean(probs.astype(jnp.float32), axis=0)
    return alpha * e * jnp.sum(f * p_mean)


def router_z_loss(logits: jax.Array) -> jax.Array:
    r"""ST-MoE's router z-loss $\frac1N \sum_t \big(\log \sum_i e^{z_{t,i}}\big)^2$, logits (N, E).

    It keeps the router's logits small, where the softmax is numerically tame and not saturated.
    """
    logits = jnp.asarray(logits, jnp.float32)
    if logits.ndim != 2:
        raise ValueError(f"logits must have shape (N, E), got {logits.shape}")
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits, axis=-1)))


def capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    r"""Slots per expert $C = \lceil c \cdot N k / E \rceil$ (at least 1)."""
    num_tokens, num_experts = check_int("num_tokens", num_tokens), check_int("num_experts", num_experts)
    k = check_int("k", k)
    c = check_positive_float("capacity_factor", capacity_factor)
    return max(1, math.ceil(c * num_tokens * k / num_experts - 1e-9))


def capacity_positions(experts: jax.Array, num_experts: int,
                       capacity: int) -> tuple[jax.Array, jax.Array]:
    r"""Each assignment's slot in its expert's queue, and whether it fits: the capacity mask.

    ``experts`` (N, k) int. Assignments queue in **choice-major** order: every token's first
    choice (tokens in order), then every second choice, and so on (GShard, Switch: a token's top
    choice outranks anyone's second). ``position[t, j]`` = the number of earlier assignments in
    that order to the same expert (0-based); ``keep = position < capacity``. Returns
    ``(position int32 (N, k), keep bool (N, k))``.
    """
    experts = jnp.asarray(experts)
    if experts.ndim != 2:
        raise ValueError(f"experts must have shape (N, k), got {experts.shape}")
    num_experts, capacity = check_int("num_experts", num_experts), check_int("capacity", capacity)
    order = experts.T.reshape(-1)  # choice-major
    onehot = jax.nn.one_hot(order, num_experts, dtype=jnp.int32)
    before = jnp.cumsum(onehot, axis=0) - onehot  # assignments to the same expert queued earlier
    pos = jnp.take_along_axis(before, order[:, None], axis=1)[:, 0]
    pos = pos.reshape(experts.shape[1], experts.shape[0]).T.astype(jnp.int32)
    return pos, pos < capacity


def bias_update(bias: jax.Array, counts: jax.Array, gamma: float) -> jax.Array:
    r"""DeepSeek-V3's auxiliary-loss-free balancing: $b_i \leftarrow b_i + \gamma\,
    \mathrm{sign}(\bar c - c_i)$ with $\bar c$ the mean load.

    An overloaded expert ($c_i > \bar c$) is made less attractive, an underloaded one more; an
    expert exactly at the mean keeps its bias. The bias only chooses experts: the gate weights
    stay the router's probabilities. ``bias`` (E,) float, ``counts`` (E,) -> (E,) float32.
    """
    counts = jnp.asarray(counts, jnp.float32)
    return jnp.asarray(bias, jnp.float32) + gamma * jnp.sign(jnp.mean(counts) - counts)


# --------------------------------------------------------------------------------------------
# Experts, dispatch and combine
# --------------------------------------------------------------------------------------------
def swiglu_experts(w1: jax.Array, w3: jax.Array, w2: jax.Array, x: jax.Array) -> jax.Array:
    r"""Every expert's SwiGLU on its own tokens: $W_2^{(e)}(\mathrm{silu}(x W_1^{(e)}) \odot
    x W_3^{(e)})$ with ``w1``, ``w3`` (E, d, h), ``w2`` (E, h, d), ``x`` (E, C, d) -> (E, C, d)."""
    h = jax.nn.silu(jnp.einsum("ecd,edh->ech", x, w1)) * jnp.einsum("ecd,edh->ech", x, w3)
    return jnp.einsum("ech,ehd->ecd", h, w2)


def moe_capacity(x: jax.Array, weights: jax.Array, experts: jax.Array, w: tuple,
                 capacity: int) -> tuple[jax.Array, jax.Array]:
    r"""Dispatch into an (E, C, d) buffer, run the experts, combine: $y_t = \sum_j g_{tj}\,
    \mathrm{keep}_{tj}\, \mathrm{FFN}_{e_{tj}}(x_t)$.

    ``x`` (N, d), ``weights`` / ``experts`` (N, k) from :func:`top_k_gate`, ``w = (w1, w3, w2)``
    stacked expert weights. Returns ``(y (N, d), keep bool (N, k))``; dropped assignments
    contribute nothing.
    """
    w1 = w[0]
    num_experts = w1.shape[0]
    pos, keep = capacity_positions(experts, num_experts, capacity)
    buf = dispatch(x, experts, pos, num_experts, capacity)
    out = swiglu_experts(*w, buf)
    return combine(out, weights, experts, pos, keep), keep


def dispatch(x, experts, pos, num_experts: int, capacity: int):
    """Scatter the kept assignments into the (E, C, d) expert buffer (the rest are dropped)."""
    n, k = experts.shape
    xs = jnp.broadcast_to(x[:, None, :], (n, k, x.shape[-1]))
    buf = jnp.zeros((num_experts, capacity, x.shape[-1]), x.dtype)
    return buf.at[experts, pos].add(xs, mode="drop")  # slots >= capacity fall off the end


def combine(out, weights, experts, pos, keep):
    """Gather each assignment's expert output and sum them with the gate weights: (N, d)."""
    got = out.at[experts, pos].get(mode="fill", fill_value=0)  # (N, k, d)
    g = jnp.where(keep, weights, 0).astype(out.dtype)
    return jnp.einsum("nk,nkd->nd", g, got)


def moe_dropless(x: jax.Array, weights: jax.Array, experts: jax.Array, w: tuple) -> jax.Array:
    r"""The same layer with nothing dropped: sort the $Nk$ assignments by expert, run each
    expert on its contiguous group (``jax.lax.ragged_dot``, a grouped matmul), unsort, combine.

    On a GPU/TPU ``ragged_dot`` is a grouped GEMM costing the active FLOPs only; the CPU backend
    computes it as $E$ dense products, so on CPU this path is for checking, not for speed.
    """
    w1, w3, w2 = w
    n, k = experts.shape
    num_experts = w1.shape[0]
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True)  # assignments grouped by expert
    xs = x[order // k]
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    h = jax.nn.silu(jax.lax.ragged_dot(xs, w1, sizes)) * jax.lax.ragged_dot(xs, w3, sizes)
    ys = jax.lax.ragged_dot(h, w2, sizes)
    y_flat = jnp.zeros_like(ys).at[order].set(ys)  # back to (token, choice) order
    return jnp.einsum("nk,nkd->nd", weights.astype(x.dtype), y_flat.reshape(n, k, -1))


def moe_dense_reference(x: jax.Array, weights: jax.Array, experts: jax.Array, w: tuple) -> jax.Array:
    """Every expert on every token, then the gate picks: the definition, for tests (E x the FLOPs)."""
    num_experts = w[0].shape[0]
    every = swiglu_experts(*w, jnp.broadcast_to(x, (num_experts,) + x.shape))  # (E, N, d)
    chosen = jnp.take_along_axis(every.transpose(1, 0, 2), experts[..., None], axis=1)
    return jnp.einsum("nk,nkd->nd", weights.astype(x.dtype), chosen)


class Experts(nnx.Module):
    """``num_experts`` SwiGLU experts (:class:`arcourse.layers.SwiGLU`) with stacked weights:
    ``w1``, ``w3`` (E, d, h) and ``w2`` (E, h, d), each expert initialised as a SwiGLU is."""

    def __init__(self, num_experts: int, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.num_experts = check_int("num_experts", num_experts)

        @nnx.split_rngs(splits=self.num_experts)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return SwiGLU(dim, hidden, rngs=r)

        self.swiglu = make(rngs)

    @property
    def weights(self) -> tuple[jax.Array, jax.Array, jax.Array]:
        s = self.swiglu
        return s.w1.kernel[...], s.w3.kernel[...], s.w2.kernel[...]

    def __call__(self, x):
        """(E, C, d) -> (E, C, d): expert e on its own slice ``x[e]``."""
        return swiglu_experts(*self.weights, x)


class RouterBias(nnx.Variable):
    """The selection bias of auxiliary-loss-free balancing: state, not a trained parameter."""


class MoELayer(nnx.Module):
    r"""A mixture-of-experts SwiGLU feed-forward layer: router, top-$k$ gate, experts, and an
    optional always-on shared expert (DeepSeekMoE): $y = \mathrm{FFN}_{shared}(x) +
    \sum_{i\in\mathcal T(x)} g_i(x)\,\mathrm{FFN}_i(x)$.

    Args:
      dim, hidden: model width and each expert's hidden width.
      num_experts, k: $E$ experts, $k$ chosen per token.
      capacity_factor: $c$ for :func:`moe_capacity`; ``None`` routes dropless.
      num_groups: tokens are split into this many equal groups, each with its own capacity (as
        each device has in expert parallelism); 1 = one group.
      bias_rate: $\gamma$ of :func:`bias_update`, applied by :meth:`update_bias`.
      shared_hidden: the hidden width of a shared expert every token uses; ``None`` for none.
      router_std: the standard deviation of the router's initial weights.

    ``layer(x)`` returns the output only; :meth:`forward` also returns the pass's statistics.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, k: int = 2, *,
                 capacity_factor: float | None = 1.25, num_groups: int = 1, bias_rate: float = 0.0,
                 shared_hidden: int | None = None, router_std: float = 0.02, rngs: nnx.Rngs):
        self.dim, self.hidden = check_int("dim", dim), check_int("hidden", hidden)
        self.num_experts = check_int("num_experts", num_experts)
        self.k = check_int("k", k, 1, self.num_experts)
        if capacity_factor is not None:
            check_positive_float("capacity_factor", capacity_factor)
        self.capacity_factor = capacity_factor
        self.num_groups = check_int("num_groups", num_groups)
        self.bias_rate = check_positive_float("bias_rate", bias_rate, allow_zero=True)
        self.router = nnx.Param(router_std * jax.random.normal(rngs.params(), (dim, num_experts)))
        self.bias = RouterBias(jnp.zeros((num_experts,), jnp.float32))
        self.experts = Experts(num_experts, dim, hidden, rngs=rngs)
        self.shared = None if shared_hidden is None else SwiGLU(dim, shared_hidden, rngs=rngs)

    def route(self, x):
        """``x`` (N, d) -> (logits (N, E), probs (N, E), weights (N, k), experts (N, k))."""
        logits = x.astype(jnp.float32) @ self.router[...]
        probs = jax.nn.softmax(logits, axis=-1)
        weights, experts = top_k_gate(probs, self.k, self.bias[...])
        return logits, probs, weights, experts

    def forward(self, x) -> tuple[jax.Array, dict]:
        """(..., d) -> (y (..., d), stats): ``lb`` (:func:`load_balancing_loss`, $\\alpha=1$),
        ``z`` (:func:`router_z_loss`), ``counts`` (E,) int32 and ``dropped`` (the fraction of
        assignments over capacity)."""
        shape = x.shape
        if shape[-1] != self.dim:
            raise ValueError(f"x must end with dim={self.dim}, got shape {shape}")
        x2 = x.reshape(-1, self.dim)
        n = x2.shape[0]
        logits, probs, weights, experts = self.route(x2)
        if self.capacity_factor is None:
            y = moe_dropless(x2, weights, experts, self.experts.weights)
            dropped = jnp.zeros(())
        else:
            g = self.num_groups
            if n % g:
                raise ValueError(f"{n} tokens do not split into num_groups={g} equal groups")
            cap = capacity(n // g, self.num_experts, self.k, self.capacity_factor)
            split = (lambda a: a.reshape((g, n // g) + a.shape[1:]))
            run = jax.vmap(moe_capacity, in_axes=(0, 0, 0, None, None))
            y, keep = run(split(x2), split(weights), split(experts), self.experts.weights, cap)
            y = y.reshape(n, self.dim)
            dropped = 1.0 - jnp.mean(keep.astype(jnp.float32))
        if self.shared is not None:
            y = y + self.shared(x2)
        stats = {"lb": load_balancing_loss(probs, experts), "z": router_z_loss(logits),
                 "counts": expert_counts(experts, self.num_experts), "dropped": dropped}
        return y.reshape(shape).astype(x.dtype), stats

    def __call__(self, x):
        """(..., d) -> (..., d)."""
        return self.forward(x)[0]

    def update_bias(self, counts) -> None:
        """One auxiliary-loss-free step, ``bias <- bias_update(bias, counts, bias_rate)``: call
        it once per training step with the step's ``counts`` (a no-op when ``bias_rate`` is 0)."""
        if self.bias_rate > 0:
            self.bias[...] = bias_update(self.bias[...], jax.lax.stop_gradient(counts),
                                         self.bias_rate)


# --------------------------------------------------------------------------------------------
# The MoE GPT
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MoEConfig:
    """A :class:`GPTConfig` plus the MoE feed-forward layers' settings (see :class:`MoELayer`)."""

    gpt: GPTConfig
    num_experts: int = 8
    k: int = 2
    expert_hidden: int | None = None  # default: the dense hidden width / k (equal active params)
    capacity_factor: float | None = 1.25
    bias_rate: float = 0.0
    shared_hidden: int | None = None

    def __post_init__(self):
        if not isinstance(self.gpt, GPTConfig):
            raise TypeError(f"gpt must be a GPTConfig, got {type(self.gpt).__name__}")
        check_choice("gpt.mlp", self.gpt.mlp, ("swiglu",))
        check_int("num_experts", self.num_experts)
        check_int("k", self.k, 1, self.num_experts)
        if self.expert_hidden is not None:
            check_int("expert_hidden", self.expert_hidden)
        if self.shared_hidden is not None:
            check_int("shared_hidden", self.shared_hidden)

    @property
    def hidden(self) -> int:
        return self.expert_hidden or max(8, -(-self.gpt.hidden // self.k))


class MoEGPT(GPT):
    """Chapter 06's GPT (:class:`arcourse.gpt.GPT`) whose feed-forward layers are
    :class:`MoELayer`. ``model(tokens)``, the KV cache and the decoding interface are the GPT's;
    :meth:`forward` also returns the routing statistics the balancing needs."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, MoEConfig):
            raise TypeError(f"cfg must be a MoEConfig, got {type(cfg).__name__}")
        super().__init__(cfg.gpt, rngs=rngs)
        self.moe_cfg = cfg
        for block in self.blocks:
            block.mlp = MoELayer(cfg.gpt.dim, cfg.hidden, cfg.num_experts, cfg.k,
                                 capacity_factor=cfg.capacity_factor, bias_rate=cfg.bias_rate,
                                 shared_hidden=cfg.shared_hidden, rngs=rngs)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [block.mlp for block in self.blocks]

    def forward(self, tokens) -> tuple[jax.Array, dict]:
        r"""``tokens`` (B, T) -> (logits (B, T, V), aux): ``lb`` and ``z`` summed over layers,
        ``counts`` (L, E), ``dropped`` (mean over layers). The pre-norm blocks of
        :class:`arcourse.gpt.Block`: $h + \mathrm{Attn}(N(h))$, then $+\,\mathrm{MoE}(N(\cdot))$."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must have shape (batch, time), got {tokens.shape}")
        h = self.embed_tokens(tokens)
        stats = []
        for block in self.blocks:
            h = h + block.attn(block.norm1(h))
            y, s = block.mlp.forward(block.norm2(h))
            h = h + y
            stats.append(s)
        aux = {"lb": sum(s["lb"] for s in stats), "z": sum(s["z"] for s in stats),
               "counts": jnp.stack([s["counts"] for s in stats]),
               "dropped": jnp.mean(jnp.stack([s["dropped"] for s in stats]))}
        return self.head(self.norm(h)), aux

    def update_bias(self, counts) -> None:
        """Every layer's auxiliary-loss-free bias step from ``counts`` (L, E) (see
        :meth:`MoELayer.update_bias`)."""
        for layer, c in zip(self.moe_layers, counts):
            layer.update_bias(c)

    def set_capacity_factor(self, capacity_factor: float | None) -> None:
        """Change every layer's capacity factor (``None``: dropless), e.g. to evaluate drops."""
        if capacity_factor is not None:
            check_positive_float("capacity_factor", capacity_factor)
        for layer in self.moe_layers:
            layer.capacity_factor = capacity_factor


def moe_lm_loss(model: MoEGPT, batch, alpha: float = 0.0, beta: float = 0.0) -> jax.Array:
    r"""The training loss of an MoE language model, in ``fit``'s ``loss_fn(model, batch)`` form:
    cross-entropy $+\ \alpha \sum_\ell \mathcal{L}_{LB}^{(\ell)} + \beta \sum_\ell
    \mathcal{L}_z^{(\ell)}$, and, for layers with a ``bias_rate``, one bias step per call.

    ``batch = (inputs, targets)``, each (B, T) int. Moving the biases mutates the model, which
    needs an NNX trace (``fit``, ``nnx.jit``, ``nnx.value_and_grad``), as any stateful layer does.
    """
    from arcourse.losses import cross_entropy

    inputs, targets = batch[0], batch[1]
    logits, aux = model.forward(inputs)
    model.update_bias(aux["counts"])
    return cross_entropy(logits, targets) + alpha * aux["lb"] + beta * aux["z"]


def active_params_per_token(model: GPT) -> int:
    """Parameters a token uses: everything but the experts it does not choose (and the unused
    rows of the embedding, which are a lookup)."""
    total = int(sum(np.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))
    if not isinstance(model, MoEGPT):
        return total
    c = model.moe_cfg
    per_expert = sum(int(np.prod(w.shape[1:])) for w in model.moe_layers[0].experts.weights)
    return total - len(model.moe_layers) * (c.num_experts - c.k) * per_expert



# --------------------------------------------------------------------------------------------
# Expert parallelism
# --------------------------------------------------------------------------------------------
def expert_mesh(num_devices: int | None = None, axis: str = "expert") -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (default: all), axis named ``axis``.

    Its axis type is ``Auto``: the compiler moves arrays onto the mesh as ``shard_map`` asks.
    """
    n = len(jax.devices()) if num_devices is None else check_int("num_devices", num_devices)
    return jax.make_mesh((n,), (axis,), axis_types=(jax.sharding.AxisType.Auto,),
                         devices=jax.devices()[:n])


def expert_parallel_moe(layer: MoELayer, x: jax.Array, mesh: Mesh, axis: str = "expert") -> jax.Array:
    r"""The capacity layer with its experts sharded over the mesh axis ``axis`` of $D$ devices.

    Each device holds $N/D$ tokens and $E/D$ experts. It routes its own tokens into a local
    $(E, C, d)$ buffer (capacity per device, as :class:`MoELayer` with ``num_groups`` $= D$),
    then ``all_to_all`` sends buffer rows $[jE/D, (j+1)E/D)$ to device $j$, which receives
    $(E/D, D\,C, d)$: its experts' tokens from every device. The experts run, a second
    ``all_to_all`` sends the results home, and each device combines them. Equal to
    ``layer(x)`` with ``layer.num_groups = D`` (a test). ``x`` (N, d) with $D \mid N$, $D \mid E$.
    """
    d = mesh.shape[axis]
    n = x.shape[0]
    if layer.capacity_factor is None:
        raise ValueError("expert parallelism here uses the capacity path: set a capacity_factor")
    if n % d or layer.num_experts % d:
        raise ValueError(f"tokens ({n}) and experts ({layer.num_experts}) must both divide by "
                         f"the {d} devices of axis {axis!r}")
    cap = capacity(n // d, layer.num_experts, layer.k, layer.capacity_factor)
    k, num_experts = layer.k, layer.num_experts
    shared = () if layer.shared is None else (layer.shared.w1.kernel[...],
                                              layer.shared.w3.kernel[...],
                                              layer.shared.w2.kernel[...])

    def local(x_loc, router, bias, w1, w3, w2, shared):
        probs = jax.nn.softmax(x_loc.astype(jnp.float32) @ router, axis=-1)
        weights, experts = top_k_gate(probs, k, bias)
        pos, keep = capacity_positions(experts, num_experts, cap)
        buf = dispatch(x_loc, experts, pos, num_experts, cap)  # (E, C, d)
        buf = jax.lax.all_to_all(buf, axis, 0, 1, tiled=True)  # (E/D, D*C, d)
        out = swiglu_experts(w1, w3, w2, buf)
        out = jax.lax.all_to_all(out, axis, 1, 0, tiled=True)  # (E, C, d)
        y = combine(out, weights, experts, pos, keep)
        if shared:
            sw1, sw3, sw2 = shared
            y = y + (jax.nn.silu(x_loc @ sw1) * (x_loc @ sw3)) @ sw2
        return y

    rep, ex = P(), P(axis)
    shared_spec = tuple(rep for _ in shared)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(P(axis), rep, rep, ex, ex, ex, shared_spec),
                       out_specs=P(axis))
    return fn(x, layer.router[...], layer.bias[...], *layer.experts.weights, shared)


def all_to_all_bytes_per_token(dim: int, k: int, capacity_factor: float, num_devices: int,
                               bytes_per_value: int = 2, backward: bool = True) -> float:
    r"""Bytes one token sends over the network per MoE layer in expert parallelism:
    $2 \cdot c\,k\,d \cdot b \cdot (D-1)/D$ for the dispatch and the return ``all_to_all``
    (the buffer is padded to capacity, and the share $1/D$ for local experts stays on the device),
    doubled for the backward pass."""
    dim, k, d = check_int("dim", dim), check_int("k", k), check_int("num_devices", num_devices)
    c = check_positive_float("capacity_factor", capacity_factor)
    per_pass = 2 * c * k * dim * bytes_per_value * (d - 1) / d
    return per_pass * (2 if backward else 1)
