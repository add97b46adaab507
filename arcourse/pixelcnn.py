r"""PixelCNN and Gated PixelCNN on small grey-level images.

An image $x$ of $H \times W$ pixels, each one of $L$ grey levels, is factorised in raster order
(row by row, left to right), pixel $i = rW + c$:

$$p(x) = \prod_{i=0}^{HW-1} p(x_i \mid x_{<i}), \qquad
  \text{bits/dim} = -\frac{1}{HW}\sum_i \log_2 p(x_i \mid x_{<i}).$$

Every conditional comes out of one convolutional pass whose kernels are *masked* so that the
output at pixel $i$ never sees an input pixel $j \ge i$:

* :func:`causal_mask` type ``"A"`` (first layer: the centre is hidden, the output at $i$ must not
  see $x_i$) and type ``"B"`` (later layers: the centre is kept, it holds features of $x_{<i}$);
* :func:`vertical_mask` / :func:`horizontal_mask`: the two stacks of the Gated PixelCNN
  (van den Oord et al., 2016), which together remove the *blind spot* of a plain stack.

Masks are NumPy constants built from static sizes, multiplied into the kernel inside the forward
pass: they are not module state, so no optimiser can ever train them, and the gradient of every
masked weight is exactly zero.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse._checks import as_array
from arcourse.layers import Conv1x1, gated_activation

__all__ = [
    "causal_mask",
    "vertical_mask",
    "horizontal_mask",
    "conv_mask",
    "masked_conv",
    "MaskedConv2d",
    "gated_activation",
    "PixelCNN",
    "GatedPixelCNN",
    "nll",
    "bits_per_dim",
    "image_log_probs",
    "sequential_log_probs",
    "sample_pixel",
    "sample",
    "independent_pixel_bpd",
    "receptive_field",
]

MASK_KINDS = ("A", "B", "vertical_first", "vertical", "horizontal_first", "horizontal", "full")


# --------------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------------
def _check_odd(kernel_size, name="kernel_size"):
    if not isinstance(kernel_size, int | np.integer) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name} must be a positive odd integer, got {kernel_size!r}")


def causal_mask(kernel_size: int, mask_type: str) -> np.ndarray:
    r"""The $k \times k$ raster-order mask of a PixelCNN convolution, bool ``[k, k]``.

    With centre $m = \lfloor k/2 \rfloor$, ``mask[u, v]`` is true for the rows above the centre
    ($u < m$), for the pixels left of the centre on its row ($u = m, v < m$) and, for type
    ``"B"`` only, for the centre itself. Type ``"A"`` hides the centre.
    """
    _check_odd(kernel_size)
    if mask_type not in ("A", "B"):
        raise ValueError(f"mask_type must be 'A' or 'B', got {mask_type!r}")
    m = kernel_size // 2
    mask = np.zeros((kernel_size, kernel_size), bool)
    mask[:m, :] = True
    mask[m, :m] = True
    mask[m, m] = mask_type == "B"
    return mask


def vertical_mask(kernel_size: int, first: bool) -> np.ndarray:
    r"""The vertical stack's $k \times k$ mask: the rows above the centre, plus the centre row
    unless ``first``.

    The first layer must not see the current row at all; later layers may, because from then on
    the vertical features at row $r$ only hold information about input rows $< r$.
    """
    _check_odd(kernel_size)
    m = kernel_size // 2
    mask = np.zeros((kernel_size, kernel_size), bool)
    mask[: m if first else m + 1, :] = True
    return mask


def horizontal_mask(kernel_size: int, first: bool) -> np.ndarray:
    r"""The horizontal stack's $1 \times k$ mask: the pixels left of the centre, plus the centre
    unless ``first`` (type A / type B on a single row)."""
    _check_odd(kernel_size)
    m = kernel_size // 2
    mask = np.zeros((1, kernel_size), bool)
    mask[0, : m if first else m + 1] = True
    return mask


@functools.cache
def conv_mask(kind: str, kernel_size: int) -> np.ndarray:
    """The mask called ``kind`` (one of ``MASK_KINDS``) for a kernel of odd size ``kernel_size``."""
    if kind not in MASK_KINDS:
        raise ValueError(f"kind must be one of {MASK_KINDS}, got {kind!r}")
    if kind in ("A", "B"):
        mask = causal_mask(kernel_size, kind)
    elif kind.startswith("vertical"):
        mask = vertical_mask(kernel_size, first=kind.endswith("_first"))
    elif kind.startswith("horizontal"):
        mask = horizontal_mask(kernel_size, first=kind.endswith("_first"))
    else:
        _check_odd(kernel_size)
        mask = np.ones((kernel_size, kernel_size), bool)
    mask.setflags(write=False)
    return mask


def masked_conv(x: jax.Array, kernel: jax.Array, mask, bias: jax.Array | None = None):
    r"""A 'same' 2-D convolution (cross-correlation) with a masked kernel.

    $y[b, r, c, o] = \sum_{u, v, i} x[b, r + u - m_h, c + v - m_w, i]\,(M \odot K)[u, v, i, o]$
    with zero padding, $m_h = \lfloor k_h/2 \rfloor$, $m_w = \lfloor k_w/2 \rfloor$.

    Args:
      x: ``float[B, H, W, C_in]``.
      kernel: ``float[k_h, k_w, C_in, C_out]``, odd ``k_h`` and ``k_w``.
      mask: ``bool[k_h, k_w]`` (a NumPy array: it is a constant of the architecture).
      bias: optional ``float[C_out]``.

    The kernel is multiplied by the mask, so masked weights get exactly zero gradient, and only
    the taps the mask keeps are computed: the same result with about half the arithmetic.
    """
    mask = np.asarray(mask, bool)
    if x.ndim != 4:
        raise ValueError(f"x must have shape [B, H, W, C_in], got {x.shape}")
    if kernel.ndim != 4 or kernel.shape[2] != x.shape[3]:
        raise ValueError(f"kernel must have shape [k_h, k_w, C_in={x.shape[3]}, C_out], "
                         f"got {kernel.shape}")
    kh, kw = kernel.shape[:2]
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel sizes must be odd, got {kh}x{kw}")
    if mask.shape != (kh, kw):
        raise ValueError(f"mask must have shape {(kh, kw)} (the kernel's), got {mask.shape}")
    if not mask.any():
        y = jnp.zeros(x.shape[:3] + (kernel.shape[3],), jnp.result_type(x, kernel))
        return y if bias is None else y + bias
    w = kernel * jnp.asarray(mask, kernel.dtype)[:, :, None, None]
    # Only the taps the mask keeps can contribute: gather the input shifted by each of them and
    # contract in one matrix product, [B, H, W, taps * C_in] @ [taps * C_in, C_out]. On images
    # this small that is faster than XLA's convolution, and it skips the masked half outright.
    taps = np.argwhere(mask)
    H, W = x.shape[1:3]
    xp = jnp.pad(x, ((0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2), (0, 0)))
    cols = jnp.concatenate([xp[:, u : u + H, v : v + W] for u, v in taps], axis=-1)
    y = cols @ w[taps[:, 0], taps[:, 1]].reshape(-1, kernel.shape[3])
    return y if bias is None else y + bias


class MaskedConv2d(nnx.Module):
    """A convolution whose kernel is masked by :func:`conv_mask` ``(mask, kernel_size)``.

    ``kernel_size`` is an odd int (a square kernel) or, for the horizontal stack, the masks of
    kind ``horizontal*`` use a ``1 x kernel_size`` kernel. The mask is rebuilt from these static
    settings at every call: it is not a variable, so it can never be trained.
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int, mask: str, *,
                 rngs: nnx.Rngs):
        _check_odd(kernel_size)
        if mask not in MASK_KINDS:
            raise ValueError(f"mask must be one of {MASK_KINDS}, got {mask!r}")
        for name, v in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(v, int | np.integer) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.mask_kind = mask
        self.kernel_size = int(kernel_size)
        kh = 1 if mask.startswith("horizontal") else kernel_size
        # He-style fan-in counted over the weights the mask keeps.
        fan_in = int(conv_mask(mask, kernel_size).sum()) * in_features
        std = 1.0 / math.sqrt(max(fan_in, 1))
        self.kernel = nnx.Param(
            std * jax.random.normal(rngs.params(), (kh, kernel_size, in_features, out_features)))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    @property
    def mask(self) -> np.ndarray:
        return conv_mask(self.mask_kind, self.kernel_size)

    def __call__(self, x: jax.Array) -> jax.Array:
        return masked_conv(x, self.kernel[...], self.mask, self.bias[...])


# --------------------------------------------------------------------------------------------
# Receptive fields, predicted from the masks alone
# --------------------------------------------------------------------------------------------
def _spread(field: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The input pixels that the output pixels in ``field`` read through one layer masked by
    ``mask``: every ``p + (u - m_h, v - m_w)`` with ``p`` in ``field`` and ``mask[u, v]``, kept
    inside the image (the zero padding outside carries no information)."""
    H, W = field.shape
    mh, mw = mask.shape[0] // 2, mask.shape[1] // 2
    out = np.zeros_like(field)
    for u, v in np.argwhere(mask):
        du, dv = int(u) - mh, int(v) - mw
        if abs(du) >= H or abs(dv) >= W:
            continue
        out[max(du, 0) : H + min(du, 0), max(dv, 0) : W + min(dv, 0)] |= (
            field[max(-du, 0) : H + min(-du, 0), max(-dv, 0) : W + min(-dv, 0)])
    return out


def receptive_field(shape, pixel, num_layers: int, first_kernel: int = 3, kernel_size: int = 3,
                    gated: bool = False) -> np.ndarray:
    r"""The input pixels that can influence the output at ``pixel`` = (r, c), ``bool[H, W]``.

    Computed from the masks alone, backwards from the output: a layer's output at $p$ reads its
    input at $p + (u - m, v - m)$ for every tap $(u, v)$ its mask keeps, and only inside the image.

    * ``gated=False``: a :class:`PixelCNN`: a type-A ``first_kernel`` layer, then
      ``num_layers - 1`` type-B ``kernel_size`` layers (the residual path and the $1 \times 1$
      head add nothing: type B already keeps the centre).
    * ``gated=True``: a :class:`GatedPixelCNN`. Going back through layer $\ell$, the horizontal
      output $h_\ell(p)$ reads $h_{\ell-1}$ through the horizontal mask and, through the link,
      $v_{\ell-1}$ through the vertical mask; $v_\ell(p)$ reads $v_{\ell-1}$ through the vertical
      mask; $v_0 = h_0$ is the image, and the output reads $h_L$.

    A pixel is in the field when at least one path of kept taps joins it to the output: what a
    Jacobian of the model shows as non-zero (for generic weights), at every input.
    """
    H, W = (int(v) for v in shape)
    r, c = (int(v) for v in pixel)
    if H < 1 or W < 1 or not (0 <= r < H and 0 <= c < W):
        raise ValueError(f"pixel {pixel!r} must lie in an image of shape {shape!r}")
    if not isinstance(num_layers, int | np.integer) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive integer, got {num_layers!r}")
    _check_odd(first_kernel, "first_kernel")
    _check_odd(kernel_size, "kernel_size")
    out = np.zeros((H, W), bool)
    out[r, c] = True
    kernels = [kernel_size] * (num_layers - 1) + [first_kernel]  # last layer first
    if not gated:
        field = out
        for i, k in enumerate(kernels):
            field = _spread(field, conv_mask("A" if i == num_layers - 1 else "B", k))
        return field
    h, v = out, np.zeros_like(out)
    for i, k in enumerate(kernels):
        sfx = "_first" if i == num_layers - 1 else ""
        h, v = (_spread(h, conv_mask("horizontal" + sfx, k)),
                _spread(h | v, conv_mask("vertical" + sfx, k)))
    return h | v


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def _check_images(images):
    if images.ndim != 3:
        raise ValueError(f"images must have shape [B, H, W], got {images.shape}")
    if not jnp.issubdtype(images.dtype, jnp.integer):
        raise ValueError(f"images must hold integer grey levels, got dtype {images.dtype}")


def _check_model_args(levels, channels, num_layers, first_kernel, kernel_size, num_classes,
                      dropout):
    for name, v, lo in (("levels", levels, 2), ("channels", channels, 1),
                        ("num_layers", num_layers, 1)):
        if not isinstance(v, int | np.integer) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}, got {v!r}")
    _check_odd(first_kernel, "first_kernel")
    _check_odd(kernel_size, "kernel_size")
    if num_classes is not None and (not isinstance(num_classes, int | np.integer)
                                    or num_classes < 1):
        raise ValueError(f"num_classes must be None or a positive integer, got {num_classes!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")


class _ImageModel(nnx.Module):
    """Shared plumbing: integer images -> one-hot -> :meth:`logits_from_inputs`."""

    levels: int
    num_classes: int | None

    def __call__(self, images: jax.Array, labels: jax.Array | None = None) -> jax.Array:
        """``int[B, H, W]`` grey levels (and ``int[B]`` labels) -> logits ``float[B, H, W, L]``.

        ``logits[b, r, c]`` parameterises $p(x_{rc} \\mid x_{<rc})$.
        """
        images = jnp.asarray(images)
        _check_images(images)
        return self.logits_from_inputs(jax.nn.one_hot(images, self.levels), labels)

    def _label_check(self, labels, batch):
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("this model is unconditional: labels must be None")
            return None
        if labels is None:
            raise ValueError(f"this model is class-conditional: give labels int[{batch}]")
        labels = jnp.asarray(labels)
        if labels.shape != (batch,):
            raise ValueError(f"labels must have shape ({batch},), got {labels.shape}")
        return labels

    def _head(self, h):
        h = self.out1(nnx.relu(h))
        return self.out2(nnx.relu(h))


class PixelCNN(_ImageModel):
    r"""A plain PixelCNN (van den Oord et al., 2016a): a type-A $k_1 \times k_1$ masked
    convolution, then residual blocks $h \leftarrow h + \mathrm{conv}_B(\mathrm{ReLU}(h))$ of
    $k \times k$ type-B masked convolutions, then a per-pixel ReLU MLP to $L$ logits.

    Its receptive field has a *blind spot*: with every layer seeing only the rows above and the
    left part of the current row, the output at $(r, c)$ can never reach $(r - d, c + e)$ with
    $e > d \cdot \lfloor k/2 \rfloor$ (for the first layer, $\lfloor k_1/2 \rfloor$ of reach).
    """

    def __init__(self, levels: int = 17, channels: int = 64, num_layers: int = 5, *,
                 first_kernel: int = 7, kernel_size: int = 3, dropout: float = 0.0,
                 rngs: nnx.Rngs):
        _check_model_args(levels, channels, num_layers, first_kernel, kernel_size, None, dropout)
        self.levels, self.num_classes = int(levels), None
        self.inp = MaskedConv2d(levels, channels, first_kernel, "A", rngs=rngs)
        self.blocks = nnx.List([MaskedConv2d(channels, channels, kernel_size, "B", rngs=rngs)
                                for _ in range(num_layers - 1)])
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.out1 = Conv1x1(channels, channels, rngs=rngs)
        self.out2 = Conv1x1(channels, levels, rngs=rngs)

    def logits_from_inputs(self, x: jax.Array, labels=None) -> jax.Array:
        """``float[B, H, W, L]`` inputs (one-hot, or any reals: for Jacobians) -> logits."""
        self._label_check(labels, x.shape[0])
        h = self.inp(x)
        for conv in self.blocks:
            h = h + self.drop(conv(nnx.relu(h)))
        return self._head(h)


class GatedLayer(nnx.Module):
    r"""One layer of the Gated PixelCNN: a vertical and a horizontal stack.

    $$v' = \tanh(W_{v,f} * v + V_f^\top y) \odot \sigma(W_{v,g} * v + V_g^\top y)$$
    $$h' = h + W_o\big[\tanh(W_{h,f} * h + U_f (W_{v} * v) + V_f'^\top y) \odot
          \sigma(W_{h,g} * h + U_g (W_{v} * v) + V_g'^\top y)\big]$$

    The vertical convolution sees the rows above (and, after the first layer, the current row of
    features that only know rows above); the horizontal one sees the pixels left of the centre on
    the current row (and the centre after the first layer); the $1 \times 1$ link $U$ passes
    what the vertical stack knows about all the rows above into the horizontal stack.
    $y$ is the one-hot class label of a conditional model.
    """

    def __init__(self, in_features: int, channels: int, kernel_size: int, *, first: bool,
                 num_classes: int | None, dropout: float, rngs: nnx.Rngs):
        sfx = "_first" if first else ""
        self.first = bool(first)
        self.v_conv = MaskedConv2d(in_features, 2 * channels, kernel_size, "vertical" + sfx,
                                   rngs=rngs)
        self.h_conv = MaskedConv2d(in_features, 2 * channels, kernel_size, "horizontal" + sfx,
                                   rngs=rngs)
        self.v_to_h = Conv1x1(2 * channels, 2 * channels, rngs=rngs)
        self.h_out = Conv1x1(channels, channels, rngs=rngs)
        self.cond = (nnx.Embed(num_classes, 4 * channels, rngs=rngs,
                               embedding_init=nnx.initializers.zeros)
                     if num_classes is not None else None)
        self.drop = nnx.Dropout(dropout, rngs=rngs)

    def __call__(self, v, h, labels=None):
        v_feat = self.v_conv(v)
        h_feat = self.h_conv(h) + self.v_to_h(v_feat)
        if self.cond is not None:
            cv, ch = jnp.split(self.cond(labels)[:, None, None, :], 2, axis=-1)
            v_feat, h_feat = v_feat + cv, h_feat + ch
        v_new = gated_activation(v_feat)
        h_new = self.drop(self.h_out(gated_activation(h_feat)))
        return v_new, (h_new if self.first else h + h_new)


class GatedPixelCNN(_ImageModel):
    r"""The Gated PixelCNN (van den Oord et al., 2016b), optionally class-conditional.

    A first :class:`GatedLayer` with $k_1$-wide kernels and the centre hidden, ``num_layers - 1``
    more with $k$-wide kernels, then a per-pixel ReLU MLP on the horizontal stack to $L$ logits.
    With ``num_classes`` set, every gate gets a learned bias per class: $p(x \mid y)$.
    """

    def __init__(self, levels: int = 17, channels: int = 32, num_layers: int = 5, *,
                 first_kernel: int = 7, kernel_size: int = 3, num_classes: int | None = None,
                 dropout: float = 0.0, rngs: nnx.Rngs):
        _check_model_args(levels, channels, num_layers, first_kernel, kernel_size, num_classes,
                          dropout)
        self.levels = int(levels)
        self.num_classes = None if num_classes is None else int(num_classes)
        self.layers = nnx.List(
            [GatedLayer(levels, channels, first_kernel, first=True, num_classes=num_classes,
                        dropout=dropout, rngs=rngs)]
            + [GatedLayer(channels, channels, kernel_size, first=False, num_classes=num_classes,
                          dropout=dropout, rngs=rngs) for _ in range(num_layers - 1)])
        self.out1 = Conv1x1(channels, channels, rngs=rngs)
        self.out2 = Conv1x1(channels, levels, rngs=rngs)

    def logits_from_inputs(self, x: jax.Array, labels=None) -> jax.Array:
        """``float[B, H, W, L]`` inputs (one-hot, or any reals: for Jacobians) -> logits."""
        labels = self._label_check(labels, x.shape[0])
        v = h = x
        for layer in self.layers:
            v, h = layer(v, h, labels)
        return self._head(h)


# --------------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------------
def image_log_probs(logits: jax.Array, images: jax.Array) -> jax.Array:
    r"""$\ln p(x_{rc} \mid x_{<rc})$ per pixel: logits ``[B, H, W, L]``, images ``[B, H, W]``."""
    if logits.shape[:-1] != images.shape:
        raise ValueError(f"logits must have shape images.shape + (L,); got {logits.shape} and "
                         f"{images.shape}")
    logp = jax.nn.log_softmax(logits, axis=-1)
    return jnp.take_along_axis(logp, images[..., None].astype(jnp.int32), axis=-1)[..., 0]


def nll(model, images, labels=None) -> jax.Array:
    """Mean negative log-likelihood per pixel, in nats."""
    return -jnp.mean(image_log_probs(model(images, labels), images))


def bits_per_dim(logits: jax.Array, images: jax.Array) -> jax.Array:
    r"""$-\frac{1}{BHW}\sum \log_2 p(x_{rc} \mid x_{<rc})$: the mean NLL per pixel in bits."""
    return -jnp.mean(image_log_probs(logits, images)) / math.log(2.0)


def sequential_log_probs(model, images, labels=None, *, fill: int = 0) -> jax.Array:
    r"""The same $\ln p(x_i \mid x_{<i})$ as the one-pass model, computed the slow way.

    For each pixel $i$ in raster order the model sees a canvas holding $x_{<i}$ and ``fill``
    everywhere else, and only its output at $i$ is kept: exactly what sampling does. Equal to
    :func:`image_log_probs` of the one-pass logits if and only if the model is causal (on these
    images). A ``lax.scan`` over the $HW$ pixels, compiled as one program (the model is split
    into a static graph and its state, as in :func:`sample`); returns ``float[B, H, W]``.
    """
    images = as_array(images, np.int32)
    if images.ndim != 3:
        raise ValueError(f"images must have shape [B, H, W], got {images.shape}")
    labels = None if labels is None else as_array(labels, np.int32)
    graphdef, state = nnx.split(model)
    return _sequential_loop(graphdef, state, images, labels, int(fill))


@functools.partial(jax.jit, static_argnames=("graphdef", "fill"))
def _sequential_loop(graphdef, state, images, labels, fill):
    model = nnx.merge(graphdef, state)
    B, H, W = images.shape
    flat = images.reshape(B, H * W)

    def one(carry, i):
        canvas = jnp.where(jnp.arange(H * W) < i, flat, fill).reshape(B, H, W)
        logp = jax.nn.log_softmax(model(canvas, labels)[:, i // W, i % W], axis=-1)
        return carry, jnp.take_along_axis(logp, flat[:, i, None], axis=-1)[:, 0]

    _, lp = jax.lax.scan(one, None, jnp.arange(H * W))
    return lp.T.reshape(B, H, W)


def independent_pixel_bpd(train: np.ndarray, test: np.ndarray, levels: int = 17,
                          alpha: float = 0.5) -> float:
    r"""The baseline: each pixel its own categorical, $p(x_{rc}=l) \propto n_{rc,l} + \alpha$
    (add-$\alpha$ smoothing of the training counts). Returns the test bits/dim."""
    train, test = np.asarray(train), np.asarray(test)
    if train.ndim != 3 or test.shape[1:] != train.shape[1:]:
        raise ValueError(f"train and test must be [N, H, W] with the same H, W; got {train.shape} "
                         f"and {test.shape}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha!r}")
    counts = (train[..., None] == np.arange(levels)).sum(0) + alpha  # [H, W, L]
    logp = np.log2(counts / counts.sum(-1, keepdims=True))
    H, W = train.shape[1:]
    picked = logp[np.arange(H)[:, None], np.arange(W)[None, :], test]  # [N, H, W]
    return float(-picked.mean())


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def sample_pixel(key: jax.Array, logits: jax.Array, canvas: jax.Array, index,
                 temperature=1.0) -> jax.Array:
    r"""One step of ancestral sampling: draw pixel ``index`` (raster order, $r = i // W$,
    $c = i \bmod W$) of every image from $\mathrm{softmax}(z_{rc} / T)$ and write it into
    ``canvas``.

    logits ``float[B, H, W, L]``, canvas ``int[B, H, W]`` -> the new canvas ``int[B, H, W]``.
    """
    W = canvas.shape[2]
    r, c = index // W, index % W
    draw = jax.random.categorical(key, logits[:, r, c] / temperature, axis=-1)
    return canvas.at[:, r, c].set(draw.astype(canvas.dtype))


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _sample_loop(graphdef, state, key, canvas, labels, start, temperature):
    model = nnx.merge(graphdef, state)
    H, W = canvas.shape[1:]

    def body(i, carry):
        canvas, key = carry
        key, sub = jax.random.split(key)
        return sample_pixel(sub, model(canvas, labels), canvas, i, temperature), key

    canvas, _ = jax.lax.fori_loop(start, H * W, body, (canvas, key))
    return canvas


def sample(key: jax.Array, model, *, num: int | None = None, shape=(8, 8), labels=None,
           canvas=None, start: int = 0, temperature: float = 1.0) -> jax.Array:
    r"""Ancestral sampling of whole images inside one compiled ``fori_loop``.

    Pixels ``start .. HW-1`` (raster order) are drawn one after the other, each from the model run
    on the canvas so far; the first ``start`` pixels of ``canvas`` are kept (inpainting: give the
    upper half and ``start = HW/2``). Either ``num`` (a blank canvas of ``shape``) or ``canvas``
    ``int[B, H, W]``. Returns ``int32[B, H, W]``.

    The model is split into a static graph and its state, so calling ``sample`` again with the
    same architecture and sizes does not recompile; ``start`` and ``temperature`` are traced.
    """
    if canvas is None:
        if not isinstance(num, int | np.integer) or num < 1:
            raise ValueError(f"num must be a positive integer when no canvas is given, got {num!r}")
        canvas = np.zeros((num, *shape), np.int32)
    canvas = as_array(canvas, np.int32)
    if canvas.ndim != 3:
        raise ValueError(f"canvas must have shape [B, H, W], got {canvas.shape}")
    H, W = canvas.shape[1:]
    if not 0 <= int(start) <= H * W:
        raise ValueError(f"start must lie in [0, {H * W}], got {start!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if model.num_classes is not None and labels is None:
        raise ValueError("a class-conditional model needs labels int[B]")
    labels = None if labels is None else as_array(labels, np.int32)
    graphdef, state = nnx.split(model)
    return _sample_loop(graphdef, state, key, canvas, labels, jnp.int32(start),
                        jnp.float32(temperature))
