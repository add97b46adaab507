"""arcourse.mamba: the three computations of one scan agree, the time-invariant SSM is a
convolution, the Mamba LM is causal, and recurrent decoding gives the parallel pass's logits."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import causality, decoding, mamba
from arcourse.gpt import num_params

TOL = dict(rtol=1e-5, atol=1e-5)


def _ssd_problem(seed, b, L, H, P, N):
    k = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(k[0], (b, L, H, P))
    dt = jax.nn.softplus(jax.random.normal(k[1], (b, L, H)) - 1.0)
    A = -jnp.exp(jax.random.normal(k[2], (H,)))
    B = jax.random.normal(k[3], (b, L, N)) / np.sqrt(N)
    C = jax.random.normal(k[4], (b, L, N)) / np.sqrt(N)
    return x, dt, A, B, C


@functools.partial(jax.jit, static_argnames="chunk")
def _four_ways(x, dt, A, B, C, chunk):
    quad = mamba.ssd_quadratic(x, dt, A, B, C)
    chunked, h_chunk = mamba.ssd_chunked(x, dt, A, B, C, chunk, return_state=True)
    u, delta, A_full, B_, C_ = mamba.ssd_as_selective(x, dt, A, B, C)
    seq, h_seq = mamba.selective_scan(u, delta, A_full, B_, C_, return_state=True)
    par, h_par = mamba.selective_scan(u, delta, A_full, B_, C_, method="parallel",
                                      return_state=True)
    return quad, chunked, seq.reshape(quad.shape), par.reshape(quad.shape), h_seq, h_par, \
        h_chunk.reshape(h_seq.shape)


# Shapes come from a few fixed sets (each compiles once); values vary freely.
SHAPES = [(1, 1, 1, 1, 1), (1, 17, 2, 3, 4), (2, 40, 3, 2, 5), (1, 64, 2, 4, 8)]


@settings(max_examples=16, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES), chunk=st.sampled_from([4, 16]),
       dt_shift=st.floats(-4.0, 2.0))
def test_sequential_parallel_ssd_quadratic_and_chunked_agree(seed, shape, chunk, dt_shift):
    x, dt, A, B, C = _ssd_problem(seed, *shape)
    dt = dt * float(np.exp(dt_shift))
    quad, chunked, seq, par, h_seq, h_par, h_chunk = _four_ways(x, dt, A, B, C, chunk)
    for y in (chunked, seq, par):
        np.testing.assert_allclose(y, quad, **TOL)
    np.testing.assert_allclose(h_par, h_seq, **TOL)
    np.testing.assert_allclose(h_chunk, h_seq, **TOL)


@jax.jit
def _both_scans(u, delta, A, B, C, D, z, bias, h0):
    kw = dict(delta_bias=bias, delta_softplus=True, h0=h0, return_state=True)
    return (mamba.selective_scan(u, delta, A, B, C, D, z, **kw),
            mamba.selective_scan(u, delta, A, B, C, D, z, method="parallel", **kw))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(1, 1, 1), (9, 3, 4), (30, 5, 6)]))
def test_parallel_scan_equals_sequential_with_every_option(seed, shape):
    """Diagonal A per channel and state, D skip, gate z, delta bias, an initial state."""
    L, D, N = shape
    k = jax.random.split(jax.random.key(seed), 9)
    b = 2
    u, delta, z = (jax.random.normal(k[i], (b, L, D)) for i in range(3))
    A = -jnp.exp(jax.random.normal(k[3], (D, N)))
    B, C = (jax.random.normal(k[i], (b, L, N)) for i in (4, 5))
    D_, bias = jax.random.normal(k[6], (D,)), jax.random.normal(k[7], (D,))
    h0 = jax.random.normal(k[8], (b, D, N))
    (y_s, h_s), (y_p, h_p) = _both_scans(u, delta, A, B, C, D_, z, bias, h0)
    np.testing.assert_allclose(y_p, y_s, **TOL)
    np.testing.assert_allclose(h_p, h_s, **TOL)


def test_selective_scan_follows_the_reference_loop():
    """The equations of Mamba's selective_scan_ref, written as a plain Python loop."""
    k = jax.random.split(jax.random.key(3), 8)
    b, L, D, N = 2, 7, 3, 4
    u, delta, z = (jax.random.normal(k[i], (b, L, D)) for i in range(3))
    A = -jnp.exp(jax.random.normal(k[3], (D, N)))
    B, C = (jax.random.normal(k[i], (b, L, N)) for i in (4, 5))
    D_, bias = jax.random.normal(k[6], (D,)), jax.random.normal(k[7], (D,))
    dlt = np.log1p(np.exp(np.asarray(delta + bias, np.float64)))
    u64, A64, B64, C64 = (np.asarray(v, np.float64) for v in (u, A, B, C))
    h = np.zeros((b, D, N))
    ys = []
    for t in range(L):
        h = np.exp(dlt[:, t, :, None] * A64) * h + (dlt[:, t] * u64[:, t])[..., None] \
            * B64[:, t, None, :]
        ys.append(np.einsum("bdn,bn->bd", h, C64[:, t]))
    y = np.stack(ys, 1) + u64 * np.asarray(D_)
    z64 = np.asarray(z, np.float64)
    y = y * z64 / (1 + np.exp(-z64))
    got = mamba.selective_scan(u, delta, A, B, C, D_, z, delta_bias=bias, delta_softplus=True)
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)


def test_segsum_is_exact_after_large_entries():
    x = jnp.concatenate([jnp.full((8,), -1e4), jnp.full((8,), -1e-3)])
    s = mamba.segsum(x)
    assert s[9, 8] == np.float32(-1e-3) and s[5, 5] == 0 and s[3, 4] == -np.inf
    np.testing.assert_allclose(s[15, 8], -7e-3, rtol=1e-5)


def test_ssd_chunked_pads_a_length_that_is_not_a_multiple_and_keeps_the_initial_state():
    x, dt, A, B, C = _ssd_problem(1, 1, 13, 2, 3, 4)
    h0 = jax.random.normal(jax.random.key(9), (1, 2, 3, 4))
    y, h = mamba.ssd_chunked(x, dt, A, B, C, 5, h0=h0, return_state=True)
    u, delta, A_full, B_, C_ = mamba.ssd_as_selective(x, dt, A, B, C)
    y_s, h_s = mamba.selective_scan(u, delta, A_full, B_, C_, h0=h0.reshape(1, 6, 4),
                                    return_state=True)
    np.testing.assert_allclose(y, y_s.reshape(y.shape), **TOL)
    np.testing.assert_allclose(h.reshape(h_s.shape), h_s, **TOL)


@jax.jit
def _recurrence_and_convolution(u, A_bar, B_bar, C):
    return (mamba.lti_recurrence(u, A_bar, B_bar, C),
            mamba.causal_conv(u, mamba.lti_kernel(A_bar, B_bar, C, u.shape[0])))


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from([(1, 1, 1), (40, 3, 4)]),
       dt=st.floats(0.01, 2.0))
def test_a_time_invariant_ssm_is_a_convolution(seed, shape, dt):
    L, D, N = shape
    k = jax.random.split(jax.random.key(seed), 4)
    A = -jnp.exp(jax.random.normal(k[0], (D, N)))
    A_bar, B_bar = mamba.discretize_zoh(A, jax.random.normal(k[1], (D, N)), jnp.full((D,), dt))
    C = jax.random.normal(k[2], (D, N))
    u = jax.random.normal(k[3], (L, D))
    rec, conv = _recurrence_and_convolution(u, A_bar, B_bar, C)
    np.testing.assert_allclose(conv, rec, rtol=1e-4, atol=1e-5)


def test_zoh_is_exact_for_a_constant_input():
    """With u constant over the step, h(Delta) = e^{Delta A} h(0) + (e^{Delta A} - 1)/A B u."""
    A, B, d = jnp.array([-0.7, -3.0, -1e-7]), jnp.array([1.5, -2.0, 1.0]), jnp.asarray(0.4)
    A_bar, B_bar = mamba.discretize_zoh(A, B, d)
    np.testing.assert_allclose(A_bar, np.exp(0.4 * np.array([-0.7, -3.0, -1e-7])), rtol=1e-6)
    exact = np.expm1(0.4 * np.array([-0.7, -3.0, -1e-7])) / np.array([-0.7, -3.0, -1e-7]) \
        * np.array([1.5, -2.0, 1.0])
    np.testing.assert_allclose(B_bar, exact, rtol=1e-6)
    np.testing.assert_allclose(mamba.discretize_zoh(jnp.zeros(2), jnp.ones(2), d)[1], [0.4, 0.4])


def test_combine_is_associative_and_composes_in_time_order():
    k = jax.random.split(jax.random.key(0), 6)
    e = [(jax.random.uniform(k[2 * i], (5,)), jax.random.normal(k[2 * i + 1], (5,)))
         for i in range(3)]
    left = mamba.combine(mamba.combine(e[0], e[1]), e[2])
    right = mamba.combine(e[0], mamba.combine(e[1], e[2]))
    np.testing.assert_allclose(left, right, rtol=1e-6, atol=1e-6)
    h = jnp.ones(5)
    for a, b in e:
        h = a * h + b
    np.testing.assert_allclose(left[0] * 1.0 + left[1], h, rtol=1e-6)


# --------------------------------------------------------------------------------------------
# The Mamba LM
# --------------------------------------------------------------------------------------------
V = 11


@pytest.fixture(scope="module", params=[True, False], ids=["selective", "time-invariant"])
def model(request):
    cfg = mamba.MambaConfig(vocab_size=V, dim=16, num_layers=2, state_size=4,
                            selective=request.param)
    return mamba.MambaLM(cfg, rngs=nnx.Rngs(0))


def test_recurrent_decoding_gives_the_parallel_logits_at_every_position(model):
    x = jax.random.randint(jax.random.key(1), (2, 14), 0, V)
    full = model(x)
    np.testing.assert_allclose(model(x, method="parallel"), full, rtol=1e-5, atol=1e-5)
    step = jax.jit(lambda m, s, t: m.step(s, t))
    for p in (1, 6):
        state = model.init_state(2, 14)
        logits, state = model.prefill(state, x[:, :p])
        got = [logits]
        for t in range(p, 14):
            logits, state = step(model, state, x[:, t])
            got.append(logits)
        np.testing.assert_allclose(jnp.stack(got, 1), full[:, p - 1:], rtol=1e-5, atol=1e-5)
    # prefill_by_steps (step only) reaches the same state as the parallel prefill
    s_par = model.prefill(model.init_state(2, 14), x)[1]
    s_steps = decoding.prefill_by_steps(model, model.init_state(2, 14), x)[1]
    for a, b in zip(jax.tree.leaves(s_par), jax.tree.leaves(s_steps)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_mamba_lm_is_causal_by_jacobian(model):
    x = jax.random.randint(jax.random.key(2), (1, 10), 0, V)
    emb = model.embed(x)[0]
    D = causality.dependency_map(lambda e: model.from_embeddings(e[None])[0][0], emb)
    assert causality.is_causal(D, strict=False)
    assert len(causality.missing_dependencies(D, strict=False)) == 0


def test_the_state_has_a_constant_size_and_generate_runs_it(model):
    small, large = model.init_state(3, 16), model.init_state(3, 4096)
    assert mamba.state_bytes(small) == mamba.state_bytes(large)
    cfg = model.cfg
    per_layer = (cfg.conv_size - 1) * cfg.inner + cfg.inner * cfg.state_size
    assert mamba.state_bytes(small) == 3 * cfg.num_layers * per_layer * 4
    out = decoding.generate(model, jnp.zeros((3, 2), jnp.int32), 6, jax.random.key(0))
    assert out.shape == (3, 6) and out.dtype == jnp.int32
    greedy = decoding.generate(model, jnp.zeros((1, 2), jnp.int32), 4, jax.random.key(0),
                               temperature=0)
    ids = jnp.zeros((1, 2), jnp.int32)
    for _ in range(4):  # greedy by hand from the parallel forward pass
        ids = jnp.concatenate([ids, jnp.argmax(model(ids)[:, -1:], -1).astype(jnp.int32)], 1)
    np.testing.assert_array_equal(greedy, ids[:, 2:])


def test_selection_off_makes_delta_b_c_constant():
    cfg = mamba.MambaConfig(vocab_size=V, dim=16, state_size=4, selective=False)
    block = mamba.MambaLM(cfg, rngs=nnx.Rngs(0)).blocks[0]
    x = jax.random.normal(jax.random.key(0), (2, 5, cfg.inner))
    delta, B, C = block.ssm_inputs(x)
    assert np.ptp(np.asarray(delta)) == 0 and np.ptp(np.asarray(B), axis=(0, 1)).max() == 0
    sel = mamba.MambaLM(mamba.MambaConfig(vocab_size=V, dim=16, state_size=4),
                        rngs=nnx.Rngs(0))
    assert num_params(sel) > num_params(mamba.MambaLM(cfg, rngs=nnx.Rngs(0)))


def test_selective_copy_task_layout():
    x, y, mask = mamba.selective_copy_task(jax.random.key(0), 64, 20, 4, 6)
    assert x.shape == y.shape == mask.shape == (64, 24)
    assert np.all(x[:, 20] == 1) and np.all(np.asarray(mask).sum(1) == 4)
    data = np.asarray(x[:, :20])
    assert np.all((data > 0).sum(1) == 4)
    for row_x, row_y in zip(data, np.asarray(y)):
        np.testing.assert_array_equal(row_x[row_x > 1], row_y[-4:])
    assert np.asarray(y[mask]).min() >= 2 and np.asarray(y[mask]).max() <= 7


@pytest.mark.parametrize("bad, match", [
    (dict(A=jnp.ones((3,))), "A must have shape"),
    (dict(delta=jnp.ones((2, 5, 4))), "delta must have the shape"),
    (dict(method="fast"), "method must be one of"),
    (dict(B=jnp.ones((2, 5))), "B must have shape"),
])
def test_selective_scan_names_a_bad_argument(bad, match):
    args = dict(u=jnp.ones((2, 5, 3)), delta=jnp.ones((2, 5, 3)), A=-jnp.ones((3, 4)),
                B=jnp.ones((2, 5, 4)), C=jnp.ones((2, 5, 4)))
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        mamba.selective_scan(**args)


def test_config_and_ssd_argument_checks():
    with pytest.raises(ValueError, match="scan must be one of"):
        mamba.MambaConfig(vocab_size=5, scan="fft")
    with pytest.raises(ValueError, match="dim must be an integer"):
        mamba.MambaConfig(vocab_size=5, dim=True)
    x, dt, A, B, C = _ssd_problem(0, 1, 4, 2, 2, 3)
    with pytest.raises(ValueError, match="one scalar per head"):
        mamba.ssd_quadratic(x, dt, jnp.ones((2, 3)), B, C)
    with pytest.raises(ValueError, match="chunk_size must be an integer"):
        mamba.ssd_chunked(x, dt, A, B, C, 0)
