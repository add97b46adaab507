"""Chapter 05 (PixelCNN): masks, masked convolution, gated units, bits/dim, one sampling step,
and the receptive field of a stack of masked convolutions."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import pixelcnn
from arcourse.course.grading import Case, CheckFailure, device_array, register


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


def _mask_whole_centre_row(k, t):
    m = pixelcnn.causal_mask(k, t).copy()
    m[k // 2, k // 2 + 1:] = True
    return m


def _mask_no_centre_row(k, t):
    m = pixelcnn.causal_mask(k, t).copy()
    m[k // 2, : k // 2] = False
    return m


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
        "the whole centre row kept (the pixels right of the centre come later)":
            _mask_whole_centre_row,
        "the centre row left out (the pixels left of the centre come earlier)":
            _mask_no_centre_row,
    },
    hint="rows above the centre: all True; the centre row: True left of the centre; the centre "
         "itself: True for type B only",
)


# --------------------------------------------------------------------------------------------
# pixelcnn.masked_conv
# --------------------------------------------------------------------------------------------
# The references of the numerical exercises are NumPy twins of the library's functions (float64,
# returned as float32): the grader's checks run them as they are, so that only the answer is
# compiled (one program per case instead of two).
def masked_conv_reference(x, kernel, mask_type):
    r"""'Same' convolution of ``x`` [B, H, W, C_in] with ``kernel`` [k, k, C_in, C_out] masked by
    ``causal_mask(k, mask_type)``: :func:`arcourse.pixelcnn.masked_conv` in NumPy."""
    x, kernel = np.asarray(x, np.float64), np.asarray(kernel, np.float64)
    k, m = kernel.shape[0], kernel.shape[0] // 2
    w = kernel * pixelcnn.causal_mask(k, mask_type)[:, :, None, None]
    B, H, W, _ = x.shape
    xp = np.pad(x, ((0, 0), (m, m), (m, m), (0, 0)))
    y = np.zeros((B, H, W, kernel.shape[3]))
    for u in range(k):
        for v in range(k):
            y += xp[:, u:u + H, v:v + W] @ w[u, v]
    return y.astype(np.float32)


def _conv_cases(rng):
    cases = []
    # The first case has C_in = C_out = k: there `kernel * mask` broadcasts without an error, over
    # the channel axes instead of the spatial ones. 1x1 type A hides everything: all zeros.
    for (b, h, w, ci, co, k), t in [((2, 5, 6, 3, 3, 3), "B"),
                                    ((2, 5, 6, 3, 4, 3), "A"), ((2, 5, 6, 3, 4, 3), "B"),
                                    ((1, 7, 7, 2, 3, 5), "A"), ((1, 7, 7, 2, 3, 5), "B"),
                                    ((3, 4, 4, 1, 2, 7), "B"), ((2, 4, 5, 2, 3, 1), "A")]:
        x = device_array(rng.normal(size=(b, h, w, ci)), jnp.float32)
        kern = device_array(rng.normal(size=(k, k, ci, co)), jnp.float32)
        cases.append(Case((x, kern, t), label=f"{k}x{k} type {t}"))
    return cases


def _conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _swapped_type(x, kernel, t):
    return masked_conv_reference(x, kernel, "B" if t == "A" else "A")


def _mask_on_channel_axes(x, kernel, t):
    mask = jnp.asarray(pixelcnn.causal_mask(kernel.shape[0], t), kernel.dtype)
    return _conv(x, kernel * mask)  # lines the mask up with the LAST two axes (C_in, C_out)


def _valid_padding(x, kernel, t):
    mask = jnp.asarray(pixelcnn.causal_mask(kernel.shape[0], t), kernel.dtype)
    return jax.lax.conv_general_dilated(x, kernel * mask[:, :, None, None], (1, 1), "VALID",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


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
        "the mask lined up with the channel axes (kernel * mask broadcasts over the last two "
        "axes; the mask needs two trailing axes of size 1)": _mask_on_channel_axes,
        "padding 'VALID' (the output shrinks; the spec asks for 'SAME')": _valid_padding,
    },
    hint="step 1: build the k x k mask of mask_type and multiply it into the kernel so that it "
         "covers the two SPATIAL axes and repeats over both channel axes (give the mask two "
         "trailing axes of size 1 before the product). Step 2: cross-correlate with stride 1 and "
         "'SAME' zero padding, telling jax.lax.conv_general_dilated the layouts of the arrays: "
         "input NHWC, kernel HWIO, output NHWC (without them it assumes NCHW and OIHW)",
)


# --------------------------------------------------------------------------------------------
# pixelcnn.gated_activation
# --------------------------------------------------------------------------------------------
def _gate_cases(rng):
    cases = [Case((device_array(rng.normal(size=s) * 2, jnp.float32),), label=f"shape {s}")
             for s in [(6,), (2, 3, 3, 8), (4, 10)]]
    # Large pre-activations: tanh and sigmoid saturate at -1, 1 and 0, 1; written with exp they
    # overflow to inf / inf = NaN.
    big = device_array(rng.normal(size=(3, 12)) * 200, jnp.float32)
    return cases + [Case((big,), label="large inputs (|x| up to several hundred)")]


def _tanh_by_exp(x):
    a, b = jnp.split(x, 2, axis=-1)
    e = jnp.exp(2 * a)
    return (e - 1) / (e + 1) * jax.nn.sigmoid(b)


def _sigmoid_by_exp(x):
    a, b = jnp.split(x, 2, axis=-1)
    return jnp.tanh(a) * jnp.exp(b) / (1 + jnp.exp(b))


def gated_activation_reference(x):
    """:func:`arcourse.pixelcnn.gated_activation` in NumPy (sigmoid(b) = (1 + tanh(b / 2)) / 2,
    finite for any b)."""
    a, b = np.split(np.asarray(x, np.float64), 2, axis=-1)
    return (np.tanh(a) * 0.5 * (1.0 + np.tanh(0.5 * b))).astype(np.float32)


register(
    "pixelcnn.gated_activation",
    title="The gated tanh-sigmoid unit",
    points=1,
    reference=gated_activation_reference,
    cases=_gate_cases,
    wrong={
        "halves swapped (sigmoid of the first, tanh of the second)":
            lambda x: jax.nn.sigmoid(x[..., : x.shape[-1] // 2]) * jnp.tanh(x[..., x.shape[-1] // 2:]),
        "interleaved split (even and odd channels)":
            lambda x: jnp.tanh(x[..., ::2]) * jax.nn.sigmoid(x[..., 1::2]),
        "tanh times tanh": lambda x: jnp.tanh(x[..., : x.shape[-1] // 2])
            * jnp.tanh(x[..., x.shape[-1] // 2:]),
        "split along the first axis instead of the last (channel) axis":
            lambda x: jnp.tanh(x[: x.shape[0] // 2]) * jax.nn.sigmoid(x[x.shape[0] // 2:]),
        "tanh written with exponentials, (e^2a - 1) / (e^2a + 1): inf / inf = NaN for large a":
            _tanh_by_exp,
        "sigmoid written as e^b / (1 + e^b): inf / inf = NaN for large b": _sigmoid_by_exp,
    },
    hint="the LAST axis holds two halves of equal size: the first half are the filter "
         "pre-activations (through tanh), the second the gate pre-activations (through sigmoid); "
         "multiply them element by element, so the result has half as many channels. Use the "
         "library's tanh and sigmoid: built from exp by hand they overflow for large inputs",
)


# --------------------------------------------------------------------------------------------
# pixelcnn.bits_per_dim
# --------------------------------------------------------------------------------------------
def _bpd_cases(rng):
    cases = []
    for b, h, w, levels in [(1, 1, 1, 2), (3, 4, 4, 5), (2, 8, 8, 17)]:
        logits = device_array(rng.normal(size=(b, h, w, levels)) * 3, jnp.float32)
        images = device_array(rng.integers(0, levels, size=(b, h, w)), jnp.int32)
        cases.append(Case((logits, images), label=f"{b} images of {h}x{w}, {levels} levels"))
    # Images far apart: one image's logits near +1000, one near -1000. exp overflows (or, shifted
    # by one maximum for the whole batch, the low image underflows to log 0).
    # (The shapes repeat the cases above: no new compilation.)
    logits = rng.normal(size=(3, 4, 4, 5)) * 3 + np.array([1000.0, -1000.0, 0.0])[:, None, None,
                                                                                None]
    images = rng.integers(0, 5, size=(3, 4, 4))
    cases.append(Case((device_array(logits, jnp.float32), device_array(images, jnp.int32)),
                      label="3 images of 4x4, 5 levels, logits near +1000, -1000 and 0"))
    # Wide rows: levels hundreds of logits apart. The observed level's probability underflows to
    # 0 in float32 (its log-probability, about -300, does not).
    logits = rng.normal(size=(2, 8, 8, 17)) * 100
    images = rng.integers(0, 17, size=(2, 8, 8))
    cases.append(Case((device_array(logits, jnp.float32), device_array(images, jnp.int32)),
                      label="2 images of 8x8, 17 levels, logits hundreds apart in each pixel"))
    return cases


def _lp(logits, images):
    return pixelcnn.image_log_probs(logits, images)


def _pick(values, images):
    return jnp.take_along_axis(values, images[..., None], axis=-1)[..., 0]


def _bpd_naive_softmax(lg, im):
    e = jnp.exp(lg)
    return -jnp.mean(jnp.log(_pick(e / e.sum(-1, keepdims=True), im))) / math.log(2.0)


def _bpd_log_of_softmax(lg, im):
    return -jnp.mean(jnp.log(_pick(jax.nn.softmax(lg, axis=-1), im))) / math.log(2.0)


def _bpd_log_softmax_plus_eps(lg, im):
    return -jnp.mean(jnp.log(_pick(jax.nn.softmax(lg, axis=-1), im) + 1e-9)) / math.log(2.0)


def _bpd_global_max(lg, im):
    top = jnp.max(lg)
    lse = top + jnp.log(jnp.sum(jnp.exp(lg - top), axis=-1))
    return -jnp.mean(_pick(lg, im) - lse) / math.log(2.0)


def bits_per_dim_reference(logits, images):
    """:func:`arcourse.pixelcnn.bits_per_dim` in NumPy (each pixel's log-softmax shifted by its own
    maximum)."""
    lg = np.asarray(logits, np.float64)
    top = lg.max(-1, keepdims=True)
    logp = lg - top - np.log(np.exp(lg - top).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.asarray(images)[..., None], axis=-1)
    return np.asarray(-picked.mean() / math.log(2.0), np.float32)


register(
    "pixelcnn.bits_per_dim",
    title="Bits per dimension from logits",
    points=1,
    reference=bits_per_dim_reference,
    cases=_bpd_cases,
    rtol=1e-5,
    atol=1e-5,
    wrong={
        "nats, not bits (forgot to divide by ln 2)": lambda lg, im: -jnp.mean(_lp(lg, im)),
        "bits per image, not per pixel": lambda lg, im: -jnp.mean(
            jnp.sum(_lp(lg, im), axis=(1, 2))) / math.log(2.0),
        "log of the raw logits (no softmax)": lambda lg, im: -jnp.mean(
            jnp.take_along_axis(lg, im[..., None], axis=-1)) / math.log(2.0),
        "softmax without subtracting the maximum: exp overflows on large logits":
            _bpd_naive_softmax,
        "log of the softmax: a small probability underflows to 0 and its log to -inf":
            _bpd_log_of_softmax,
        "log(softmax + eps): a tiny probability becomes eps, not its true value":
            _bpd_log_softmax_plus_eps,
        "log-sum-exp shifted by one maximum for the whole batch, not each pixel's own":
            _bpd_global_max,
    },
    hint="work in log space: a log-softmax over the levels of each pixel (jax.nn.log_softmax, "
         "or subtract each pixel's own maximum before the log-sum-exp: the cases have logits in "
         "the thousands and levels hundreds apart), pick the log-probability of the observed "
         "level, average over every pixel of every image, divide by ln 2",
)


# --------------------------------------------------------------------------------------------
# pixelcnn.sample_pixel (judged by its distribution, not its exact draws)
# --------------------------------------------------------------------------------------------
_POS_LOGITS = (np.array([2.0, 0.5, 0.0, -1.0, -6.0]), np.array([-1.0, 1.5, -0.5, 1.0, -3.0]))


def _sample_pixel_test(fn, ex):
    # A 2x3 canvas: its width (3) is not the notebook's W (8). Even and odd images get different
    # logits at the drawn pixel, so using one image's logits for all shows.
    B, H, W, L = 4000, 2, 3, 5
    rng = np.random.default_rng(0)
    base = rng.normal(size=(H, W, L)) * 1.5
    # Every other position strongly prefers the last level: reading the wrong position shows.
    base[..., -1] += 4.0
    summary = []
    for index, temperature, shift in [(1, 1.0, 0.0), (4, 0.5, 0.0), (5, 2.0, 0.0), (0, 1.0, 0.0),
                                      (2, 1.0, 1000.0)]:
        r, c = index // W, index % W
        logits = np.broadcast_to(base, (B, H, W, L)).copy()
        logits[0::2, r, c] = _POS_LOGITS[0] + shift
        logits[1::2, r, c] = _POS_LOGITS[1] + shift
        logits = device_array(logits, jnp.float32)
        canvas = device_array(rng.integers(0, L, size=(B, H, W)), jnp.int32)
        where = (f"index={index} (row {r}, column {c} of a {H}x{W} canvas), "
                 f"temperature={temperature}" + (f", logits near {shift:g}" if shift else ""))
        out = fn(jax.random.key(index), logits, canvas, index, temperature)
        if out is None:
            raise CheckFailure("your function returned None: did you forget `return`?")
        out = np.asarray(out)
        if out.shape != canvas.shape:
            raise CheckFailure(f"{where}: expected a canvas of shape {canvas.shape}, got {out.shape}")
        if not np.issubdtype(out.dtype, np.integer):
            raise CheckFailure(f"{where}: the canvas must stay integer, got dtype {out.dtype}")
        before = np.asarray(canvas)
        others = np.ones((H, W), bool)
        others[r, c] = False
        if not np.array_equal(out[:, others], before[:, others]):
            changed = np.argwhere((out != before).any(0) & others)[0]
            raise CheckFailure(
                f"{where}: pixel ({changed[0]}, {changed[1]}) changed, but only pixel ({r}, {c}) "
                f"may (raster order: row = index // W, column = index % W, with W = {W} the "
                "width of the canvas you were given)")
        if np.array_equal(out[:, r, c], before[:, r, c]):
            raise CheckFailure(
                f"{where}: pixel ({r}, {c}) was never written (every image still holds its old "
                f"value). Row and column come from the width of the canvas you were given, "
                f"W = {W} here, not from a W defined elsewhere in the notebook")
        drawn = out[:, r, c]
        if drawn.min() < 0 or drawn.max() >= L:
            raise CheckFailure(f"{where}: drew levels outside [0, {L})")
        tvs = []
        for half, z in zip((slice(0, None, 2), slice(1, None, 2)), _POS_LOGITS):
            freq = np.bincount(drawn[half], minlength=L) / len(drawn[half])
            p = np.exp((z - z.max()) / temperature)
            p /= p.sum()
            tv = 0.5 * np.abs(freq - p).sum()
            name = "even" if half.start == 0 else "odd"
            if tv > 0.05:
                raise CheckFailure(
                    f"{where}: in the {name}-numbered images the drawn levels have frequencies "
                    f"{np.round(freq, 3).tolist()}, but softmax(logits[b, {r}, {c}] / T) is "
                    f"{np.round(p, 3).tolist()} (total variation {tv:.3f}): each image draws "
                    "from the logits of its own pixel, divided by the temperature")
            tvs.append(tv)
        summary.append(f"TV {max(tvs):.3f}")
    return ("frequencies match softmax(z / T) at 5 positions, per image (" + ", ".join(summary)
            + ")")


def _transposed(key, logits, canvas, index, temperature=1.0):
    H = canvas.shape[1]
    r, c = index % H, index // H
    draw = jax.random.categorical(key, logits[:, r, c] / temperature, axis=-1)
    return canvas.at[:, r, c].set(draw.astype(canvas.dtype))


def _global_width(key, logits, canvas, index, temperature=1.0):
    W = 8  # the notebook's image width, not this canvas's
    r, c = index // W, index % W
    draw = jax.random.categorical(key, logits[:, r, c] / temperature, axis=-1)
    return canvas.at[:, r, c].set(draw.astype(canvas.dtype))


def _first_image_logits(key, logits, canvas, index, temperature=1.0):
    W = canvas.shape[2]
    r, c = index // W, index % W
    draw = jax.random.categorical(key, logits[0, r, c] / temperature, shape=(canvas.shape[0],))
    return canvas.at[:, r, c].set(draw.astype(canvas.dtype))


def _naive_softmax_sampler(key, logits, canvas, index, temperature=1.0):
    W = canvas.shape[2]
    r, c = index // W, index % W
    e = jnp.exp(logits[:, r, c] / temperature)
    cdf = jnp.cumsum(e / e.sum(-1, keepdims=True), axis=-1)
    u = jax.random.uniform(key, (canvas.shape[0], 1))
    draw = jnp.minimum(jnp.sum(cdf < u, axis=-1), logits.shape[-1] - 1)
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
        "the notebook's W = 8 instead of the canvas's own width": _global_width,
        "temperature ignored": _no_temperature,
        "logits multiplied by the temperature instead of divided": _times_temperature,
        "greedy (argmax) instead of sampling": _greedy,
        "the first image's logits used for every image": _first_image_logits,
        "softmax without subtracting the maximum (NaN on large logits)": _naive_softmax_sampler,
    },
    hint="step 1: turn the raster index into a row and a column using the width of the canvas "
         "argument (read it off its shape; the grader's canvas is not 8 pixels wide). Step 2: "
         "take that pixel's logits for every image, divide them by the temperature, and let "
         "jax.random.categorical draw one level per image (it is stable for large logits). "
         "Step 3: JAX arrays are immutable: return a copy of the canvas with only that pixel "
         "replaced (an indexed update, .at[...].set), in the canvas's integer dtype",
)


# --------------------------------------------------------------------------------------------
# pixelcnn.receptive_field: the blind spot, predicted from the masks
# --------------------------------------------------------------------------------------------
def _rf_cases(rng):
    spec = [  # (shape, pixel, num_layers, first_kernel, kernel_size, gated)
        ((8, 8), (5, 3), 4, 3, 3, False), ((8, 8), (5, 3), 4, 3, 3, True),
        ((8, 8), (2, 0), 8, 7, 3, False), ((8, 8), (2, 0), 5, 7, 3, True),
        ((6, 10), (4, 5), 3, 5, 3, False), ((6, 10), (4, 5), 2, 5, 3, True),
        ((5, 7), (0, 3), 3, 3, 3, False), ((5, 7), (0, 3), 3, 3, 3, True),
        ((5, 7), (0, 0), 2, 3, 3, True), ((4, 4), (2, 2), 1, 5, 3, False),
        ((4, 4), (2, 2), 1, 5, 3, True), ((9, 9), (8, 8), 2, 3, 5, False),
        ((9, 9), (4, 8), 3, 3, 5, True), ((12, 12), (11, 2), 6, 3, 3, False),
    ]
    for _ in range(4):
        h, w = (int(v) for v in rng.integers(3, 11, size=2))
        spec.append(((h, w), (int(rng.integers(0, h)), int(rng.integers(0, w))),
                     int(rng.integers(1, 6)), int(rng.choice([3, 5, 7])), int(rng.choice([3, 5])),
                     bool(rng.integers(0, 2))))
    return [Case(a, label=f"{'gated' if a[5] else 'plain'}, {a[2]} layers, first {a[3]}x{a[3]}, "
                          f"then {a[4]}x{a[4]}, pixel {a[1]} of {a[0][0]}x{a[0][1]}")
            for a in spec]


def _rf_spread(field, offsets):
    H, W = field.shape
    out = np.zeros_like(field)
    for du, dv in offsets:
        if abs(du) < H and abs(dv) < W:
            out[max(du, 0): H + min(du, 0), max(dv, 0): W + min(dv, 0)] |= (
                field[max(-du, 0): H + min(-du, 0), max(-dv, 0): W + min(-dv, 0)])
    return out


def _rf_variant(shape, pixel, num_layers, first_kernel=3, kernel_size=3, gated=False, *,
                first_like_later=False, no_link=False):
    """The reference's recursion with one thing changed: the classic mistakes below."""
    def offsets(kind, k):
        mask = pixelcnn.conv_mask(kind, k)
        return [(int(u) - mask.shape[0] // 2, int(v) - mask.shape[1] // 2)
                for u, v in np.argwhere(mask)]

    field = np.zeros(shape, bool)
    field[pixel] = True
    v = np.zeros(shape, bool)
    for i in range(num_layers):
        first = i == num_layers - 1 and not first_like_later
        k = first_kernel if i == num_layers - 1 else kernel_size
        if not gated:
            field = _rf_spread(field, offsets("A" if first else "B", k))
            continue
        sfx = "_first" if first else ""
        field, v = (_rf_spread(field, offsets("horizontal" + sfx, k)),
                    _rf_spread(v if no_link else field | v, offsets("vertical" + sfx, k)))
    return field | v


def _rf_swap_kind(shape, pixel, num_layers, first_kernel=3, kernel_size=3, gated=False):
    return pixelcnn.receptive_field(shape, pixel, num_layers, first_kernel, kernel_size,
                                    not gated)


register(
    "pixelcnn.receptive_field",
    title="Predict the receptive field (and the blind spot) from the masks",
    points=3,
    reference=pixelcnn.receptive_field,
    cases=_rf_cases,
    wrong={
        "the first layer's centre kept (type B / non-first masks everywhere): the output sees "
        "its own pixel": lambda *a: _rf_variant(*a, first_like_later=True),
        "no blind spot in the plain stack, and the gated stack given the plain one's field "
        "(the two architectures swapped)": _rf_swap_kind,
        "the gated model without its vertical-to-horizontal link (only the row to the left)":
            lambda *a: _rf_variant(*a, no_link=True),
        "first_kernel ignored (every layer kernel_size wide)":
            lambda shape, pixel, n, k1=3, k=3, gated=False: pixelcnn.receptive_field(
                shape, pixel, n, k, k, gated),
        "one layer too many (num_layers type-B layers after the first)":
            lambda shape, pixel, n, k1=3, k=3, gated=False: pixelcnn.receptive_field(
                shape, pixel, n + 1, k1, k, gated),
        "one layer too few": lambda shape, pixel, n, k1=3, k=3, gated=False: (
            pixelcnn.receptive_field(shape, pixel, n - 1, k1, k, gated) if n > 1
            else np.zeros(shape, bool)),
    },
    hint="work backwards from the output. Start with a map that marks only pixel (r, c). A "
         "layer's output at p reads its input at p + (u - m, v - m) for every tap (u, v) its mask "
         "keeps (m: half the mask's height or width), so going back through one layer replaces "
         "the map by the union of its copies shifted by those offsets, cut to the image. The "
         "plain stack: the later layers' type-B mask n - 1 times, then the first layer's type-A "
         "mask. The gated model: carry two maps, horizontal and vertical; going back through a "
         "layer the new horizontal map spreads the horizontal one by the horizontal mask, and the "
         "new vertical map spreads the UNION of both by the vertical mask (that is the link); "
         "after the first layer the field is the union of the two",
)
