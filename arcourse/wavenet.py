r"""WaveNet (chapter 07): mu-law audio, dilated causal convolutions, gated residual stacks, and
fast generation with one queue per layer.

* :func:`mu_law_encode` / :func:`mu_law_decode` — companding with $\mu = 255$ to 256 levels,
  $F(x) = \mathrm{sign}(x) \ln(1 + \mu|x|) / \ln(1 + \mu)$, then $q = \lfloor (F(x)+1)\mu/2 + 1/2
  \rfloor$; pinned at $-1 \mapsto 0$, $0 \mapsto 128$, $1 \mapsto 255$.
* :func:`causal_conv` — the dilated causal convolution of kernel size $k$ and dilation $d$,
  $y_t = b + \sum_{i=0}^{k-1} W_i\, x_{t-(k-1-i)d}$ with $x_s = 0$ for $s < 0$.
* :func:`receptive_field` — $R = (k-1)\sum_\ell d_\ell + 1$ inputs reach each output.
* :class:`WaveNet` — embedding of the 256 levels, a stack of gated residual layers
  (van den Oord et al. 2016), skip connections, a softmax over the 256 levels; optional global
  conditioning on a class label (the note). It implements the course's decoding interface
  (``init_state`` / ``prefill`` / ``step``, see :mod:`arcourse.decoding`) with the fast
  generation of Paine et al. (2016): the state holds a queue per layer of its last $(k-1)d$
  inputs, so one new sample costs $O(\text{layers})$.
* :class:`NaiveWaveNet` — the same model decoded the slow way: each new sample reruns the whole
  stack over the last $R$ samples, $O(R \cdot \text{layers})$; it gives the same logits.
* :func:`conditioned` — fixes the labels of a conditional model, so that
  :func:`arcourse.decoding.generate` can run it.
* :func:`sample` — plain ancestral sampling (no logit processors) in one compiled loop, for any
  model with the decoding interface: the loop the benchmark times.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse._checks import check_int, check_positive_float
from arcourse.decoding import prefill_by_steps
from arcourse.layers import Conv1x1, gated_activation

__all__ = [
    "MU",
    "LEVELS",
    "mu_law_compress",
    "mu_law_encode",
    "mu_law_decode",
    "causal_conv",
    "same_conv",
    "receptive_field",
    "queue_step",
    "WaveNetConfig",
    "ResidualLayer",
    "WaveNet",
    "WaveNetState",
    "NaiveWaveNet",
    "conditioned",
    "sample",
    "wavenet_loss",
    "random_crops",
    "count_model_bits",
    "marginal_bits",
    "num_params",
]

MU = 255
LEVELS = MU + 1


# --------------------------------------------------------------------------------------------
# mu-law
# --------------------------------------------------------------------------------------------
def _check_mu(mu):
    if isinstance(mu, bool) or not isinstance(mu, int | np.integer) or mu < 1:
        raise ValueError(f"mu must be an integer >= 1, got {mu!r}")
    return int(mu)


def mu_law_compress(x, mu: int = MU) -> jax.Array:
    r"""$F(x) = \mathrm{sign}(x)\,\ln(1 + \mu|x|) / \ln(1 + \mu)$, float in $[-1, 1]$ (x clipped)."""
    mu = _check_mu(mu)
    x = jnp.clip(jnp.asarray(x, jnp.float32), -1.0, 1.0)
    return jnp.sign(x) * jnp.log1p(mu * jnp.abs(x)) / math.log1p(mu)


def mu_law_encode(x, mu: int = MU) -> jax.Array:
    r"""Audio in $[-1, 1]$ (any shape, clipped first) to integer levels $0..\mu$, int32.

    $q = \lfloor \tfrac{\mu}{2}(F(x) + 1) + \tfrac12 \rfloor$ with $F$ = :func:`mu_law_compress`:
    the compressed value is rounded to the nearest of $\mu + 1$ evenly spaced levels (a half
    rounds up). So $-1 \mapsto 0$, $0 \mapsto \lceil \mu/2 \rceil$ (128 for $\mu = 255$),
    $1 \mapsto \mu$.
    """
    mu = _check_mu(mu)
    q = jnp.floor((mu_law_compress(x, mu) + 1.0) * (mu / 2.0) + 0.5)
    return jnp.clip(q, 0, mu).astype(jnp.int32)


def mu_law_decode(q, mu: int = MU) -> jax.Array:
    r"""Levels $0..\mu$ back to audio: $y = 2q/\mu - 1$, $x = \mathrm{sign}(y)((1+\mu)^{|y|} - 1)/\mu$.

    The inverse of the compression at the centre of each level's bin, float32, same shape as
    ``q``; :func:`mu_law_encode` of the result gives ``q`` back exactly.
    """
    mu = _check_mu(mu)
    q = jnp.asarray(q)
    if not jnp.issubdtype(q.dtype, jnp.integer):
        raise ValueError(f"q must hold integer levels, got dtype {q.dtype}")
    y = 2.0 * q.astype(jnp.float32) / mu - 1.0
    return jnp.sign(y) * jnp.expm1(jnp.abs(y) * math.log1p(mu)) / mu


# --------------------------------------------------------------------------------------------
# Dilated causal convolutions
# --------------------------------------------------------------------------------------------
def _shift(x, s: int):
    """``x`` (..., T, C) delayed by ``s`` steps along the time axis, zeros entering on the left."""
    T = x.shape[-2]
    if s == 0:
        return x
    if s >= T:
        return jnp.zeros_like(x)
    pad = [(0, 0)] * (x.ndim - 2) + [(s, 0), (0, 0)]
    return jnp.pad(x, pad)[..., :T, :]


def _check_conv(x, kernel, dilation):
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    if kernel.ndim != 3:
        raise ValueError(f"kernel must have shape (k, C_in, C_out), got {kernel.shape}")
    if x.ndim < 2 or x.shape[-1] != kernel.shape[1]:
        raise ValueError(f"x must have shape (..., T, C_in={kernel.shape[1]}), got {x.shape}")
    return x, kernel, check_int("dilation", dilation)


def causal_conv(x, kernel, dilation: int = 1, bias=None) -> jax.Array:
    r"""The dilated causal convolution: $y_t = b + \sum_{i=0}^{k-1} x_{t-(k-1-i)d}\, W_i$.

    ``x`` (..., T, C_in), ``kernel`` $W$ (k, C_in, C_out), ``dilation`` $d \ge 1$, optional
    ``bias`` $b$ (C_out,): returns (..., T, C_out). Inputs before the start are zero (the input
    is padded with $(k-1)d$ zeros on the left only), so $y_t$ depends on
    $x_t, x_{t-d}, \dots, x_{t-(k-1)d}$ and never on the future. The last tap $W_{k-1}$ reads
    $x_t$ itself.
    """
    x, kernel, dilation = _check_conv(x, kernel, dilation)
    k = kernel.shape[0]
    y = sum(_shift(x, (k - 1 - i) * dilation) @ kernel[i] for i in range(k))
    return y if bias is None else y + bias


def same_conv(x, kernel, dilation: int = 1, bias=None) -> jax.Array:
    r"""The *non*-causal "SAME" convolution, for comparison only: the $(k-1)d$ zeros of padding
    are split between both ends, $\lfloor (k-1)d/2 \rfloor$ on the left and the rest on the right,
    as ``jax.lax.conv_general_dilated(..., padding="SAME")`` does, so the output keeps the length
    of the input but $y_t = b + \sum_i x_{t + i d - \lfloor (k-1)d/2 \rfloor} W_i$ reads the
    future: with $k = 2$, $d = 1$ it reads $x_t$ and $x_{t+1}$. Shapes as :func:`causal_conv`."""
    x, kernel, dilation = _check_conv(x, kernel, dilation)
    k = kernel.shape[0]
    total = (k - 1) * dilation
    left = total // 2
    lhs = jnp.moveaxis(x.reshape(-1, *x.shape[-2:]), -1, 1)  # (N, C_in, T)
    rhs = jnp.transpose(kernel, (2, 1, 0))  # (C_out, C_in, k)
    y = jax.lax.conv_general_dilated(lhs, rhs, (1,), [(left, total - left)],
                                     rhs_dilation=(dilation,))
    y = jnp.moveaxis(y, 1, -1).reshape(*x.shape[:-1], kernel.shape[2])
    return y if bias is None else y + bias


def receptive_field(dilations, kernel_size: int = 2) -> int:
    r"""$R = (k - 1) \sum_\ell d_\ell + 1$: how many inputs (the current one included) reach one
    output of a stack of causal convolutions of kernel size $k$ with dilations $d_\ell$.

    Each layer reaches $(k-1)d_\ell$ steps further into the past; the $+1$ is $x_t$ itself.
    """
    kernel_size = check_int("kernel_size", kernel_size)
    dilations = [check_int("dilation", d) for d in dilations]
    if not dilations:
        raise ValueError("dilations must not be empty")
    return (kernel_size - 1) * sum(dilations) + 1


def queue_step(queue, pos, x):
    r"""One update of a layer's input queue in fast generation (Paine et al. 2016), for $k = 2$.

    ``queue`` (B, d, C) holds the layer's last $d$ inputs in a circular buffer: the input of
    time $s$ sits in slot $s \bmod d$. At time ``pos`` $= t$ (an int32 scalar, may be traced),
    with the new input ``x`` $= x_t$ (B, C): read $x_{t-d}$ from slot $t \bmod d$ (all zeros while
    $t < d$: the queue starts empty), then write $x_t$ into that same slot.
    Returns ``(x_{t-d} (B, C), new queue (B, d, C))``.
    """
    slot = jnp.asarray(pos) % queue.shape[1]
    past = jax.lax.dynamic_index_in_dim(queue, slot, axis=1, keepdims=False)
    queue = jax.lax.dynamic_update_index_in_dim(queue, x.astype(queue.dtype), slot, axis=1)
    return past, queue


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class WaveNetConfig:
    """The shape of a :class:`WaveNet`.

    ``dilations`` of the residual layers (``(1, 2, ..., 512)`` gives $R = 1024$ with $k = 2$),
    ``residual`` channels $C$ of the residual stream, ``skip`` channels of the skip connections
    and the output head, ``levels`` the quantisation levels (the softmax size), ``num_classes``
    labels for global conditioning (0: none; otherwise label ``num_classes`` means "no label").
    """

    dilations: tuple = tuple(2**i for i in range(10))
    kernel_size: int = 2
    residual: int = 32
    skip: int = 64
    levels: int = LEVELS
    num_classes: int = 0

    def __post_init__(self):
        check_int("kernel_size", self.kernel_size, 2)
        check_int("residual", self.residual)
        check_int("skip", self.skip)
        check_int("levels", self.levels, 2)
        check_int("num_classes", self.num_classes, 0)
        object.__setattr__(self, "dilations", tuple(check_int("dilation", d)
                                                    for d in self.dilations))
        if not self.dilations:
            raise ValueError("dilations must not be empty")

    @property
    def receptive_field(self) -> int:
        return receptive_field(self.dilations, self.kernel_size)


class ResidualLayer(nnx.Module):
    r"""One gated residual layer of dilation $d$:

    $$z = \tanh(W_f * h + V_f c) \odot \sigma(W_g * h + V_g c), \qquad
    h' = h + W_r z, \qquad s = W_s z,$$

    where $*$ is the dilated causal convolution (:func:`causal_conv`, both filters in one kernel
    of $2C$ output channels split by :func:`arcourse.layers.gated_activation`), $c$ the global
    condition (a learned vector per label), $W_r$, $W_s$ 1x1 convolutions
    (:class:`arcourse.layers.Conv1x1`): ``h`` (B, T, C) -> ``(h' (B, T, C), s (B, T, S))``.
    """

    def __init__(self, cfg: WaveNetConfig, dilation: int, *, rngs: nnx.Rngs):
        C, k = cfg.residual, cfg.kernel_size
        self.dilation = check_int("dilation", dilation)
        self.kernel_size = k
        std = 1.0 / math.sqrt(k * C)
        self.kernel = nnx.Param(std * jax.random.normal(rngs.params(), (k, C, 2 * C)))
        self.bias = nnx.Param(jnp.zeros((2 * C,)))
        self.cond = (nnx.Embed(cfg.num_classes + 1, 2 * C, rngs=rngs)
                     if cfg.num_classes else None)
        self.res = Conv1x1(C, C, rngs=rngs)
        self.skip = Conv1x1(C, cfg.skip, rngs=rngs)

    def _condition(self, labels):
        if self.cond is None or labels is None:
            return 0.0
        return self.cond(labels)  # (B, 2C)

    def __call__(self, h, labels=None):
        z = causal_conv(h, self.kernel[...], self.dilation, self.bias[...])
        if self.cond is not None and labels is not None:
            z = z + self.cond(labels)[:, None, :]
        z = gated_activation(z)
        return h + self.res(z), self.skip(z)

    def step(self, h, queue, pos, labels=None):
        """One time step: ``h`` (B, C) the layer input at time ``pos``, ``queue`` (B, (k-1)d, C)
        its inputs at times ``pos - (k-1)d .. pos - 1`` (slot ``s mod (k-1)d``).
        Returns ``(h' (B, C), s (B, S), new queue)``."""
        k, d = self.kernel_size, self.dilation
        W = self.kernel[...]
        L = queue.shape[1]
        # Tap i reads x_{t-(k-1-i)d}, i.e. slot (t - (k-1-i)d) mod L; the last tap reads x_t.
        z = h @ W[k - 1]
        for i in range(k - 1):
            slot = (pos - (k - 1 - i) * d) % L
            z = z + jax.lax.dynamic_index_in_dim(queue, slot, 1, keepdims=False) @ W[i]
        queue = jax.lax.dynamic_update_index_in_dim(queue, h.astype(queue.dtype), pos % L, 1)
        z = gated_activation(z + self.bias[...] + self._condition(labels))
        return h + self.res(z), self.skip(z), queue


class WaveNetState(NamedTuple):
    """The fast decoder's state: one queue per layer (B, (k-1)d, C), the time of the next input
    ``pos`` (int32 scalar) and the conditioning ``labels`` (B,) int32."""

    queues: tuple
    pos: jax.Array
    labels: jax.Array


class WaveNet(nnx.Module):
    r"""WaveNet over mu-law levels: $p(x_{t+1} \mid x_{\le t}, c) = \mathrm{softmax}(\mathrm{head}(
    \sum_\ell s_\ell))_t$.

    Input levels are embedded (a 1x1 convolution of their one-hot code) into $C$ channels, pass
    the :class:`ResidualLayer` stack, and the skip outputs are summed:
    $\text{logits} = W_2\,\mathrm{relu}(W_1\,\mathrm{relu}(\sum_\ell s_\ell))$. The output at
    $t$ sees exactly the inputs $t - R + 1 .. t$, $R$ = ``cfg.receptive_field``, and predicts
    the level at $t + 1$.
    """

    def __init__(self, cfg: WaveNetConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, WaveNetConfig):
            raise TypeError(f"cfg must be a WaveNetConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.levels, cfg.residual, rngs=rngs)
        self.layers = nnx.List([ResidualLayer(cfg, d, rngs=rngs) for d in cfg.dilations])
        self.head1 = Conv1x1(cfg.skip, cfg.skip, rngs=rngs)
        self.head2 = Conv1x1(cfg.skip, cfg.levels, rngs=rngs)

    @property
    def receptive_field(self) -> int:
        return self.cfg.receptive_field

    def _labels(self, labels, batch):
        if not self.cfg.num_classes:
            return None
        if labels is None:  # "no label": the extra row of every conditioning table
            return jnp.full((batch,), self.cfg.num_classes, jnp.int32)
        labels = jnp.asarray(labels, jnp.int32)
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape (batch={batch},), got {labels.shape}")
        return labels

    def _head(self, skips):
        return self.head2(jax.nn.relu(self.head1(jax.nn.relu(skips))))

    def from_embeddings(self, h, labels=None, mask=None):
        """The network after the input embedding: ``h`` (B, T, C) -> logits (B, T, levels).

        ``mask`` (B, T) or (T,), optional: positions where it is false are treated as before the
        start (every layer's input there is zero), as the causal padding does.
        """
        return self._head(self.skip_sum(h, labels, mask))

    def skip_sum(self, h, labels=None, mask=None):
        r"""$\sum_\ell s_\ell$ (B, T, S), the input of the output head; arguments as
        :meth:`from_embeddings`."""
        labels = self._labels(labels, h.shape[0])
        m = None if mask is None else jnp.asarray(mask, h.dtype)[..., None]
        skips = 0.0
        for layer in self.layers:
            if m is not None:
                h = h * m
            h, s = layer(h, labels)
            skips = skips + s
        return skips

    def __call__(self, tokens, labels=None):
        """Teacher forcing: levels int (B, T) [and labels (B,)] -> logits (B, T, levels)."""
        tokens = jnp.asarray(tokens)
        if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be integer levels of shape (batch, time), got "
                             f"{tokens.dtype}{list(tokens.shape)}")
        return self.from_embeddings(self.embed(tokens), labels)

    # ------------------------------------------------ the decoding interface (arcourse.decoding)
    def init_state(self, batch_size: int, max_len: int | None = None, labels=None) -> WaveNetState:
        """Empty queues: zeros, as the causal padding. Their size, $(k-1)\\sum_\\ell d_\\ell$
        inputs per row, does not depend on ``max_len``."""
        batch_size = check_int("batch_size", batch_size)
        k, C = self.cfg.kernel_size, self.cfg.residual
        queues = tuple(jnp.zeros((batch_size, (k - 1) * d, C), jnp.float32)
                       for d in self.cfg.dilations)
        lab = self._labels(labels, batch_size)
        lab = jnp.zeros((batch_size,), jnp.int32) if lab is None else lab
        return WaveNetState(queues, jnp.zeros((), jnp.int32), lab)

    def step(self, state: WaveNetState, tokens):
        """Feed one level per row (B,) at time ``state.pos``: (logits (B, levels), new state).
        Every layer reads its input of $(k-1)d$ steps ago from its queue: $O(\\text{layers})$."""
        h = self.embed(jnp.asarray(tokens))
        labels = state.labels if self.cfg.num_classes else None
        skips = 0.0
        queues = []
        for layer, q in zip(self.layers, state.queues):
            h, s, q = layer.step(h, q, state.pos, labels)
            skips = skips + s
            queues.append(q)
        return self._head(skips), WaveNetState(tuple(queues), state.pos + 1, state.labels)

    def prefill(self, state: WaveNetState, prompt):
        """Read ``prompt`` (B, P) one sample at a time (:func:`arcourse.decoding.prefill_by_steps`)."""
        return prefill_by_steps(self, state, jnp.asarray(prompt, jnp.int32))


class NaiveWaveNet(nnx.Module):
    """The slow decoder, with the same decoding interface: each step reruns the whole stack of
    ``model`` over a window of the last $R$ samples (positions before the start masked out),
    $O(R \\cdot$ layers$)$ per sample. Its state: ``(window (B, R) int32, n int32, labels)``."""

    def __init__(self, model: WaveNet):
        if not isinstance(model, WaveNet):
            raise TypeError(f"model must be a WaveNet, got {type(model).__name__}")
        self.model = model

    def init_state(self, batch_size: int, max_len: int | None = None, labels=None):
        batch_size = check_int("batch_size", batch_size)
        lab = self.model._labels(labels, batch_size)
        lab = jnp.zeros((batch_size,), jnp.int32) if lab is None else lab
        R = self.model.receptive_field
        return jnp.zeros((batch_size, R), jnp.int32), jnp.zeros((), jnp.int32), lab

    def step(self, state, tokens):
        window, n, labels = state
        R = window.shape[1]
        window = jnp.concatenate([window[:, 1:], jnp.asarray(tokens, jnp.int32)[:, None]], axis=1)
        n = n + 1
        valid = jnp.arange(R) >= R - n  # the last n positions hold real samples
        skips = self.model.skip_sum(self.model.embed(window),
                                    labels if self.model.cfg.num_classes else None, mask=valid)
        return self.model._head(skips[:, -1]), (window, n, labels)

    def prefill(self, state, prompt):
        return prefill_by_steps(self, state, jnp.asarray(prompt, jnp.int32))


class _Conditioned(nnx.Module):
    """A conditional decoder with its labels fixed: what :func:`conditioned` returns."""

    def __init__(self, model, labels):
        self.model = model
        self.labels = nnx.Variable(jnp.asarray(labels, jnp.int32))

    def init_state(self, batch_size: int, max_len: int | None = None):
        if batch_size != self.labels.shape[0]:
            raise ValueError(f"batch_size={batch_size} must equal the number of labels "
                             f"{self.labels.shape[0]}")
        return self.model.init_state(batch_size, max_len, labels=self.labels[...])

    def prefill(self, state, prompt):
        return self.model.prefill(state, prompt)

    def step(self, state, tokens):
        return self.model.step(state, tokens)


def conditioned(model, labels):
    """``model`` (a :class:`WaveNet` or :class:`NaiveWaveNet`) generating with the global
    condition ``labels`` (B,), one per row: ``generate(conditioned(model, notes), prompt, ...)``.
    The labels travel in the decoding state, so new labels do not recompile."""
    labels = jnp.asarray(labels)
    if labels.ndim != 1 or not jnp.issubdtype(labels.dtype, jnp.integer):
        raise ValueError(f"labels must be integers of shape (batch,), got {labels.dtype}"
                         f"{list(labels.shape)}")
    inner = model.model if isinstance(model, NaiveWaveNet) else model
    if not inner.cfg.num_classes:
        raise ValueError("model was built without conditioning (num_classes=0)")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) > inner.cfg.num_classes):
        raise ValueError(f"labels must lie in [0, {inner.cfg.num_classes}] "
                         f"({inner.cfg.num_classes} = no label)")
    return _Conditioned(model, labels)


@functools.partial(jax.jit, static_argnames=("graphdef", "num_samples"))
def _sample(graphdef, num_samples, params, state, prompt, key, temperature):
    model = nnx.merge(graphdef, params)
    logits, state = model.prefill(state, prompt)

    def body(carry, k):
        state, logits = carry
        x = jax.random.categorical(k, logits / temperature, axis=-1).astype(jnp.int32)
        logits, state = model.step(state, x)
        return (state, logits), x

    _, xs = jax.lax.scan(body, (state, logits), jax.random.split(key, num_samples))
    return xs.T


def sample(key, model, prompt, num_samples: int, *, temperature: float = 1.0) -> jax.Array:
    r"""Ancestral sampling, $x_{t+1} \sim \mathrm{softmax}(z_t / \tau)$, fed back one sample at a
    time: int32 (B, num_samples) after ``prompt`` int32 (B, P).

    ``model`` has the decoding interface (:class:`WaveNet`, :class:`NaiveWaveNet`, or either
    wrapped by :func:`conditioned`). The whole loop is one compiled ``lax.scan`` and the parameters
    are its arguments. With the same key it draws what :func:`arcourse.decoding.generate` draws
    with every logit processor off, without their cost (about $V^2$ per step for $V = 256$).
    """
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be integer levels of shape (batch, length >= 1), got "
                         f"{prompt.dtype}{list(prompt.shape)}")
    num_samples = check_int("num_samples", num_samples)
    temperature = check_positive_float("temperature", temperature)
    graphdef, params = nnx.split(model)
    state = model.init_state(prompt.shape[0], prompt.shape[1] + num_samples)
    return _sample(graphdef, num_samples, params, state, prompt.astype(jnp.int32), key,
                   jnp.float32(temperature))


# --------------------------------------------------------------------------------------------
# Training and baselines
# --------------------------------------------------------------------------------------------
def wavenet_loss(model: WaveNet, batch) -> jax.Array:
    r"""Mean NLL (nats) of the next level, $-\frac1{BT}\sum \ln p(x_{t+1} \mid x_{\le t}, c)$:
    ``batch = (inputs (B, T), targets (B, T), labels (B,) or None)``, for :func:`arcourse.train.fit`."""
    from arcourse.losses import cross_entropy

    inputs, targets, labels = batch
    return cross_entropy(model(inputs, labels), targets)


def random_crops(key, levels, notes, batch_size: int, length: int, *, drop_label: float = 0.0,
                 num_classes: int = 0):
    """Random training crops from clips of mu-law ``levels`` (N, L) with labels ``notes`` (N,):
    ``(inputs (B, length), targets (B, length), labels (B,))``, targets shifted by one.

    With probability ``drop_label`` a label is replaced by ``num_classes`` ("no label"), so one
    model learns both $p(x \\mid c)$ and $p(x)$. Traceable under ``jit``.
    """
    levels, notes = jnp.asarray(levels), jnp.asarray(notes)
    N, L = levels.shape
    if L < length + 1:
        raise ValueError(f"clips of {L} samples are too short for crops of length+1={length + 1}")
    k1, k2, k3 = jax.random.split(key, 3)
    rows = jax.random.randint(k1, (batch_size,), 0, N)
    starts = jax.random.randint(k2, (batch_size,), 0, L - length)
    idx = starts[:, None] + jnp.arange(length + 1)[None, :]
    win = levels[rows[:, None], idx]
    labels = notes[rows]
    if drop_label:
        labels = jnp.where(jax.random.bernoulli(k3, drop_label, (batch_size,)), num_classes,
                           labels)
    return win[:, :-1], win[:, 1:], labels.astype(jnp.int32)


def marginal_bits(train_levels, test_levels, levels: int = LEVELS, alpha: float = 0.5) -> float:
    r"""Held-out bits per sample of the mu-law marginal $\hat p(q) \propto N(q) + \alpha$ (no
    context at all), fitted on ``train_levels``."""
    counts = np.bincount(np.asarray(train_levels).ravel(), minlength=levels) + alpha
    logp = np.log2(counts / counts.sum())
    return float(-logp[np.asarray(test_levels).ravel()].mean())


def count_model_bits(train_clips, test_clips, order: int, alpha: float,
                     levels: int = LEVELS) -> float:
    r"""Held-out bits per sample of a count model on the previous ``order`` samples:
    $\hat p(x_t \mid c) = (N(c, x_t) + \alpha) / (N(c) + \alpha V)$, $c = x_{t-\text{order}:t}$.

    Counted over every position $t \ge$ ``order`` of every clip (N, L), scored on the same
    positions of the held-out clips. Sparse counts (a hash of the context), so order 2 with
    $V = 256$ (65,536 contexts) is cheap.
    """
    order = check_int("order", order)

    def keys(clips):
        clips = np.asarray(clips, np.int64)
        ctx = np.zeros(clips[:, order:].shape, np.int64)
        for j in range(order):
            ctx = ctx * levels + clips[:, j: clips.shape[1] - order + j]
        return ctx.ravel(), clips[:, order:].ravel()

    c_tr, x_tr = keys(train_clips)
    c_te, x_te = keys(test_clips)
    pair_tr = c_tr * levels + x_tr
    uniq_pair, n_pair = np.unique(pair_tr, return_counts=True)
    uniq_ctx, n_ctx = np.unique(c_tr, return_counts=True)
    pair_te = c_te * levels + x_te
    i = np.searchsorted(uniq_pair, pair_te).clip(0, len(uniq_pair) - 1)
    n_xc = np.where(uniq_pair[i] == pair_te, n_pair[i], 0)
    j = np.searchsorted(uniq_ctx, c_te).clip(0, len(uniq_ctx) - 1)
    n_c = np.where(uniq_ctx[j] == c_te, n_ctx[j], 0)
    p = (n_xc + alpha) / (n_c + alpha * levels)
    return float(-np.log2(p).mean())


def num_params(model) -> int:
    """The number of trainable parameters of ``model``."""
    return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
