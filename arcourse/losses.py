r"""Training an autoregressive model: losses in log space, label smoothing, clipping, schedules.

* :func:`log_softmax` — $z_i - m - \ln\sum_j e^{z_j - m}$ with $m = \max_j z_j$: finite for any
  finite logits, where :func:`naive_log_softmax` ($\ln$ of $e^{z_i}/\sum_j e^{z_j}$) overflows.
* :func:`cross_entropy` — mean $-\ln p(x)$ from logits, optionally against label-smoothed targets.
* :func:`next_token_loss` — teacher forcing: the logits at position $t$ score token $t+1$.
* :func:`global_norm`, :func:`clip_by_global_norm` — rescale the whole gradient, keeping its
  direction; :func:`clip_by_value` clips each element, which changes the direction.
* :func:`warmup_cosine` and :func:`make_optimizer` — linear warmup then cosine decay, AdamW,
  global-norm clipping, as one Optax chain.
* :func:`scheduled_sampling_inputs` — replace some teacher-forced inputs by the model's own draws
  (Bengio et al., 2015), the parallel form of Mihaylova and Martins (2019).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arcourse._checks import check_int

__all__ = [
    "log_softmax",
    "naive_log_softmax",
    "smooth_labels",
    "cross_entropy",
    "next_token_loss",
    "lm_loss",
    "global_norm",
    "clip_by_global_norm",
    "clip_by_value",
    "warmup_cosine",
    "make_optimizer",
    "scheduled_sampling_inputs",
]


def _check_logits_targets(logits, targets):
    logits, targets = jnp.asarray(logits), jnp.asarray(targets)
    if logits.ndim < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits must have shape targets.shape + (V,); got logits "
                         f"{logits.shape} and targets {targets.shape}")
    if not jnp.issubdtype(targets.dtype, jnp.integer):
        raise ValueError(f"targets must hold integer symbols, got dtype {targets.dtype}")
    return logits, targets


def _check_smoothing(label_smoothing) -> None:
    if isinstance(label_smoothing, int | float) and not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must lie in [0, 1], got {label_smoothing!r}")


def log_softmax(logits: jax.Array, axis: int = -1) -> jax.Array:
    r"""$\ln \mathrm{softmax}(z)_i = (z_i - m) - \ln \sum_j e^{z_j - m}$, $m = \max_j z_j$.

    Subtracting the maximum changes nothing mathematically, but every exponent is then $\le 0$:
    nothing overflows, and the largest term is $e^0 = 1$, so the sum never underflows to 0.
    """
    z = jnp.asarray(logits)
    m = jax.lax.stop_gradient(jnp.max(z, axis=axis, keepdims=True))
    shifted = z - m
    return shifted - jnp.log(jnp.sum(jnp.exp(shifted), axis=axis, keepdims=True))


def naive_log_softmax(logits: jax.Array, axis: int = -1) -> jax.Array:
    r"""$\ln\big(e^{z_i} / \sum_j e^{z_j}\big)$ computed literally: a demonstration of what fails.

    In float32, $e^{z}$ overflows to ``inf`` for $z > 88.7$ (then ``inf/inf = nan``) and a
    probability below about $10^{-45}$ underflows to 0 (then $\ln 0 = -\infty$).
    """
    e = jnp.exp(jnp.asarray(logits))
    return jnp.log(e / jnp.sum(e, axis=axis, keepdims=True))


def smooth_labels(targets: jax.Array, vocab_size: int, label_smoothing: float) -> jax.Array:
    r"""Label-smoothed target distributions $q = (1-\varepsilon)\,\mathrm{onehot}(x) + \varepsilon/V$.

    The $\varepsilon$ mass is spread uniformly over all $V$ symbols, the target included
    (Szegedy et al., 2016; ``optax.smooth_labels``). ``int[...]`` -> ``float32[..., V]``.
    """
    _check_smoothing(label_smoothing)
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int | np.integer) \
            or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer, got {vocab_size!r}")
    onehot = jax.nn.one_hot(targets, vocab_size, dtype=jnp.float32)
    return (1.0 - label_smoothing) * onehot + label_smoothing / vocab_size


def cross_entropy(logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0,
                  mask: jax.Array | None = None) -> jax.Array:
    r"""Mean cross-entropy in nats, $-\frac1N\sum_t \sum_v q_t(v) \ln \mathrm{softmax}(z_t)_v$.

    With ``label_smoothing`` $=0$, $q_t$ is one-hot and this is the NLL $-\frac1N\sum_t \ln
    p(x_t)$. Otherwise it equals $(1-\varepsilon)\,\mathrm{NLL} + \varepsilon \cdot
    \frac1V\sum_v(-\ln p(v))$. ``logits`` (..., V), integer ``targets`` (...); ``mask`` (same shape
    as ``targets``, optional) selects the positions that count.
    """
    logits, targets = _check_logits_targets(logits, targets)
    _check_smoothing(label_smoothing)
    logp = log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(logp, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    per_token = (1.0 - label_smoothing) * nll - label_smoothing * jnp.mean(logp, axis=-1)
    if mask is None:
        return jnp.mean(per_token)
    mask = jnp.asarray(mask, jnp.float32)
    if mask.shape != targets.shape:
        raise ValueError(f"mask must have the shape of targets {targets.shape}, got {mask.shape}")
    return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def next_token_loss(logits: jax.Array, tokens: jax.Array, *,
                    label_smoothing: float = 0.0) -> jax.Array:
    r"""Teacher forcing: $-\frac{1}{B(T-1)}\sum_{b,t<T-1} \ln p(x_{b,t+1} \mid x_{b,\le t})$.

    ``logits`` ``float[B, T, V]`` come from running the model on ``tokens`` ``int[B, T]`` itself;
    position $t$ has seen tokens up to $t$, so it is scored on token $t+1$ and the last position
    has no target.
    """
    logits, tokens = jnp.asarray(logits), jnp.asarray(tokens)
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits must have shape (B, T, V) with tokens (B, T); got logits "
                         f"{logits.shape} and tokens {tokens.shape}")
    if tokens.shape[1] < 2:
        raise ValueError(f"tokens need at least 2 time steps to have a target, got {tokens.shape}")
    return cross_entropy(logits[:, :-1], tokens[:, 1:], label_smoothing=label_smoothing)


def lm_loss(model, batch) -> jax.Array:
    r"""The loss every language model of the course trains with, in :func:`arcourse.train.fit`'s
    form ``loss_fn(model, batch)``: the mean NLL (nats) of ``targets`` under ``model(inputs)``.

    ``batch = (inputs, targets)`` or ``(inputs, targets, mask)``, each (B, T): ``model(inputs)``
    gives logits (B, T, V) and ``targets[:, t]`` is the token that follows ``inputs[:, t]``; with
    a mask, the mean is over the positions where it is true.
    """
    inputs, targets, *rest = batch
    return cross_entropy(model(inputs), targets, mask=rest[0] if rest else None)


def global_norm(tree) -> jax.Array:
    r"""$\lVert g \rVert = \sqrt{\sum_\ell \sum_i g_{\ell,i}^2}$ over every leaf of a pytree."""
    leaves = [jnp.asarray(x, jnp.float32) for x in jax.tree_util.tree_leaves(tree)]
    if not leaves:
        raise ValueError("tree has no array leaves")
    # Scaled by the largest |g| first (the log-sum-exp idea again): squares of gradients above
    # about 1e19 would overflow float32, yet their norm is representable.
    m = jnp.max(jnp.stack([jnp.max(jnp.abs(x), initial=0.0) for x in leaves]))
    safe = jnp.where(m > 0, m, 1.0)
    return safe * jnp.sqrt(sum(jnp.sum(jnp.square(x / safe)) for x in leaves))


def clip_by_global_norm(tree, max_norm: float):
    r"""$g \cdot \min(1, c / \lVert g \rVert)$: the same direction, a norm of at most $c$.

    Every leaf is scaled by the same factor (the norm is taken over the whole pytree), so the
    update still points along the gradient. Equals ``optax.clip_by_global_norm(c)``.
    """
    if isinstance(max_norm, int | float) and not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm!r}")
    norm = global_norm(tree)
    scale = jnp.minimum(1.0, max_norm / jnp.maximum(norm, 1e-30))
    return jax.tree_util.tree_map(lambda g: (g * scale).astype(jnp.asarray(g).dtype), tree)


def clip_by_value(tree, max_value: float):
    r"""Clip each element to $[-c, c]$: bounded, but no longer parallel to the gradient."""
    if isinstance(max_value, int | float) and not max_value > 0:
        raise ValueError(f"max_value must be > 0, got {max_value!r}")
    return jax.tree_util.tree_map(lambda g: jnp.clip(g, -max_value, max_value), tree)


def warmup_cosine(step, *, peak: float, warmup_steps: int, total_steps: int,
                  final: float = 0.0) -> jax.Array:
    r"""Linear warmup from 0 to ``peak`` over ``warmup_steps``, then cosine decay to ``final``.

    $$\eta(s) = \begin{cases} \eta_{\max}\, s / w & s < w \\
    f + (\eta_{\max} - f)\,\tfrac12\big(1 + \cos(\pi \min(1, \tfrac{s-w}{S-w}))\big) & s \ge w
    \end{cases}$$

    with $w$ = ``warmup_steps`` and $S$ = ``total_steps`` (which includes the warmup). The same
    values as ``optax.warmup_cosine_decay_schedule(0, peak, w, S, final)``.
    """
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int | np.integer) \
            or warmup_steps < 0:
        raise ValueError(f"warmup_steps must be a non-negative integer, got {warmup_steps!r}")
    if not isinstance(total_steps, int | np.integer) or total_steps <= warmup_steps:
        raise ValueError(f"total_steps must be an integer > warmup_steps={warmup_steps}, "
                         f"got {total_steps!r}")
    s = jnp.asarray(step, jnp.float32)
    warm = peak * s / max(warmup_steps, 1)
    frac = jnp.clip((s - warmup_steps) / (total_steps - warmup_steps), 0.0, 1.0)
    decay = final + (peak - final) * 0.5 * (1.0 + jnp.cos(math.pi * frac))
    return jnp.where(s < warmup_steps, warm, decay)


def make_optimizer(peak_lr: float, total_steps: int, *, warmup_steps: int = 0,
                   final_lr: float = 0.0, clip_norm: float | None = 1.0,
                   weight_decay: float = 0.0, init_lr: float = 0.0) -> optax.GradientTransformation:
    """The course's optimiser: global-norm clipping (if ``clip_norm``), then Adam with decoupled
    weight decay (AdamW; ``weight_decay=0`` is plain Adam) on the :func:`warmup_cosine` schedule:
    a linear warm-up from ``init_lr`` to ``peak_lr`` over ``warmup_steps``, then a cosine decay to
    ``final_lr`` at ``total_steps`` (``final_lr = peak_lr``: a constant rate)."""
    if not peak_lr > 0:
        raise ValueError(f"peak_lr must be > 0, got {peak_lr!r}")
    total_steps = check_int("total_steps", total_steps)
    warmup_steps = check_int("warmup_steps", warmup_steps, 0, total_steps - 1)
    schedule = optax.warmup_cosine_decay_schedule(init_lr, peak_lr, warmup_steps, total_steps,
                                                  final_lr)
    parts = [] if clip_norm is None else [optax.clip_by_global_norm(clip_norm)]
    parts.append(optax.adamw(schedule, weight_decay=weight_decay))
    return optax.chain(*parts)


def scheduled_sampling_inputs(key: jax.Array, tokens: jax.Array, logits: jax.Array,
                              mix_prob) -> jax.Array:
    r"""Teacher-forced inputs with some symbols replaced by the model's own predictions.

    ``logits`` ``[B, T, V]`` are the model's teacher-forced outputs on ``tokens`` ``[B, T]``, so
    ``logits[:, t]`` predicts token $t+1$. Each input $t \ge 1$ is independently replaced, with
    probability ``mix_prob``, by a draw $\hat x_t \sim \mathrm{softmax}(z_{t-1})$; position 0
    is kept. The targets of the loss stay the true tokens. Gradients do not flow through draws.
    """
    tokens, logits = jnp.asarray(tokens), jax.lax.stop_gradient(jnp.asarray(logits))
    if logits.ndim != 3 or logits.shape[:2] != tokens.shape:
        raise ValueError(f"logits must have shape (B, T, V) with tokens (B, T); got logits "
                         f"{logits.shape} and tokens {tokens.shape}")
    if isinstance(mix_prob, int | float) and not 0.0 <= mix_prob <= 1.0:
        raise ValueError(f"mix_prob must lie in [0, 1], got {mix_prob!r}")
    k_draw, k_mix = jax.random.split(key)
    drawn = jax.random.categorical(k_draw, logits[:, :-1], axis=-1).astype(tokens.dtype)
    replace = jax.random.bernoulli(k_mix, mix_prob, drawn.shape)
    mixed = jnp.where(replace, drawn, tokens[:, 1:])
    return jnp.concatenate([tokens[:, :1], mixed], axis=1)
