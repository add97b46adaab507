"""arcourse.attention: each piece tested on the property that defines it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import attention as A

SETTINGS = settings(max_examples=10, deadline=None)


# ---- the mask and the attention function ----------------------------------------------------
@SETTINGS
@given(st.integers(1, 40))
def test_causal_mask_is_j_le_i(n):
    m = np.asarray(A.causal_mask(n))
    i, j = np.indices((n, n))
    assert m.dtype == bool and np.array_equal(m, j <= i)


@SETTINGS
@given(st.sampled_from([(1, 1, 1), (1, 5, 3), (4, 4, 8), (6, 3, 16)]), st.integers(0, 10_000))
def test_attention_is_a_masked_average_of_values(sizes, seed):
    tq, tk, d = sizes
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.normal(size=(tq, d)) * 3, jnp.float32)
    k = jnp.asarray(rng.normal(size=(tk, d)) * 3, jnp.float32)
    v = jnp.asarray(rng.normal(size=(tk, 3)), jnp.float32)
    mask = jnp.asarray(rng.random((tq, tk)) < 0.6).at[:, 0].set(True)
    w = np.asarray(A.attention_weights(q, k, mask))
    np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-5)
    assert np.all(w[~np.asarray(mask)] == 0.0)  # exactly zero where masked
    # the definition, written with numpy
    s = np.asarray(q) @ np.asarray(k).T / np.sqrt(d)
    s = np.where(np.asarray(mask), s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    np.testing.assert_allclose(A.scaled_dot_product_attention(q, k, v, mask), p @ np.asarray(v),
                               rtol=1e-4, atol=1e-5)


def test_attention_has_no_nan_on_a_fully_masked_row_and_validates():
    q = jnp.ones((2, 4))
    out = A.scaled_dot_product_attention(q, q, q, jnp.zeros((2, 2), bool))
    assert np.all(np.isfinite(out))
    with pytest.raises(ValueError, match="last"):
        A.attention_weights(jnp.ones((2, 4)), jnp.ones((2, 5)))
    with pytest.raises(ValueError, match="positions"):
        A.scaled_dot_product_attention(q, q, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="size"):
        A.causal_mask(0)


# ---- RoPE --------------------------------------------------------------------------------
@SETTINGS
@given(st.integers(0, 500), st.integers(0, 500), st.integers(-200, 200),
       st.sampled_from([2, 8, 32]), st.integers(0, 10_000))
def test_rope_scores_depend_only_on_the_offset(p, s, shift, d, seed):
    rng = np.random.default_rng(seed)
    q, k = (jnp.asarray(rng.normal(size=(1, d)), jnp.float32) for _ in range(2))

    def score(pq, pk):
        return float(jnp.sum(A.rope(q, jnp.array([pq])) * A.rope(k, jnp.array([pk]))))

    shift = max(shift, -min(p, s))
    np.testing.assert_allclose(score(p, s), score(p + shift, s + shift), rtol=2e-3, atol=2e-3)


@SETTINGS
@given(st.sampled_from([1, 7]), st.sampled_from([2, 4, 16]), st.integers(0, 10_000))
def test_rope_preserves_norms_and_position_zero_is_the_identity(t, d, seed):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(t, d)), jnp.float32)
    pos = jnp.asarray(rng.integers(0, 1000, size=t))
    np.testing.assert_allclose(jnp.linalg.norm(A.rope(x, pos), axis=-1),
                               jnp.linalg.norm(x, axis=-1), rtol=1e-5)
    np.testing.assert_allclose(A.rope(x, jnp.zeros(t, int)), x, atol=1e-7)


def test_rope_rotates_each_pair_by_its_own_frequency():
    d = 6
    x = jnp.zeros((1, d)).at[0, 2].set(1.0)  # the pair i = 1 holds (1, 0)
    theta1 = 10000.0 ** (-2 / d)
    out = np.asarray(A.rope(x, jnp.array([5])))[0]
    np.testing.assert_allclose(out, [0, 0, np.cos(5 * theta1), np.sin(5 * theta1), 0, 0],
                               atol=1e-6)
    with pytest.raises(ValueError, match="even"):
        A.rope(jnp.ones((2, 3)), jnp.arange(2))


# ---- RMSNorm, SwiGLU ---------------------------------------------------------------------
@SETTINGS
@given(st.sampled_from([2, 5, 64]), st.floats(0.01, 100.0), st.integers(0, 10_000))
def test_rms_norm_has_unit_rms_and_is_scale_invariant(d, scale, seed):
    x = jnp.asarray(np.random.default_rng(seed).normal(size=(3, d)), jnp.float32)
    y = A.rms_norm(x, eps=1e-12)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(y**2, -1)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(A.rms_norm(scale * x, eps=1e-12), y, rtol=1e-4, atol=1e-5)


def test_rms_norm_is_layer_norm_without_the_mean_and_the_gain_scales():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16)), jnp.float32)
    x0 = x - x.mean(-1, keepdims=True)  # zero mean: LayerNorm and RMSNorm agree
    ln = nnx.LayerNorm(16, epsilon=1e-6, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(A.RMSNorm(16)(x0), ln(x0), rtol=1e-4, atol=1e-5)
    g = jnp.arange(16.0)
    np.testing.assert_allclose(A.rms_norm(x, g), A.rms_norm(x) * g, rtol=1e-6)
    with pytest.raises(ValueError, match="eps"):
        A.rms_norm(x, eps=0.0)


def test_swiglu_is_the_gated_formula_with_the_parameters_of_a_4d_mlp():
    d = 12
    m = A.SwiGLU(d, 8 * d // 3, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(5, d)), jnp.float32)
    w1, w2, w3 = m.w1.kernel[...], m.w2.kernel[...], m.w3.kernel[...]
    np.testing.assert_allclose(m(x), (jax.nn.silu(x @ w1) * (x @ w3)) @ w2, rtol=1e-5, atol=1e-6)
    n_swiglu = sum(a.size for a in jax.tree.leaves(nnx.state(m, nnx.Param)))
    assert n_swiglu == 3 * d * (8 * d // 3) == 8 * d * d


# ---- multi-head, grouped-query attention, the cache -------------------------------------
def _layer(h, g, rope=True, seed=0, d=16):
    return A.CausalSelfAttention(d, h, num_kv_heads=g, use_rope=rope, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("rope", [True, False])
def test_gqa_with_as_many_groups_as_heads_is_mha(rope):
    """G = H: every head has its own keys and values, i.e. the textbook per-head formula."""
    H, d, T = 4, 16, 7
    m = _layer(H, H, rope)
    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, T, d)), jnp.float32)
    q = (x @ m.wq.kernel[...]).reshape(2, T, H, d // H)
    k = (x @ m.wk.kernel[...]).reshape(2, T, H, d // H)
    v = (x @ m.wv.kernel[...]).reshape(2, T, H, d // H)
    if rope:
        q, k = A.rope(q, jnp.arange(T)[:, None]), A.rope(k, jnp.arange(T)[:, None])
    heads = [A.scaled_dot_product_attention(q[:, :, h], k[:, :, h], v[:, :, h], A.causal_mask(T))
             for h in range(H)]
    want = jnp.concatenate(heads, -1) @ m.wo.kernel[...]
    np.testing.assert_allclose(m(x), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_gqa_equals_mha_with_each_key_value_head_repeated(groups):
    """G groups is MHA whose K/V projections are the G heads, each repeated H/G times; G = 1 is
    multi-query attention."""
    H, d, T = 4, 16, 6
    gqa = _layer(H, groups, seed=1)
    mha = _layer(H, H, seed=2)
    dh = d // H
    rep = lambda w: jnp.repeat(w.reshape(d, groups, dh), H // groups, axis=1).reshape(d, H * dh)
    mha.wq.kernel[...] = gqa.wq.kernel[...]
    mha.wo.kernel[...] = gqa.wo.kernel[...]
    mha.wk.kernel[...] = rep(gqa.wk.kernel[...])
    mha.wv.kernel[...] = rep(gqa.wv.kernel[...])
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, T, d)), jnp.float32)
    np.testing.assert_allclose(gqa(x), mha(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("h,g", [(4, 4), (4, 2), (4, 1)])
def test_attention_output_at_i_has_zero_gradient_wrt_later_inputs(h, g):
    T, d = 6, 16
    m = _layer(h, g, seed=3)
    x = jnp.asarray(np.random.default_rng(4).normal(size=(T, d)), jnp.float32)
    jac = jax.jacobian(lambda x: m(x[None])[0])(x)  # (T, d, T, d)
    dep = np.asarray(jnp.abs(jac).sum(axis=(1, 3)))
    i, j = np.indices((T, T))
    assert np.all(dep[j > i] == 0.0)  # exactly zero: the future is never read
    assert np.all(dep[j <= i] > 0.0)  # and the past always is


@pytest.mark.parametrize("h,g,rope", [(4, 4, True), (4, 2, False), (4, 1, True)])
def test_decoding_one_token_at_a_time_matches_the_parallel_pass(h, g, rope):
    T, d = 7, 16
    m = _layer(h, g, rope, seed=5)
    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, T, d)), jnp.float32)
    full, kv = m(x, return_kv=True)
    shape = (2, T + 3, g, d // h)
    cache = A.LayerKV(jnp.zeros(shape), jnp.zeros(shape))
    outs = []
    for t in range(T):
        y, cache = m.decode(x[:, t], cache, jnp.int32(t))
        outs.append(y)
    np.testing.assert_allclose(jnp.stack(outs, 1), full, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache.k[:, :T], kv.k, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(st.sampled_from([1, 4, 12]), st.sampled_from([1, 3]), st.integers(0, 10_000))
def test_attend_with_cache_ignores_rows_after_pos(s, h, seed):
    rng = np.random.default_rng(seed)
    pos = int(rng.integers(0, s))
    d = 8
    q, kn, vn = (jnp.asarray(rng.normal(size=(h, d)), jnp.float32) for _ in range(3))
    kc, vc = (jnp.asarray(rng.normal(size=(s, h, d)), jnp.float32) for _ in range(2))
    out, kc2, vc2 = A.attend_with_cache(q, kn, vn, kc, vc, pos)
    np.testing.assert_array_equal(kc2[pos], kn)
    junk = kc.at[pos + 1:].set(99.0), vc.at[pos + 1:].set(-99.0)
    out2, _, _ = A.attend_with_cache(q, kn, vn, *junk, pos)
    np.testing.assert_allclose(out, out2, rtol=1e-6)
    # the same as full attention of the last query over the first pos+1 rows
    keys, vals = kc2[: pos + 1].swapaxes(0, 1), vc2[: pos + 1].swapaxes(0, 1)
    want = A.scaled_dot_product_attention(q[:, None], keys, vals)[:, 0]
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-6)


def test_layer_arguments_are_validated():
    with pytest.raises(ValueError, match="num_heads"):
        A.CausalSelfAttention(16, 3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        A.CausalSelfAttention(16, 4, num_kv_heads=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_kv_heads"):
        A.kv_cache_bytes_per_token(2, 0, 8)


def test_kv_cache_bytes_formula():
    assert A.kv_cache_bytes_per_token(12, 12, 64, 2) == 36_864  # GPT-2 small in bf16
    assert A.kv_cache_bytes_per_token(32, 8, 128, 2) == 131_072  # Llama-3-8B: 32 layers, 8 KV heads


def test_a_bool_is_not_an_integer():
    with pytest.raises(ValueError, match="size"):
        A.causal_mask(True)
    with pytest.raises(ValueError, match="num_heads"):
        A.CausalSelfAttention(8, True, rngs=nnx.Rngs(0))


@pytest.mark.parametrize("h,g", [(4, 4), (4, 2), (4, 1), (6, 3)])
def test_gqa_attention_on_flat_projections_is_the_layer_without_its_projections(h, g):
    """gqa_attention(x W^Q, x W^K, x W^V) W^O is CausalSelfAttention (no RoPE): head h is the
    feature block h*d..(h+1)*d-1 and reads key/value head h // (H/G)."""
    T, dh = 5, 4
    m = A.CausalSelfAttention(h * dh, h, num_kv_heads=g, use_rope=False, rngs=nnx.Rngs(7))
    x = jnp.asarray(np.random.default_rng(8).normal(size=(T, h * dh)), jnp.float32)
    q, k, v = x @ m.wq.kernel[...], x @ m.wk.kernel[...], x @ m.wv.kernel[...]
    got = A.gqa_attention(q, k, v, h, g) @ m.wo.kernel[...]
    np.testing.assert_allclose(got, m(x[None])[0], rtol=1e-5, atol=1e-5)
    # head by head, with key/value head h // (H/G)
    heads = [A.scaled_dot_product_attention(q[:, i * dh:(i + 1) * dh],
                                            k[:, (i // (h // g)) * dh:(i // (h // g) + 1) * dh],
                                            v[:, (i // (h // g)) * dh:(i // (h // g) + 1) * dh],
                                            A.causal_mask(T)) for i in range(h)]
    np.testing.assert_allclose(A.gqa_attention(q, k, v, h, g), jnp.concatenate(heads, -1),
                               rtol=1e-5, atol=1e-6)


def test_gqa_attention_validates_its_shapes():
    q, k = jnp.zeros((3, 8)), jnp.zeros((3, 4))
    with pytest.raises(ValueError, match="divisible"):
        A.gqa_attention(q, k, k, 4, 3)
    with pytest.raises(ValueError, match="G=1"):
        A.gqa_attention(q, k, k, 4, 1)  # G = 1 wants k of width 2
