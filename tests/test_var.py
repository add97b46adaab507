"""arcourse.var: the multi-scale residual quantiser and the VAR transformer, tested on the
properties that define them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import causality, var

SETTINGS = settings(max_examples=8, deadline=None)
SCALES = (1, 2, 3, 4)


# ---- scales, mask, resizing -----------------------------------------------------------------
@SETTINGS
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4, unique=True).map(sorted))
def test_block_causal_mask_is_own_and_coarser_scales(scales):
    m = np.asarray(var.block_causal_mask(scales))
    lv = np.repeat(np.arange(len(scales)), [s * s for s in scales])
    assert m.shape == (len(lv),) * 2 and m.dtype == bool
    for i in range(len(lv)):
        assert np.array_equal(m[i], lv <= lv[i])


@pytest.mark.parametrize("bad", [(), (2, 1), (1, 1), (0, 2), 3, (1.5, 2)])
def test_bad_scales_are_rejected(bad):
    with pytest.raises(ValueError):
        var.block_causal_mask(bad)


@pytest.mark.parametrize("s,S", [(1, 4), (2, 4), (3, 4), (4, 4), (2, 5)])
def test_resize_matrices_average(s, S):
    a, u = var.area_matrix(s, S), var.bilinear_matrix(S, s)
    np.testing.assert_allclose(a.sum(1), 1.0)
    np.testing.assert_allclose(u.sum(1), 1.0)
    assert (a >= 0).all() and (u >= 0).all()
    # area averaging preserves the mean of a map
    x = np.random.default_rng(0).normal(size=(S, S, 1))
    np.testing.assert_allclose(np.asarray(var.resize(jnp.asarray(x), s)).mean(), x.mean(),
                               rtol=1e-5, atol=1e-6)
    if s == S:
        np.testing.assert_array_equal(a, np.eye(S))


# ---- the residual quantiser --------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from([(1, 2, 3, 4), (1, 4), (2, 4), (4,), (1, 3, 5)]))
def test_scale_contributions_sum_to_the_reconstruction(seed, scales):
    rng = np.random.default_rng(seed)
    S = scales[-1]
    f = jnp.asarray(rng.normal(size=(3, S, S, 5)), jnp.float32)
    book = jnp.asarray(rng.normal(size=(7, 5)), jnp.float32)
    tokens, f_hat, seen = var.multiscale_quantise(f, book, scales)
    assert tokens.shape == (3, sum(s * s for s in scales)) and tokens.dtype == jnp.int32
    parts = var.scale_contributions(tokens, book, scales)
    np.testing.assert_allclose(parts.sum(0), f_hat, rtol=1e-5, atol=1e-5)
    # the last residual is what the quantiser could not explain: f = f_hat + r_K
    rest = f
    for k, s in enumerate(scales):
        z, part, rest = var.quantise_step(rest, book, s)
        np.testing.assert_array_equal(z.reshape(3, -1), tokens[:, sum(t * t for t in scales[:k]):
                                                             sum(t * t for t in scales[:k + 1])])
        np.testing.assert_allclose(part, parts[k], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(f_hat + rest, f, rtol=1e-5, atol=1e-5)
    assert [v.shape for v in seen] == [(3, s, s, 5) for s in scales]


def test_quantise_step_picks_the_nearest_code():
    rng = np.random.default_rng(1)
    rest = jnp.asarray(rng.normal(size=(4, 4, 3)), jnp.float32)
    book = jnp.asarray(rng.normal(size=(9, 3)) * rng.uniform(0.2, 4, size=(9, 1)), jnp.float32)
    z, _, _ = var.quantise_step(rest, book, 2)
    r = np.asarray(var.downsample(rest, 2))
    brute = np.argmin(((r[..., None, :] - np.asarray(book)) ** 2).sum(-1), -1)
    np.testing.assert_array_equal(np.asarray(z), brute)


def test_next_scale_inputs_see_only_coarser_tokens():
    rng = np.random.default_rng(2)
    book = jnp.asarray(rng.normal(size=(6, 3)), jnp.float32)
    t1 = jnp.asarray(rng.integers(0, 6, size=30), jnp.int32)
    lv = var.token_levels(SCALES)
    inputs_lv = lv[1:]  # the level of the position each input feeds
    for k in range(len(SCALES)):
        t2 = jnp.where(jnp.asarray(lv) == k, (t1 + 1) % 6, t1)  # change the tokens of scale k
        d = np.abs(np.asarray(var.next_scale_inputs(t1, book, SCALES)
                              - var.next_scale_inputs(t2, book, SCALES))).sum(-1)
        assert np.all(d[inputs_lv <= k] == 0), "an input depends on its own or a finer scale"
        if k < len(SCALES) - 1:
            assert np.any(d[inputs_lv == k + 1] > 0)


# ---- the straight-through estimator -------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 10_000), st.sampled_from([(3,), (2, 4, 4, 8)]))
def test_straight_through_passes_the_gradient_unchanged(seed, shape):
    rng = np.random.default_rng(seed)
    f = jnp.asarray(rng.normal(size=shape), jnp.float32)
    f_hat = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=shape), jnp.float32)
    np.testing.assert_allclose(var.straight_through(f, f_hat), f_hat, rtol=1e-6, atol=1e-6)
    g_f, g_hat = jax.grad(lambda a, b: jnp.sum(w * var.straight_through(a, b)), (0, 1))(f, f_hat)
    np.testing.assert_array_equal(g_f, w)
    assert np.all(np.asarray(g_hat) == 0)


def test_guided_logits_interpolates():
    c, u = jnp.array([1.0, 2.0, -1.0]), jnp.array([0.5, 0.0, 0.0])
    np.testing.assert_allclose(var.guided_logits(c, u, 1.0), c)
    np.testing.assert_allclose(var.guided_logits(c, u, 0.0), u)
    np.testing.assert_allclose(var.guided_logits(c, u, 3.0), u + 3 * (c - u))


# ---- the VQ-VAE -----------------------------------------------------------------------------------
def test_vqvae_shapes_restarts_and_error_falls_with_every_scale():
    from arcourse import data

    x = jnp.asarray(data.digits().x_train[:128])
    vq = var.VQVAE(codebook_size=16, code_dim=4, channels=8, rngs=nnx.Rngs(0))
    assert vq.encode(x).shape == (128, 4, 4, 4)
    assert vq.reconstruct(x).shape == (128, 8, 8)
    graph, state = nnx.split(vq)

    @jax.jit
    def fit_codebook(state):  # EMA steps only (a fixed random encoder): a k-means of residuals
        def one(state, _):
            m = nnx.merge(graph, state)
            m.loss(x, update=True)
            return nnx.split(m)[1], None
        return jax.lax.scan(one, state, None, length=40)[0]

    vq = nnx.merge(graph, fit_codebook(state))
    tokens = vq.tokenize(x)
    usage = var.code_usage(tokens, 16)
    assert usage["used"] >= 12, usage  # dead codes were restarted
    f = vq.encode(x)
    parts = var.scale_contributions(tokens, vq.codebook[...], vq.scales)
    errs = [float(jnp.mean(jnp.square(f - parts[:k].sum(0)))) for k in range(len(SCALES) + 1)]
    assert all(b < a for a, b in zip(errs, errs[1:])), errs


def test_code_usage():
    u = var.code_usage(np.array([0, 0, 1, 1]), 4)
    assert u["used"] == 2 and np.isclose(u["perplexity"], 2.0)
    assert list(u["counts"]) == [2, 2, 0, 0]


# ---- the transformer: causality by Jacobian ------------------------------------------------------
def _model(mode, scales=SCALES):
    book = jax.random.normal(jax.random.key(0), (12, 3))
    return var.VARTransformer(book, scales, mode=mode, dim=16, num_layers=2, num_heads=2,
                              rngs=nnx.Rngs(1))


@pytest.mark.parametrize("scales", [SCALES, (1, 3), (1, 2, 4)])
def test_var_transformer_is_block_causal_by_jacobian(scales):
    model = _model("var", scales)
    n = model.N
    x = jax.random.normal(jax.random.key(2), (n - 1, 3))
    dep = causality.dependency_map(lambda inp: model.logits_from_inputs(inp[None],
                                                                        jnp.array([3]))[0], x)
    # input position j (j = 0..N-2) sits at sequence position j + 1
    allowed = np.asarray(var.block_causal_mask(scales))[:, 1:]
    assert np.all(dep[~allowed] == 0.0), "a token depends on a finer scale"
    assert np.all(dep[allowed] > 0.0), "a token ignores part of its own or a coarser scale"


def test_ar_transformer_is_causal_by_jacobian():
    model = _model("ar")
    n = model.N
    x = jax.random.normal(jax.random.key(3), (n - 1, 3))
    dep = causality.dependency_map(lambda inp: model.logits_from_inputs(inp[None],
                                                                        jnp.array([1]))[0], x)
    allowed = np.tril(np.ones((n, n), bool))[:, 1:]
    assert np.all(dep[~allowed] == 0.0) and np.all(dep[allowed] > 0.0)


def test_var_logits_of_a_scale_depend_only_on_coarser_tokens():
    model = _model("var")
    lv = var.token_levels(SCALES)
    rng = np.random.default_rng(4)
    t1 = jnp.asarray(rng.integers(0, 12, size=(1, 30)), jnp.int32)
    t2 = jnp.where(jnp.asarray(lv) == 2, (t1 + 5) % 12, t1)  # change scale index 2
    d = np.abs(np.asarray(model(t1, jnp.array([0])) - model(t2, jnp.array([0])))).sum(-1)[0]
    assert np.all(d[lv <= 2] == 0.0) and np.all(d[lv == 3] > 0)


# ---- sampling ---------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["var", "ar"])
def test_sample_shapes_and_guidance(mode):
    model = _model(mode)
    labels = jnp.array([0, 1, 2])
    toks = var.sample(jax.random.key(0), model, labels, cfg_scale=2.0)
    assert toks.shape == (3, 30) and toks.dtype == jnp.int32
    assert int(toks.min()) >= 0 and int(toks.max()) < 12
    again = var.sample(jax.random.key(0), model, labels, cfg_scale=2.0)
    np.testing.assert_array_equal(toks, again)
    with pytest.raises(ValueError):
        var.sample(jax.random.key(0), model, labels, temperature=0.0)


def test_sample_with_a_peaked_model_follows_the_argmax():
    """With a near-zero temperature each step draws the argmax of the guided logits: the
    sample is then a fixed point of teacher forcing (every token is the argmax given the rest)."""
    model = _model("var")
    labels = jnp.array([4, 7])
    toks = var.sample(jax.random.key(1), model, labels, cfg_scale=1.0, temperature=1e-4)
    pred = jnp.argmax(model(toks, labels), -1)
    np.testing.assert_array_equal(pred, toks)


def test_constructor_checks():
    with pytest.raises(ValueError):
        var.VARTransformer(jnp.zeros((4, 2)), mode="diffusion", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        var.VQVAE(scales=(1, 2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):  # VAR starts from one token
        var.VARTransformer(jnp.zeros((4, 2)), (2, 4), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError):
        var.VQVAE(codebook_size=True, rngs=nnx.Rngs(0))
