"""Chapter 08: MADE is autoregressive in every order (by Jacobian), MAF and IAF layers are exact
bijections whose log-determinants are the Jacobians', a 2-D flow density integrates to 1."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import flows


def _perturb(model, scale=0.5, seed=1):
    """Give a freshly built flow non-zero output weights (it starts as the identity)."""
    key = jax.random.key(seed)
    for i, layer in enumerate(model.layers):
        w = layer.made.weights[-1]
        w[...] = scale * jax.random.normal(jax.random.fold_in(key, i), w[...].shape)
        b = layer.made.biases[-1]
        b[...] = 0.3 * scale * jax.random.normal(jax.random.fold_in(key, 100 + i), b[...].shape)
    return model


# ---- MADE ----------------------------------------------------------------------------------
def test_masks_follow_the_degree_rules():
    deg = [np.array([2, 1, 3]), np.array([1, 2, 1, 2])]
    hidden, out = flows.made_masks(deg)
    assert hidden.shape == (3, 4) and out.shape == (4, 3)
    np.testing.assert_array_equal(hidden, deg[1][None, :] >= deg[0][:, None])
    np.testing.assert_array_equal(out, deg[0][None, :] > deg[1][:, None])
    # the first variable (degree 1) feeds nothing at the output: its column is all False
    assert not out[:, 1].any()


@settings(max_examples=8, deadline=None)
@given(dim=st.integers(1, 7), hidden=st.lists(st.sampled_from([3, 8, 16]), min_size=1, max_size=2),
       seed=st.integers(0, 10_000), num_masks=st.integers(1, 3))
def test_made_jacobian_is_strictly_triangular_in_every_order(dim, hidden, seed, num_masks):
    rng = np.random.default_rng(seed)
    orders = np.stack([rng.permutation(dim) + 1 for _ in range(num_masks)])
    made = flows.MADE(dim, hidden, params_per_dim=2, input_degrees=orders, num_masks=num_masks,
                      activation="tanh", seed=seed, rngs=nnx.Rngs(seed))
    x = jnp.asarray(rng.normal(size=dim), jnp.float32)
    jac = nnx.jit(lambda m, v, k: jax.jacfwd(lambda v: m(v, k))(v))
    for k in range(num_masks):
        J = jac(made, x, k)  # (D, P, D)
        dep = np.abs(np.asarray(J)).sum(1)  # dep[i, j]: does output i read input j?
        deg = orders[k]
        allowed = deg[None, :] < deg[:, None]
        assert np.all(dep[~allowed] == 0.0), f"mask {k}: output reads a later or equal input"
        # in the order, the Jacobian is strictly lower triangular
        perm = np.argsort(deg)
        assert np.all(np.triu(dep[np.ix_(perm, perm)]) == 0.0)


def test_made_with_cyclic_degrees_uses_every_allowed_input():
    dim = 6
    made = flows.MADE(dim, (16, 16), activation="tanh", rngs=nnx.Rngs(0))
    J = jax.jacfwd(lambda v: made(v)[:, 0])(jnp.linspace(-1, 1, dim))
    assert np.all(np.abs(np.asarray(J))[np.tril_indices(dim, -1)] > 0)


def test_connectivity_resampling_gives_different_masks():
    made = flows.MADE(8, (32,), num_masks=4, random_orders=True, rngs=nnx.Rngs(0))
    m = np.asarray(made.masks[0][...])
    assert len({m[k].tobytes() for k in range(4)}) == 4


def test_made_validates_its_arguments():
    with pytest.raises(ValueError, match="permutation"):
        flows.MADE(3, (8,), input_degrees=np.array([1, 1, 2]), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden"):
        flows.MADE(3, (), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="dim"):
        flows.MADE(True, (8,), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="kind"):
        flows.AffineAutoregressive(3, (8,), kind="flow", rngs=nnx.Rngs(0))


def test_categorical_made_nll_is_a_normalised_model():
    # Summing p(x) over all 3^3 sequences of a 3-variable, 3-level MADE gives 1.
    made = flows.MADE(3, (8,), params_per_dim=3, rngs=nnx.Rngs(0))
    _perturb_made(made)
    grid = np.stack(np.meshgrid(*[np.arange(3)] * 3, indexing="ij"), -1).reshape(-1, 3)
    nll = jax.vmap(lambda x: flows.made_nll(made, x[None], 3))(jnp.asarray(grid))
    assert abs(float(jnp.sum(jnp.exp(-3 * nll))) - 1.0) < 1e-5


def _perturb_made(made):
    w = made.weights[-1]
    w[...] = jax.random.normal(jax.random.key(3), w[...].shape)


# ---- MAF / IAF -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["maf", "iaf"])
@pytest.mark.parametrize("dim", [1, 2, 5])
def test_inverse_of_forward_is_the_identity(kind, dim):
    flow = _perturb(flows.AutoregressiveFlow(dim, 3, (16,), kind=kind, orders="random",
                                             rngs=nnx.Rngs(dim)))
    x = jax.random.normal(jax.random.key(0), (7, dim))

    @nnx.jit
    def round_trips(f, x):
        u, ld_u = f.to_noise(x)
        x2, ld_x = f.to_data(u)
        return x2, ld_x + ld_u, f.to_noise(f.to_data(x)[0])[0]

    x2, ld_sum, u2 = round_trips(flow, x)
    # float32 rounding compounds over the `dim` sequential passes of the inversion, scaled by the
    # perturbed flow's exp(alpha) factors: a few 1e-4 at dim 5. A wrong inverse is off by O(1).
    np.testing.assert_allclose(x2, x, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(ld_sum, 0.0, atol=1e-4)
    np.testing.assert_allclose(u2, x, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("kind", ["maf", "iaf"])
def test_log_det_equals_the_jacobians(kind):
    dim = 4
    flow = _perturb(flows.AutoregressiveFlow(dim, 2, (16,), kind=kind, rngs=nnx.Rngs(1)))
    x = jax.random.normal(jax.random.key(1), (5, dim))

    @nnx.jit
    def log_dets_and_jacobians(f, x):
        out = []
        for fn in (f.to_noise, f.to_data, f.layers[0].to_noise):
            J = jax.vmap(jax.jacfwd(lambda v, fn=fn: fn(v[None])[0][0]))(x)
            out.append((fn(x)[1], J))
        return out

    (ld_n, J_n), (ld_d, J_d), (ld_0, J_0) = log_dets_and_jacobians(flow, x)
    for ld, J in ((ld_n, J_n), (ld_d, J_d)):
        np.testing.assert_allclose(ld, jnp.linalg.slogdet(J)[1], rtol=1e-4, atol=1e-4)
    # one layer's Jacobian is triangular (layer 0: the natural order), so its log-det is the
    # sum of the logs of its diagonal
    diag = jnp.sum(jnp.log(jnp.abs(jnp.diagonal(J_0, axis1=1, axis2=2))), -1)
    np.testing.assert_allclose(ld_0, diag, rtol=1e-4, atol=1e-4)
    assert np.all(np.asarray(jnp.triu(J_0, 1)) == 0.0)


def test_maf_sample_needs_all_d_passes():
    dim = 5
    layer = _perturb(flows.AutoregressiveFlow(dim, 1, (16,), rngs=nnx.Rngs(2))).layers[0]
    u = jax.random.normal(jax.random.key(2), (3, dim))
    x, _ = flows.maf_sample(layer.shift_log_scale, u)
    np.testing.assert_allclose(layer.to_noise(x)[0], u, atol=1e-4)
    # D - 1 passes leave the last variable of the order wrong
    xs = jnp.zeros_like(u)
    for _ in range(dim - 1):
        mu, a = layer.shift_log_scale(xs)
        xs = u * jnp.exp(a) + mu
    assert float(jnp.abs(xs - x).max()) > 1e-5


def test_maf_log_density_matches_the_layer_and_iaf_sample_matches_its_density():
    dim = 4
    maf = _perturb(flows.AutoregressiveFlow(dim, 1, (16,), rngs=nnx.Rngs(3)))
    x = jax.random.normal(jax.random.key(3), (6, dim))
    mu, a = maf.layers[0].shift_log_scale(x)
    np.testing.assert_allclose(flows.maf_log_density(x, mu, a), maf.log_prob(x), rtol=1e-5,
                               atol=1e-5)
    iaf = _perturb(flows.AutoregressiveFlow(dim, 1, (16,), kind="iaf", rngs=nnx.Rngs(4)))
    xs, log_q = flows.iaf_sample(iaf.layers[0].shift_log_scale, x)
    np.testing.assert_allclose(log_q, iaf.log_prob(xs), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["maf", "iaf"])
def test_a_2d_density_integrates_to_one(kind):
    # tanh units keep the shift and log-scale bounded, so the tails stay Gaussian-like and a
    # finite square holds all but a negligible part of the mass
    flow = _perturb(flows.AutoregressiveFlow(2, 3, (32,), kind=kind, activation="tanh",
                                             rngs=nnx.Rngs(5)), scale=0.5)
    _, lp, area = flows.grid_log_prob(lambda p: flows.flow_log_prob(flow, p), lim=12.0,
                                      num=400)
    mass = float(np.exp(lp).sum() * area)
    assert abs(mass - 1.0) < 0.01, mass
    # and the density is far from the base Gaussian's: the flow did something
    base = np.asarray(flows.standard_normal_log_prob(jnp.zeros((1, 2))))[0]
    assert abs(lp.max() - base) > 0.2


def test_mixture_density_integrates_to_one_and_samples_fit_it():
    _, lp, area = flows.grid_log_prob(flows.mixture_log_prob, lim=4.0, num=300)
    assert abs(float(np.exp(lp).sum() * area) - 1.0) < 1e-3
    x = flows.toy_2d("mixture", 4000, seed=0)
    for name in ("moons", "rings"):
        assert flows.toy_2d(name, 10).shape == (10, 2)
    # an empirical check that the samples come from the stated density: mean log p near -entropy
    assert -2.6 < float(jnp.mean(flows.mixture_log_prob(x))) < -2.0


# ---- dequantisation ------------------------------------------------------------------------
def test_dequantisation_bits_per_dim():
    key = jax.random.key(0)
    x = jnp.asarray(np.random.default_rng(0).integers(0, 17, (10, 8, 8)))
    z = flows.dequantize(key, x, 17)
    assert z.shape == (10, 64) and float(z.min()) >= 0 and float(z.max()) < 1
    np.testing.assert_array_equal(jnp.floor(z * 17).astype(int), x.reshape(10, 64))
    # a uniform density on [0,1)^D (log p_z = 0) is the uniform discrete model: log2(17) bits
    assert abs(float(flows.dequantized_bits_per_dim(jnp.zeros(10), 64, 17)) - math.log2(17)) < 1e-6
    y, ld = flows.logit_transform(z)
    J = jax.vmap(jax.jacfwd(lambda v: flows.logit_transform(v[None])[0][0]))(z[:2])
    np.testing.assert_allclose(ld[:2], jnp.linalg.slogdet(J)[1], rtol=1e-4)


def test_importance_weighted_bound_is_tighter():
    flow = _perturb(flows.AutoregressiveFlow(4, 1, (8,), rngs=nnx.Rngs(6)), scale=0.3)
    x = jnp.asarray(np.random.default_rng(1).integers(0, 5, (20, 4)))
    b1 = flows.importance_weighted_bits_per_dim(jax.random.key(0), flow, x, 5, 1)
    b16 = flows.importance_weighted_bits_per_dim(jax.random.key(0), flow, x, 5, 16)
    assert float(b16) <= float(b1) + 1e-3
