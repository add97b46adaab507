"""Chapter 05 (PixelCNN): masks, masked convolution, gated units, bits/dim, one sampling step."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import pixelcnn
from arcourse.course.grading import Case, CheckFailure, register


# --------------------------------------------------------------------------------------------
# pixelcnn.causal_mask
# --------------------------------------------------------------------------------------------
def _mask_cases(rng):
    return [Case((k, t), label=f"{k}x{k} type {t}") for k in (1, 3, 5, 7) for t in ("A", "B")]


def _mask_with_centre(k, t):
    m = pixelcnn.causal_mask(k, "B").copy()
    return m


def _mask_without_centre(k, t):
    return pixelcnn.causal_mask(k, "A")


register(
    "pixelcnn.causal_mask",
    title="The type A / type B mask",
    points=2,
    reference=pixelcnn.causal_mask,
    cases=_mask_cases,
    wrong={
        "type A keeps the centre (the output sees the pixel it predicts)": _mask_with_centre,
        "type B hides the centre (later layers lose the features of their own position)":
            _mask_without_centre,
        "transposed (columns to the left instead of rows above)":
            lambda k, t: pixelcnn.causal_mask(k, t).T,
        "flipped (the rows below: the future)":
            lambda k, t: pixelcnn.causal_mask(k, t)[::-1, ::-1],
    },
    hint="rows above the centre: all True; the centre row: True left of the centre; the centre "
         "itself: True for type B only",
)


# --------------------------------------------------------------------------------------------
# pixelcnn.masked_conv
# --------------------------------------------------------------------------------------------
def masked_conv_reference(x, kernel, mask_type):
    r"""'Same' convolution of ``x`` [B, H, W, C_in] with ``kernel`` [k, k, C_in, C_out] masked by
    ``causal_mask(k, mask_type)``."""
    return pixelcnn.masked_conv(x, kernel, pixelcnn.causal_mask(kernel.shape[0], mask_type))


def _conv_cases(rng):
    cases = []
    for (b, h, w, ci, co, k), t in [((2, 5, 6, 3, 4, 3), "A"), ((2, 5, 6, 3, 4, 3), "B"),
                                    ((1, 7, 7, 2, 3, 5), "A"), ((1, 7, 7, 2, 3, 5), "B"),
                                    ((3, 4, 4, 1, 2, 7), "B")]:
        x = jnp.asarray(rng.normal(size=(b, h, w, ci)), jnp.float32)
        kern = jnp.asarray(rng.normal(size=(k, k, ci, co)), jnp.float32)
        cases.append(Case((x, kern, t), label=f"{k}x{k} type {t}"))
    return cases


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _swapped_type(x, kernel, t):
    return masked_conv_reference(x, kernel, "B" if t == "A" else "A")


register(
    "pixelcnn.masked_conv",
    title="A masked convolution",
    points=2,
    reference=masked_conv_reference,
    cases=_conv_cases,
    rtol=1e-4,
    atol=1e-4,
    wrong={
        "no mask at all": lambda x, kernel, t: _conv(x, kernel),
        "type A and type B swapped (centre kept in A, hidden in B)": _swapped_type,
        "mask applied to the flipped kernel (a true convolution sees the future)":
            lambda x, kernel, t: _conv(
                x, kernel * jnp.asarray(pixelcnn.causal_mask(kernel.shape[0], t)[::-1, ::-1],
                                        kernel.dtype)[:, :, None, None]),
    },
    hint="multiply the kernel by causal_mask(k, mask_type)[:, :, None, None], then "
         "jax.lax.conv_general_dilated with padding 'SAME' and dimension_numbers "
         "('NHWC', 'HWIO', 'NHWC')",
)


# --------------------------------------------------------------------------------------------
# pixelcnn.gated_activation
# --------------------------------------------------------------------------------------------
def _gate_cases(rng):
    return [Case((jnp.asarray(rng.normal(size=s) * 2, jnp.float32),), label=f"shape {s}")
            for s in [(6,), (2, 3, 3, 8), (4, 10)]]


register(
    "pixelcnn.gated_activation",
    title="The gated tanh-sigmoid unit",
    points=1,
    reference=pixelcnn.gated_activation,
    cases=_gate_cases,
    wrong={
        "halves swapped (sigmoid of the first, tanh of the second)":
            lambda x: jax.nn.sigmoid(x[..., : x.shape[-1] // 2]) * jnp.tanh(x[..., x.shape[-1] // 2:]),
        "interleaved split (even and odd channels)":
            lambda x: jnp.tanh(x[..., ::2]) * jax.nn.sigmoid(x[..., 1::2]),
        "tanh times tanh": lambda x: jnp.tanh(x[..., : x.shape[-1] // 2])
            * jnp.tanh(x[..., x.shape[-1] // 2:]),
    },
    hint="a, b = jnp.split(x, 2, axis=-1); return tanh(a) * sigmoid(b)",
)


# --------------------------------------------------------------------------------------------
# pixelcnn.bits_per_dim
# --------------------------------------------------------------------------------------------
def _bpd_cases(rng):
    cases = []
    for b, h, w, levels in [(1, 1, 1, 2), (3, 4, 4, 5), (2, 8, 8, 17)]:
        logits = jnp.asarray(rng.normal(size=(b, h, w, levels)) * 3, jnp.float32)
        images = jnp.asarray(rng.integers(0, levels, size=(b, h, w)), jnp.int32)
        cases.append(Case((logits, images), label=f"{b} images of {h}x{w}, {levels} levels"))
    return cases


def _lp(logits, images):
    return pixelcnn.image_log_probs(logits, images)


register(
    "pixelcnn.bits_per_dim",
    title="Bits per dimension from logits",
    points=1,
    reference=pixelcnn.bits_per_dim,
    cases=_bpd_cases,
    rtol=1e-5,
    atol=1e-5,
    wrong={
        "nats, not bits (forgot to divide by ln 2)": lambda lg, im: -jnp.mean(_lp(lg, im)),
        "bits per image, not per pixel": lambda lg, im: -jnp.mean(
            jnp.sum(_lp(lg, im), axis=(1, 2))) / math.log(2.0),
        "log of the raw logits (no softmax)": lambda lg, im: -jnp.mean(
            jnp.take_along_axis(lg, im[..., None], axis=-1)) / math.log(2.0),
    },
    hint="log_softmax over the levels, pick the observed level, average over every pixel, "
         "divide by ln 2",
)


# --------------------------------------------------------------------------------------------
# pixelcnn.sample_pixel (judged by its distribution, not its exact draws)
# --------------------------------------------------------------------------------------------
def _sample_pixel_test(fn, ex):
    B, H, W, L = 4000, 2, 3, 5
    rng = np.random.default_rng(0)
    base = rng.normal(size=(H, W, L)) * 1.5
    # Every other position strongly prefers the last level: reading the wrong position shows.
    base[..., -1] += 4.0
    summary = []
    for index, temperature in [(1, 1.0), (4, 0.5), (5, 2.0), (0, 1.0)]:
        r, c = index // W, index % W
        pos_logits = base.copy()
        pos_logits[r, c] = np.array([2.0, 0.5, 0.0, -1.0, -6.0])
        logits = jnp.asarray(np.broadcast_to(pos_logits, (B, H, W, L)), jnp.float32)
        canvas = jnp.asarray(rng.integers(0, L, size=(B, H, W)), jnp.int32)
        where = f"index={index} (row {r}, column {c} of a {H}x{W} image), temperature={temperature}"
        out = fn(jax.random.key(index), logits, canvas, index, temperature)
        if out is None:
            raise CheckFailure("your function returned None: did you forget `return`?")
        out = np.asarray(out)
        if out.shape != canvas.shape:
            raise CheckFailure(f"{where}: expected a canvas of shape {canvas.shape}, got {out.shape}")
        if not np.issubdtype(out.dtype, np.integer):
            raise CheckFailure(f"{where}: the canvas must stay integer, got dtype {out.dtype}")
        others = np.ones((H, W), bool)
        others[r, c] = False
        if not np.array_equal(out[:, others], np.asarray(canvas)[:, others]):
            changed = np.argwhere((out != np.asarray(canvas)).any(0) & others)[0]
            raise CheckFailure(
                f"{where}: pixel ({changed[0]}, {changed[1]}) changed, but only pixel ({r}, {c}) "
                "may (raster order: row = index // W, column = index % W)")
        drawn = out[:, r, c]
        if drawn.min() < 0 or drawn.max() >= L:
            raise CheckFailure(f"{where}: drew levels outside [0, {L})")
        freq = np.bincount(drawn, minlength=L) / B
        z = pos_logits[r, c] / temperature
        p = np.exp(z - z.max())
        p /= p.sum()
        tv = 0.5 * np.abs(freq - p).sum()
        if tv > 0.05:
            raise CheckFailure(
                f"{where}: the drawn levels have frequencies {np.round(freq, 3).tolist()}, but "
                f"softmax(logits[:, {r}, {c}] / T) is {np.round(p, 3).tolist()} (total variation "
                f"{tv:.3f}): sample from the logits of that pixel, divided by the temperature")
        summary.append(f"TV {tv:.3f}")
    return "frequencies match softmax(z / T) at 4 positions (" + ", ".join(summary) + ")"


def _transposed(key, logits, canvas, index, temperature=1.0):
    H = canvas.shape[1]
    r, c = index % H, index // H
    draw = jax.random.categorical(key, logits[:, r, c] / temperature, axis=-1)
    return canvas.at[:, r, c].set(draw.astype(canvas.dtype))


def _no_temperature(key, logits, canvas, index, temperature=1.0):
    return pixelcnn.sample_pixel(key, logits, canvas, index, 1.0)


def _greedy(key, logits, canvas, index, temperature=1.0):
    W = canvas.shape[2]
    r, c = index // W, index % W
    return canvas.at[:, r, c].set(jnp.argmax(logits[:, r, c], -1).astype(canvas.dtype))


def _times_temperature(key, logits, canvas, index, temperature=1.0):
    W = canvas.shape[2]
    r, c = index // W, index % W
    draw = jax.random.categorical(key, logits[:, r, c] * temperature, axis=-1)
    return canvas.at[:, r, c].set(draw.astype(canvas.dtype))


register(
    "pixelcnn.sample_pixel",
    title="One step of ancestral sampling",
    points=2,
    reference=pixelcnn.sample_pixel,
    test=_sample_pixel_test,
    wrong={
        "row and column swapped (column-major index)": _transposed,
        "temperature ignored": _no_temperature,
        "logits multiplied by the temperature instead of divided": _times_temperature,
        "greedy (argmax) instead of sampling": _greedy,
    },
    hint="r, c = index // W, index % W; jax.random.categorical(key, logits[:, r, c] / "
         "temperature); canvas.at[:, r, c].set(...)",
)
