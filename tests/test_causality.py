"""arcourse.causality: dependency maps from Jacobians, on functions whose structure is known."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import causality


def _mixing(weights):
    """y[i, :] = z + 0.1 sin(z), z = sum_j W[i, j] x[j, :] @ A: depends on x_j exactly where
    W[i, j] != 0 (a non-saturating map: a saturated tanh would give true zeros in float32)."""
    a = jax.random.normal(jax.random.key(0), (3, 2))

    def fn(x):
        z = jnp.einsum("ij,jd->id", weights, x) @ a
        return z + 0.1 * jnp.sin(z)

    return fn


@settings(max_examples=8, deadline=None)
@given(n=st.integers(2, 9), seed=st.integers(0, 10_000), density=st.floats(0.1, 0.9))
def test_dependency_map_recovers_a_known_pattern(n, seed, density):
    rng = np.random.default_rng(seed)
    pattern = rng.random((n, n)) < density
    w = jnp.asarray(pattern * rng.normal(size=(n, n)) + pattern * np.sign(rng.normal(size=(n, n)))
                    * 0.5, jnp.float32)
    x = jnp.asarray(rng.normal(size=(n, 3)), jnp.float32)
    for method in ("jacrev", "vjp"):
        D = causality.dependency_map(_mixing(w), x, method=method)
        assert D.shape == (n, n)
        np.testing.assert_array_equal(D != 0, np.asarray(w) != 0)
    D = causality.dependency_map_many(_mixing(w), jnp.stack([x, -x]))
    np.testing.assert_array_equal(D != 0, np.asarray(w) != 0)


def test_jacrev_and_vjp_agree_on_values_for_scalar_outputs():
    # With one output feature, |random cotangent * J| differs from |J| only by a positive factor
    # per row; the zero patterns agree and so do the ratios within a row.
    w = jnp.asarray(np.tril(np.arange(1, 26).reshape(5, 5)), jnp.float32)
    fn = lambda x: jnp.sin(w @ x)
    x = jnp.linspace(-1, 1, 5)
    D1 = causality.dependency_map(fn, x, in_event_ndim=0, out_event_ndim=0)
    D2 = causality.dependency_map(fn, x, in_event_ndim=0, out_event_ndim=0, method="vjp")
    np.testing.assert_array_equal(D1 != 0, D2 != 0)
    scale = D2.sum(1, keepdims=True) / D1.sum(1, keepdims=True)
    np.testing.assert_allclose(D2, D1 * scale, rtol=1e-5)


def test_image_positions_flatten_in_raster_order():
    # The output at pixel (r, c) reads the input pixel just above it, (r - 1, c).
    def fn(x):  # x: [H, W, C]
        return jnp.pad(x, ((1, 0), (0, 0), (0, 0)))[:-1] * 2.0

    x = jnp.ones((3, 4, 2))
    D = causality.dependency_map(fn, x)
    assert D.shape == (12, 12)
    expected = np.zeros((12, 12), bool)
    for i in range(4, 12):
        expected[i, i - 4] = True
    np.testing.assert_array_equal(D != 0, expected)
    assert causality.is_causal(D)
    np.testing.assert_array_equal(causality.row_as_image(D, 5, (3, 4)) != 0,
                                  np.eye(12, dtype=bool)[1].reshape(3, 4))


def test_causal_violations_strict_and_not():
    D = np.tril(np.ones((4, 4)))  # sees j <= i: causal only in the non-strict sense
    assert causality.is_causal(D, strict=False)
    assert not causality.is_causal(D, strict=True)
    np.testing.assert_array_equal(causality.causal_violations(D), [[0, 0], [1, 1], [2, 2], [3, 3]])
    D_strict = np.tril(np.ones((4, 4)), -1)
    assert causality.is_causal(D_strict)
    assert len(causality.missing_dependencies(D_strict)) == 0
    D_strict[3, 1] = 0
    np.testing.assert_array_equal(causality.missing_dependencies(D_strict), [[3, 1]])


def test_a_causal_sequence_model_built_from_a_prefix_sum():
    # A causal toy "sequence model": y_t = f(sum_{s < t} x_s): strictly causal.
    def fn(x):  # [T, d] -> [T, d]
        return jnp.tanh(jnp.cumsum(x, axis=0) - x)

    D = causality.dependency_map(fn, jnp.ones((6, 3)) * 0.1, method="vjp")
    assert causality.is_causal(D)
    assert len(causality.missing_dependencies(D)) == 0
    D_leaky = causality.dependency_map(lambda x: jnp.tanh(jnp.cumsum(x, axis=0)),
                                       jnp.ones((6, 3)) * 0.1)
    np.testing.assert_array_equal(causality.causal_violations(D_leaky),
                                  [[i, i] for i in range(6)])


def test_argument_validation():
    fn = lambda x: x
    with pytest.raises(ValueError, match="float"):
        causality.dependency_map(fn, jnp.ones((3, 2), jnp.int32))
    with pytest.raises(ValueError, match="method"):
        causality.dependency_map(fn, jnp.ones((3, 2)), method="finite differences")
    with pytest.raises(ValueError, match="in_event_ndim"):
        causality.dependency_map(fn, jnp.ones((3, 2)), in_event_ndim=2)
    with pytest.raises(ValueError, match="square"):
        causality.causal_violations(np.ones((2, 3)))
    with pytest.raises(ValueError, match="shape"):
        causality.row_as_image(np.ones((4, 4)), 0, (3, 3))


def test_dependency_map_many_adds_the_maps_and_sees_past_an_accidental_zero():
    # y_i = relu(x_{i-1}) (a scalar per position): at an input with x_{i-1} < 0 the dependency
    # is exactly zero by accident; over several inputs it shows.
    def fn(x):
        return jnp.concatenate([jnp.zeros((1, 1)), jax.nn.relu(x[:-1])], axis=0)

    xs = jnp.asarray([[[-1.0], [2.0], [-3.0], [4.0]], [[1.0], [-2.0], [3.0], [-4.0]]])
    one = causality.dependency_map(fn, xs[0])
    assert one[1, 0] == 0 and one[2, 1] != 0  # one input misses the first dependency
    many = causality.dependency_map_many(fn, xs)
    # One output feature: |random weight * J| is |J| times a positive factor, so the pattern
    # is that of the sum of the two Jacobian maps.
    both = causality.dependency_map(fn, xs[0]) + causality.dependency_map(fn, xs[1])
    np.testing.assert_array_equal(many != 0, both != 0)
    np.testing.assert_array_equal(many != 0, np.eye(4, k=-1, dtype=bool))
    with pytest.raises(ValueError, match="xs"):
        causality.dependency_map_many(fn, jnp.zeros((4,), jnp.int32))
