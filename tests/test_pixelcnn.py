"""arcourse.pixelcnn: masks, causality by Jacobian, the blind spot, likelihood, sampling."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import causality, pixelcnn

H = W = 8
LEVELS = 17


# --------------------------------------------------------------------------------------------
# Masks and the masked convolution
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_causal_mask_is_the_raster_order_past(k):
    m = k // 2
    for t in ("A", "B"):
        mask = pixelcnn.causal_mask(k, t)
        assert mask.dtype == bool and mask.shape == (k, k)
        for u in range(k):
            for v in range(k):
                before = (u - m) * k + (v - m) < 0  # raster offset of (u, v) from the centre
                assert mask[u, v] == (before or (t == "B" and (u, v) == (m, m)))


def test_stack_masks():
    np.testing.assert_array_equal(pixelcnn.vertical_mask(3, first=True),
                                  [[1, 1, 1], [0, 0, 0], [0, 0, 0]])
    np.testing.assert_array_equal(pixelcnn.vertical_mask(3, first=False),
                                  [[1, 1, 1], [1, 1, 1], [0, 0, 0]])
    np.testing.assert_array_equal(pixelcnn.horizontal_mask(5, first=True), [[1, 1, 0, 0, 0]])
    np.testing.assert_array_equal(pixelcnn.horizontal_mask(5, first=False), [[1, 1, 1, 0, 0]])


@settings(max_examples=20, deadline=None)
@given(kind=st.sampled_from(pixelcnn.MASK_KINDS), k=st.sampled_from([1, 3, 5, 7]),
       h=st.integers(1, 9), w=st.integers(1, 9), seed=st.integers(0, 1000))
def test_cropped_masked_conv_equals_the_plain_masked_conv(kind, k, h, w, seed):
    mask = pixelcnn.conv_mask(kind, k)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(2, h, w, 3)), jnp.float32)
    kern = jnp.asarray(rng.normal(size=(*mask.shape, 3, 4)), jnp.float32)
    want = jax.lax.conv_general_dilated(x, kern * mask[:, :, None, None], (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(pixelcnn.masked_conv(x, kern, mask), want, rtol=1e-5, atol=1e-5)


def test_masked_weights_get_exactly_zero_gradient():
    conv = pixelcnn.MaskedConv2d(3, 4, 5, "A", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, 6, 3))
    grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(conv)
    g = np.asarray(grads["kernel"][...])
    mask = pixelcnn.causal_mask(5, "A")
    assert np.all(g[~mask] == 0.0)
    assert np.all(np.abs(g[mask]).sum(axis=(-1, -2)) > 0)


def test_the_mask_is_not_state_and_training_keeps_the_model_causal():
    model = pixelcnn.PixelCNN(LEVELS, 8, 3, first_kernel=3, rngs=nnx.Rngs(0))
    # Besides the parameters, the only state is the dropout's random-number stream: no mask.
    everything_else = nnx.state(model, nnx.Not(nnx.Any(nnx.Param, nnx.RngState)))
    assert jax.tree.leaves(everything_else) == []
    # An optimiser over *all* trainable state, with a huge learning rate, cannot open a mask.
    trainable = nnx.Not(nnx.RngState)
    opt = nnx.Optimizer(model, optax.sgd(10.0), wrt=trainable)
    x = jax.random.randint(jax.random.key(0), (4, H, W), 0, LEVELS)
    for _ in range(2):
        grads = nnx.grad(lambda m: pixelcnn.nll(m, x), argnums=nnx.DiffState(0, trainable))(model)
        opt.update(model, grads)
    assert causality.is_causal(_dependency(model))


# --------------------------------------------------------------------------------------------
# Causality, exhaustively on 8x8, and the blind spot
# --------------------------------------------------------------------------------------------
def _dependency(model, labels=None, seed=0):
    x = jax.random.normal(jax.random.key(seed), (H, W, LEVELS))
    lab = None if labels is None else jnp.asarray([labels])
    return causality.dependency_map(lambda x: model.logits_from_inputs(x[None], lab)[0], x)


def _reach(L, above):
    """Support D[i, j] of L stacked 3-wide layers: j is in the same row at most L columns to the
    left, or 1..L rows above with a column offset ``dc`` for which ``above(rows_up, dc)`` holds."""
    D = np.zeros((H * W, H * W), bool)
    for r in range(H):
        for c in range(W):
            for r2 in range(H):
                for c2 in range(W):
                    m, dc = r - r2, c2 - c
                    D[r * W + c, r2 * W + c2] = (m == 0 and -L <= dc <= -1) or (
                        1 <= m <= L and above(m, dc))
    return D


def _plain_reach(L):
    """Predicted support of a plain stack of L masked 3x3 layers (first type A).

    The models in these tests have 32 channels: the ReLUs of the output head could, with very
    few channels, all be off at a pixel and make a true dependency exactly zero."""
    return _reach(L, lambda m, dc: -L <= dc <= m)


def _gated_reach(L):
    """Predicted support of L gated layers with 3-wide kernels."""
    return _reach(L, lambda m, dc: abs(dc) <= L)


def _predicted(num_layers, first_kernel, kernel_size, gated):
    """Every pixel's receptive field from the masks alone, stacked into a dependency pattern."""
    return np.stack([pixelcnn.receptive_field((H, W), divmod(i, W), num_layers, first_kernel,
                                              kernel_size, gated).ravel() for i in range(H * W)])


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 9), w=st.integers(1, 9), n=st.integers(1, 6),
       k1=st.sampled_from([1, 3, 5, 7]), k=st.sampled_from([1, 3, 5]), data=st.data())
def test_receptive_field_is_causal_grows_with_depth_and_gated_covers_plain(h, w, n, k1, k, data):
    r, c = data.draw(st.integers(0, h - 1)), data.draw(st.integers(0, w - 1))
    earlier = (np.arange(h * w) < r * w + c).reshape(h, w)
    fields = {}
    for gated in (False, True):
        f = pixelcnn.receptive_field((h, w), (r, c), n, k1, k, gated)
        assert f.dtype == bool and f.shape == (h, w)
        assert not (f & ~earlier).any()  # only strictly earlier pixels, at any depth
        deeper = pixelcnn.receptive_field((h, w), (r, c), n + 1, k1, k, gated)
        assert not (f & ~deeper).any()  # a layer more never loses a pixel
        fields[gated] = f
    assert not (fields[False] & ~fields[True]).any()  # the gated field contains the plain one
    if k1 > 1:  # the whole row to the left is reached by the first layer alone, or more
        assert fields[True][r, max(c - 1, 0) : c].all() and fields[False][r, max(c - 1, 0) : c].all()


@pytest.mark.parametrize("L", [2, 4])
def test_plain_pixelcnn_is_causal_and_has_the_predicted_blind_spot(L):
    model = pixelcnn.PixelCNN(LEVELS, 32, L, first_kernel=3, rngs=nnx.Rngs(L))
    D = _dependency(model)
    assert causality.is_causal(D)  # output i: zero gradient w.r.t. every input j >= i
    np.testing.assert_array_equal(D != 0, _plain_reach(L))
    np.testing.assert_array_equal(D != 0, _predicted(L, 3, 3, gated=False))


@pytest.mark.parametrize("L", [2, 4])
def test_gated_pixelcnn_is_causal_and_sees_the_whole_cone(L):
    model = pixelcnn.GatedPixelCNN(LEVELS, 32, L, first_kernel=3, rngs=nnx.Rngs(L))
    D = _dependency(model)
    assert causality.is_causal(D)
    np.testing.assert_array_equal(D != 0, _gated_reach(L))
    np.testing.assert_array_equal(D != 0, _predicted(L, 3, 3, gated=True))


def test_deep_enough_gated_sees_every_earlier_pixel_and_plain_does_not():
    gated = pixelcnn.GatedPixelCNN(LEVELS, 32, 5, first_kernel=7, rngs=nnx.Rngs(0))
    Dg = _dependency(gated)
    assert causality.is_causal(Dg)
    assert len(causality.missing_dependencies(Dg)) == 0  # no blind spot at all
    np.testing.assert_array_equal(Dg != 0, _predicted(5, 7, 3, gated=True))
    plain = pixelcnn.PixelCNN(LEVELS, 32, 8, first_kernel=7, rngs=nnx.Rngs(0))
    Dp = _dependency(plain)
    assert causality.is_causal(Dp)
    np.testing.assert_array_equal(Dp != 0, _predicted(8, 7, 3, gated=False))
    missing = causality.missing_dependencies(Dp)
    assert len(missing) > 0
    # The blind spot is up and to the right: (r - m, c + dc) with dc > 3 + (m - 1).
    for i, j in missing:
        (r, c), (r2, c2) = divmod(int(i), W), divmod(int(j), W)
        assert r2 < r and c2 - c > 3 + (r - r2 - 1)


def test_conditional_gated_is_causal_for_every_label():
    model = pixelcnn.GatedPixelCNN(LEVELS, 8, 3, first_kernel=3, num_classes=10,
                                   rngs=nnx.Rngs(0))
    # Make the class embeddings non-zero (they start at zero) so the label really matters.
    for layer in model.layers:
        layer.cond.embedding.set_value(jax.random.normal(jax.random.key(1),
                                                           layer.cond.embedding.shape))
    for label in (0, 7):
        assert causality.is_causal(_dependency(model, labels=label, seed=label))
    x = jnp.zeros((2, H, W), jnp.int32)
    out = model(x, jnp.asarray([0, 7]))
    assert not np.allclose(out[0], out[1])


# --------------------------------------------------------------------------------------------
# Likelihood
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_gated():
    return pixelcnn.GatedPixelCNN(LEVELS, 8, 3, first_kernel=3, rngs=nnx.Rngs(0))


def test_bits_per_dim_two_ways_agree(small_gated):
    images = jax.random.randint(jax.random.key(2), (3, H, W), 0, LEVELS)
    one_pass = pixelcnn.bits_per_dim(small_gated(images), images)
    seq = pixelcnn.sequential_log_probs(small_gated, images, fill=5)
    sequential = -float(jnp.mean(seq)) / math.log(2)
    np.testing.assert_allclose(float(one_pass), sequential, rtol=1e-5)
    np.testing.assert_allclose(float(pixelcnn.nll(small_gated, images)) / math.log(2),
                               float(one_pass), rtol=1e-6)


def test_the_sequential_check_catches_a_leak():
    class Leaky(nnx.Module):  # sees the pixel it predicts
        num_classes = None

        def __call__(self, images, labels=None):
            return jax.nn.one_hot(images, LEVELS) * 5.0

    images = jax.random.randint(jax.random.key(3), (2, H, W), 0, LEVELS)
    one = pixelcnn.image_log_probs(Leaky()(images), images)
    seq = pixelcnn.sequential_log_probs(Leaky(), images, fill=0)
    assert not np.allclose(one, seq)


@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 3), levels=st.integers(2, 6), seed=st.integers(0, 1000))
def test_probabilities_of_all_levels_sum_to_one(b, levels, seed):
    rng = np.random.default_rng(seed)
    logits = jnp.asarray(rng.normal(size=(b, 2, 3, levels)) * 4, jnp.float32)
    total = sum(jnp.exp(pixelcnn.image_log_probs(logits, jnp.full((b, 2, 3), v, jnp.int32)))
                for v in range(levels))
    np.testing.assert_allclose(total, 1.0, rtol=1e-5)


def test_bits_per_dim_of_uniform_logits_is_log2_levels():
    images = jnp.zeros((2, 4, 4), jnp.int32)
    assert float(pixelcnn.bits_per_dim(jnp.zeros((2, 4, 4, 17)), images)) == pytest.approx(
        math.log2(17), rel=1e-6)


def test_independent_baseline():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 4, size=(200, 2, 2))
    # All pixels uniform over 4 levels: about 2 bits.
    assert pixelcnn.independent_pixel_bpd(train, train, levels=4) == pytest.approx(2.0, abs=0.05)
    const = np.zeros((10, 2, 2), int)
    # add-0.5 with 10 zeros among 4 levels: p(0) = 10.5 / 12.
    assert pixelcnn.independent_pixel_bpd(const, const, levels=4) == pytest.approx(
        -math.log2(10.5 / 12))


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------
def test_sample_pixel_changes_one_pixel_with_the_right_distribution():
    B, L = 20000, 4
    logits = jnp.zeros((B, 2, 3, L)).at[:, 1, 0].set(jnp.asarray([0.0, 1.0, 2.0, -1.0]))
    canvas = jnp.full((B, 2, 3), 3, jnp.int32)
    out = pixelcnn.sample_pixel(jax.random.key(0), logits, canvas, 3, temperature=0.7)
    changed = np.asarray(out != canvas).any(0)
    assert not changed[np.arange(6).reshape(2, 3) != 3].any()
    freq = np.bincount(np.asarray(out[:, 1, 0]), minlength=L) / B
    p = np.asarray(jax.nn.softmax(jnp.asarray([0.0, 1.0, 2.0, -1.0]) / 0.7))
    np.testing.assert_allclose(freq, p, atol=0.015)


def test_sample_keeps_the_given_pixels_and_is_reproducible(small_gated):
    canvas = jax.random.randint(jax.random.key(0), (3, H, W), 0, LEVELS)
    out = pixelcnn.sample(jax.random.key(1), small_gated, canvas=canvas, start=32)
    assert out.shape == (3, H, W) and out.dtype == jnp.int32
    np.testing.assert_array_equal(out[:, :4], canvas[:, :4])
    assert int(out.min()) >= 0 and int(out.max()) < LEVELS
    again = pixelcnn.sample(jax.random.key(1), small_gated, canvas=canvas, start=32)
    np.testing.assert_array_equal(out, again)
    assert pixelcnn._sample_loop._cache_size() == 1  # same graph and sizes: compiled once
    pixelcnn.sample(jax.random.key(2), small_gated, canvas=canvas, start=10, temperature=0.5)
    assert pixelcnn._sample_loop._cache_size() == 1  # start and temperature are traced


def test_sampling_matches_the_model_conditionals():
    # A model whose conditional at every pixel is a fixed distribution: sampled images must show
    # those per-pixel frequencies.
    class Fixed(nnx.Module):
        num_classes = None

        def __init__(self):
            self.bias = nnx.Param(jnp.log(jnp.asarray([0.2, 0.5, 0.3])))

        def __call__(self, images, labels=None):
            return jnp.broadcast_to(self.bias[...], images.shape + (3,))

    out = pixelcnn.sample(jax.random.key(0), Fixed(), num=2000, shape=(2, 2))
    freq = np.bincount(np.asarray(out).ravel(), minlength=3) / out.size
    np.testing.assert_allclose(freq, [0.2, 0.5, 0.3], atol=0.02)


def test_argument_validation():
    with pytest.raises(ValueError, match="mask_type"):
        pixelcnn.causal_mask(3, "C")
    with pytest.raises(ValueError, match="kernel_size"):
        pixelcnn.causal_mask(4, "A")
    with pytest.raises(ValueError, match="mask"):
        pixelcnn.masked_conv(jnp.ones((1, 4, 4, 2)), jnp.ones((3, 3, 2, 2)), np.ones((5, 5)))
    with pytest.raises(ValueError, match="channels"):
        pixelcnn.GatedPixelCNN(17, 0, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dropout"):
        pixelcnn.PixelCNN(17, 8, 3, dropout=1.5, rngs=nnx.Rngs(0))
    model = pixelcnn.GatedPixelCNN(17, 4, 1, num_classes=10, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="labels"):
        model(jnp.zeros((2, 8, 8), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((2, 8, 8)), jnp.zeros((2,), jnp.int32))
    with pytest.raises(ValueError, match="start"):
        pixelcnn.sample(jax.random.key(0), model, num=1, labels=[0], start=99)
    with pytest.raises(ValueError, match="temperature"):
        pixelcnn.sample(jax.random.key(0), model, num=1, labels=[0], temperature=0.0)
