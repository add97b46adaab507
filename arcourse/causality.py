r"""Which inputs does each output depend on? Dependency maps from Jacobians.

For a function $f$ from an input with *positions* (a sequence of $T$ tokens, an $H \times W$
image) and trailing *feature* axes (an embedding, one-hot levels, channels) to an output laid out
the same way, the dependency map is

$$D[i, j] = \sum_{a, b} \left| \frac{\partial f(x)_{i, a}}{\partial x_{j, b}} \right|,$$

with output positions $i$ and input positions $j$ flattened in raster (C) order. An autoregressive
model is *causal* exactly when $D[i, j] = 0$ for every $j \ge i$ (strictly: the output at $i$
predicts $x_i$, so it must not see it), at every input $x$. A zero in $D$ is exact: masked
weights and absent paths give gradients that are exactly 0.0, not merely small.

Two ways to compute $D$: :func:`dependency_map` with ``method="jacrev"`` builds the full Jacobian
(reverse mode, one backward pass per output element); ``method="vjp"`` runs one vector-Jacobian
product per output *position*, with a random cotangent over its features (so no accidental
cancellation), which needs far less memory for wide outputs. Both give the same zero pattern.
The same functions serve a PixelCNN (images) and a GPT (sequences).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "dependency_map",
    "dependency_map_many",
    "causal_violations",
    "is_causal",
    "missing_dependencies",
    "row_as_image",
    "plot_dependency_map",
    "plot_receptive_field",
]


def _positions(shape, event_ndim, name):
    if not isinstance(event_ndim, int) or event_ndim < 0 or event_ndim > len(shape):
        raise ValueError(f"{name} must be an integer in [0, {len(shape)}], got {event_ndim!r}")
    pos = shape[: len(shape) - event_ndim]
    if len(pos) == 0:
        raise ValueError(f"{name}={event_ndim} leaves no position axes in shape {shape}")
    return pos


def dependency_map(fn: Callable[[jax.Array], jax.Array], x: jax.Array, *,
                   in_event_ndim: int = 1, out_event_ndim: int = 1, method: str = "jacrev",
                   seed: int = 0) -> np.ndarray:
    r"""$D[i, j] = \sum |\partial f(x)_i / \partial x_j|$ over the feature axes: ``float[N_out, N_in]``.

    Args:
      fn: a pure, differentiable function of one float array (no batch axis: wrap a batched
        model as ``lambda x: model(x[None])[0]``).
      x: the input, shape ``positions + features``; e.g. ``[T, d]`` for a sequence of
        embeddings, ``[H, W, L]`` for a one-hot image.
      in_event_ndim, out_event_ndim: how many trailing axes of the input / output are features
        (summed over), not positions. 0 is allowed (a scalar per position).
      method: ``"jacrev"`` (full Jacobian) or ``"vjp"`` (one product per output position).
      seed: the seed of the random cotangents of ``"vjp"``.

    Positions are flattened in raster order, so for an image pixel $(r, c)$ is $rW + c$.
    """
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"x must be a float array (embed or one-hot integer inputs first), "
                         f"got dtype {x.dtype}")
    in_pos = _positions(x.shape, in_event_ndim, "in_event_ndim")
    n_in = math.prod(in_pos)
    if method == "jacrev":
        y = jax.eval_shape(fn, x)
        out_pos = _positions(y.shape, out_event_ndim, "out_event_ndim")
        jac = jax.jit(jax.jacrev(fn))(x)  # out.shape + x.shape
        jac = jnp.abs(jac).reshape(math.prod(out_pos), -1, n_in, math.prod(x.shape[len(in_pos):]))
        return np.asarray(jac.sum(axis=(1, 3)))
    if method == "vjp":
        rows = _vjp_rows(fn, x, n_in, out_event_ndim)
        return np.asarray(jax.jit(rows)(x, jax.random.key(seed)))
    raise ValueError(f"method must be 'jacrev' or 'vjp', got {method!r}")


def _vjp_rows(fn, x, n_in: int, out_event_ndim: int):
    """``rows(x, key) -> float[N_out, N_in]``: the dependency map at ``x`` from one
    vector-Jacobian product per output position (traceable; shapes taken from ``x``)."""
    y = jax.eval_shape(fn, x)
    out_pos = _positions(y.shape, out_event_ndim, "out_event_ndim")
    n_out = math.prod(out_pos)
    event = y.shape[len(out_pos):]

    def rows(x, key):
        _, pullback = jax.vjp(fn, x)
        noise = jax.random.normal(key, (n_out, *event), y.dtype)
        onehot = jnp.eye(n_out, dtype=y.dtype).reshape(n_out, n_out, *([1] * len(event)))
        # Cotangent for output position i: random weights on its features, zero elsewhere.
        cts = (onehot * noise[:, None]).reshape(n_out, *y.shape)
        (g,) = jax.lax.map(pullback, cts, batch_size=64)
        return jnp.abs(g).reshape(n_out, n_in, -1).sum(-1)

    return rows


def dependency_map_many(fn: Callable[[jax.Array], jax.Array], xs: jax.Array, *,
                        in_event_ndim: int = 1, out_event_ndim: int = 1,
                        seed: int = 0) -> np.ndarray:
    r"""The dependency maps of several inputs ``xs[k]`` added up: ``float[N_out, N_in]``.

    A Jacobian at one input shows only that input: a dependency can vanish there by chance (a
    ReLU that happens to be off everywhere on the path). Summed over several random inputs, a
    zero means "zero at all of them". ``xs`` has a leading axis of inputs, each shaped as ``x``
    of :func:`dependency_map`. Each map is computed as ``method="vjp"`` there does (one
    vector-Jacobian product per output position, random weights over its features, so no
    accidental cancellation), all inputs in one compiled function: the zero pattern is that of
    the full Jacobians, at a fraction of the cost.
    """
    xs = jnp.asarray(xs)
    if xs.ndim < 2 or not jnp.issubdtype(xs.dtype, jnp.floating):
        raise ValueError(f"xs must be a float array [K, ...] of K inputs, got {xs.dtype}{xs.shape}")
    n_in = math.prod(_positions(xs.shape[1:], in_event_ndim, "in_event_ndim"))
    rows = _vjp_rows(fn, xs[0], n_in, out_event_ndim)

    @jax.jit
    def total(xs, key):
        return jax.vmap(rows)(xs, jax.random.split(key, xs.shape[0])).sum(0)

    return np.asarray(total(xs, jax.random.key(seed)))


def _square(D):
    D = np.asarray(D)
    if D.ndim != 2 or D.shape[0] != D.shape[1]:
        raise ValueError(f"D must be a square [N, N] dependency map, got shape {D.shape}")
    return D


def causal_violations(D, *, strict: bool = True) -> np.ndarray:
    r"""The pairs $(i, j)$ with $D[i, j] \ne 0$ where the output $i$ must not see input $j$:
    $j \ge i$ when ``strict`` (the output at $i$ predicts $x_i$), $j > i$ otherwise.
    Returns ``int[K, 2]``; empty for a causal model."""
    D = _square(D)
    forbidden = np.triu(np.ones(D.shape, bool), 0 if strict else 1)
    return np.argwhere(forbidden & (D != 0))


def is_causal(D, *, strict: bool = True) -> bool:
    """True when :func:`causal_violations` finds none."""
    return len(causal_violations(D, strict=strict)) == 0


def missing_dependencies(D, *, strict: bool = True) -> np.ndarray:
    r"""The allowed pairs the model ignores: $D[i, j] = 0$ with $j < i$ (``strict``) or
    $j \le i$. For an image model whose receptive field covers the image, these are its blind
    spots. Returns ``int[K, 2]``."""
    D = _square(D)
    allowed = np.tril(np.ones(D.shape, bool), -1 if strict else 0)
    return np.argwhere(allowed & (D == 0))


def row_as_image(D, index, shape) -> np.ndarray:
    """The inputs that output ``index`` (raster) depends on, as an image of ``shape``."""
    D = np.asarray(D)
    if math.prod(shape) != D.shape[1]:
        raise ValueError(f"shape {shape} does not hold the {D.shape[1]} input positions of D")
    if not 0 <= index < D.shape[0]:
        raise ValueError(f"index must lie in [0, {D.shape[0]}), got {index!r}")
    return D[index].reshape(shape)


def plot_dependency_map(D, ax=None, title: str = "", strict: bool = True):
    """Heatmap of $D$ (output position down, input position across), the forbidden triangle
    outlined; dependencies shown as present (dark) or absent (light)."""
    import matplotlib.pyplot as plt

    D = _square(D)
    ax = ax or plt.gca()
    ax.imshow(D != 0, cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    n = D.shape[0]
    k = 0 if strict else 1
    edge = [(-0.5 + k, -0.5)]
    for i in range(n):
        edge += [(i - 0.5 + k, i - 0.5), (i - 0.5 + k, i + 0.5)]
    xs, ys = zip(*edge)
    ax.plot(np.clip(xs, -0.5, n - 0.5), ys, color="tab:red", lw=1)
    bad = causal_violations(D, strict=strict)
    if len(bad):
        ax.scatter(bad[:, 1], bad[:, 0], s=6, color="tab:red", label="sees the future")
        ax.legend(fontsize=7, loc="upper right")
    ax.set_xlabel("input position j")
    ax.set_ylabel("output position i")
    ax.set_title(title or "dependency map (red line: j = i)", fontsize=9)
    return ax


def plot_receptive_field(D, index, shape, ax=None, title: str = ""):
    """One output pixel's receptive field: grey = inputs it depends on, white = not, the pixel
    itself in red, and the allowed-but-ignored pixels (blind spot) in orange."""
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    H, W = shape
    row = row_as_image(D, index, shape)
    img = np.where(row != 0, 1, 0)
    before = (np.arange(H * W) < index).reshape(H, W)
    img = np.where(before & (row == 0), 2, img)
    img.reshape(-1)[index] = 3
    ax = ax or plt.gca()
    cmap = ListedColormap(["white", "0.45", "orange", "tab:red"])
    ax.imshow(img, cmap=cmap, vmin=0, vmax=3, interpolation="nearest")
    ax.set_xticks(np.arange(-0.5, W, 1), minor=True)
    ax.set_yticks(np.arange(-0.5, H, 1), minor=True)
    ax.grid(which="minor", color="0.8", lw=0.5)
    ax.tick_params(which="both", length=0, labelbottom=False, labelleft=False)
    r, c = divmod(index, W)
    ax.set_title(title or f"pixel ({r}, {c})", fontsize=9)
    return ax
