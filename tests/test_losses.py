"""Losses in log space, label smoothing, clipping, schedules, scheduled sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import losses
from arcourse.metrics import nll_from_logits
from arcourse.neural_ngram import NeuralNGram

log_softmax = jax.jit(losses.log_softmax)
clip_by_global_norm = jax.jit(losses.clip_by_global_norm)
global_norm = jax.jit(losses.global_norm)


# ---- log-softmax and cross-entropy -------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([1.0, 30.0, 1e3, 1e5]))
def test_log_softmax_is_normalised_and_equals_jax(seed, scale):
    z = np.random.default_rng(seed).normal(scale=scale, size=(3, 7)).astype(np.float32)
    lp = np.asarray(log_softmax(z))
    assert np.all(np.isfinite(lp)) and np.all(lp <= 0)
    np.testing.assert_allclose(np.exp(lp.astype(np.float64)).sum(-1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(lp, np.asarray(jax.nn.log_softmax(z)), rtol=1e-5, atol=1e-4)
    # Adding a constant to every logit changes nothing: the max-subtraction is exact.
    np.testing.assert_allclose(np.asarray(log_softmax(z + 50.0)), lp, rtol=1e-5, atol=2e-3)


@pytest.mark.parametrize("z", [[1000.0, 0.0, -5.0], [-1000.0, -1001.0, -1003.0],
                               [100.0, -100.0, 0.0]])
def test_stable_loss_is_finite_where_the_naive_one_is_not(z):
    z = jnp.asarray([z], jnp.float32)
    naive = np.asarray(losses.naive_log_softmax(z))
    assert not np.all(np.isfinite(naive))  # inf or nan somewhere
    stable = np.asarray(losses.log_softmax(z))
    assert np.all(np.isfinite(stable))
    x = jnp.asarray([2])
    loss, grad = jax.value_and_grad(lambda z: losses.cross_entropy(z, x))(z)
    assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))
    # The gradient of the cross-entropy is softmax(z) - onehot(x).
    np.testing.assert_allclose(np.asarray(grad), np.asarray(jax.nn.softmax(z) - jax.nn.one_hot(x, 3)),
                               atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.floats(0.0, 1.0))
def test_label_smoothed_cross_entropy_is_cross_entropy_with_smoothed_targets(seed, eps):
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=3.0, size=(4, 6)).astype(np.float32)
    x = rng.integers(0, 6, 4)
    q = losses.smooth_labels(x, 6, eps)
    np.testing.assert_allclose(np.asarray(q).sum(-1), 1.0, rtol=1e-6)
    want = np.mean(np.asarray(optax.softmax_cross_entropy(z, q)))
    got = float(losses.cross_entropy(z, x, label_smoothing=eps))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # And the same thing through optax's own smoothing of one-hot labels.
    q2 = optax.smooth_labels(jax.nn.one_hot(x, 6), eps)
    np.testing.assert_allclose(np.asarray(q), np.asarray(q2), atol=1e-7)


def test_label_smoothing_minimum_is_the_smoothed_distribution():
    # With eps > 0 the loss is minimised by p = q, not by a one-hot prediction: confidence is capped.
    eps, V = 0.1, 5
    x = jnp.asarray([2])
    q = losses.smooth_labels(x, V, eps)
    at_q = float(losses.cross_entropy(jnp.log(q), x, label_smoothing=eps))
    peaked = float(losses.cross_entropy(30.0 * jax.nn.one_hot(x, V), x, label_smoothing=eps))
    assert at_q < peaked
    g = jax.grad(lambda z: losses.cross_entropy(z, x, label_smoothing=eps))(jnp.log(q))
    np.testing.assert_allclose(np.asarray(g), 0.0, atol=1e-6)


def test_cross_entropy_matches_metrics_and_masks():
    rng = np.random.default_rng(0)
    z = rng.normal(size=(2, 5, 4)).astype(np.float32)
    x = rng.integers(0, 4, (2, 5))
    np.testing.assert_allclose(float(losses.cross_entropy(z, x)), float(nll_from_logits(z, x)),
                               rtol=1e-6)
    mask = np.zeros((2, 5))
    mask[0, 1] = 1
    want = -float(jax.nn.log_softmax(z[0, 1])[x[0, 1]])
    np.testing.assert_allclose(float(losses.cross_entropy(z, x, mask=mask)), want, rtol=1e-6)


def test_argument_errors_name_the_argument():
    with pytest.raises(ValueError, match="label_smoothing"):
        losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2, int), label_smoothing=1.5)
    with pytest.raises(ValueError, match="targets"):
        losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros(3, int))
    with pytest.raises(ValueError, match="targets"):
        losses.cross_entropy(jnp.zeros((2, 3)), jnp.zeros(2))
    with pytest.raises(ValueError, match="tokens"):
        losses.next_token_loss(jnp.zeros((2, 1, 3)), jnp.zeros((2, 1), int))
    with pytest.raises(ValueError, match="max_norm"):
        losses.clip_by_global_norm({"a": jnp.ones(2)}, 0.0)
    with pytest.raises(ValueError, match="total_steps"):
        losses.warmup_cosine(0, peak=1.0, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="mix_prob"):
        losses.scheduled_sampling_inputs(jax.random.key(0), jnp.zeros((1, 3), int),
                                         jnp.zeros((1, 3, 2)), 2.0)


# ---- teacher forcing ----------------------------------------------------------------------------
@settings(max_examples=8, deadline=None)
@given(st.sampled_from([(1, 2, 3), (3, 7, 5), (2, 5, 2)]), st.integers(0, 2**16))
def test_next_token_loss_scores_position_t_on_token_t_plus_1(shape, seed):
    B, T, V = shape
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(B, T, V)).astype(np.float32)
    x = rng.integers(0, V, (B, T))
    lp = z - z.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    want = np.mean([-lp[b, t, x[b, t + 1]] for b in range(B) for t in range(T - 1)])
    np.testing.assert_allclose(float(losses.next_token_loss(z, x)), want, rtol=1e-5)
    # The last position has no target: the loss does not depend on it; the first token is
    # never a target: the loss does not depend on which symbol it is.
    g = np.asarray(jax.grad(losses.next_token_loss)(jnp.asarray(z), x))
    assert np.all(g[:, -1] == 0) and np.any(g[:, :-1] != 0)
    x2 = x.copy()
    x2[:, 0] = (x2[:, 0] + 1) % V
    assert float(losses.next_token_loss(z, x2)) == pytest.approx(float(losses.next_token_loss(z, x)))


# ---- clipping -----------------------------------------------------------------------------------
def _tree(rng, scale):
    return {"a": jnp.asarray(rng.normal(scale=scale, size=(3, 4)), jnp.float32),
            "b": {"c": jnp.asarray(rng.normal(scale=scale, size=(5,)), jnp.float32)}}


def _flat(tree):
    return np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree_util.tree_leaves(tree)])


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from([1e-3, 1.0, 1e3, 1e30]), st.floats(0.1, 10.0))
def test_global_norm_clipping_keeps_the_direction_and_caps_the_norm(seed, scale, c):
    g = _tree(np.random.default_rng(seed), scale)
    clipped = clip_by_global_norm(g, c)
    flat, cflat = _flat(g).astype(np.float64), _flat(clipped).astype(np.float64)
    assert np.all(np.isfinite(cflat))
    norm = np.linalg.norm(flat)  # float64: no overflow
    np.testing.assert_allclose(float(global_norm(g)), norm, rtol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(cflat), min(norm, c), rtol=1e-5)
    cos = flat @ cflat / (np.linalg.norm(flat) * np.linalg.norm(cflat))
    assert cos == pytest.approx(1.0, abs=1e-5)
    # The same numbers as Optax's transformation (whose sum of squares overflows past ~1e19).
    if scale < 1e10:
        want, _ = optax.clip_by_global_norm(c).update(g, optax.EmptyState())
        np.testing.assert_allclose(cflat, _flat(want), rtol=1e-5, atol=1e-30)


def test_clipping_each_element_changes_the_direction():
    g = {"w": jnp.asarray([10.0, 1.0])}
    by_value = np.asarray(losses.clip_by_value(g, 1.0)["w"])
    by_norm = np.asarray(losses.clip_by_global_norm(g, 1.0)["w"])
    np.testing.assert_allclose(by_value, [1.0, 1.0])  # now at 45 degrees: a new direction
    np.testing.assert_allclose(by_norm / np.linalg.norm(by_norm), [10, 1] / np.sqrt(101.0),
                               rtol=1e-6)


def test_gradients_are_finite_under_clipping():
    # A model whose weights have blown up gives enormous gradients; clipped, they are finite
    # and bounded, and an optimiser step with make_optimizer stays finite.
    model = NeuralNGram(5, 3, 4, 16, rngs=nnx.Rngs(0))
    graph, params = nnx.split(model, nnx.Param)
    params["out"] = jax.tree_util.tree_map(lambda p: p * 1e4, params["out"])
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 5, (4, 12)), jnp.int32)

    def loss(p):
        return losses.next_token_loss(nnx.merge(graph, p)(tokens), tokens)

    grads = jax.jit(jax.grad(loss))(params)
    norm = float(losses.global_norm(grads))
    assert np.isfinite(norm) and norm > 1e3
    clipped = losses.clip_by_global_norm(grads, 1.0)
    assert np.all(np.isfinite(_flat(clipped)))
    assert float(losses.global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
    tx = losses.make_optimizer(1e-2, 100, warmup_steps=10, clip_norm=1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert np.all(np.isfinite(_flat(updates)))


# ---- schedules ----------------------------------------------------------------------------------
@settings(max_examples=25, deadline=None)
@given(st.floats(1e-5, 1.0), st.integers(0, 50), st.integers(1, 200), st.floats(0.0, 1.0))
def test_warmup_cosine_equals_optax(peak, warmup, decay, final_frac):
    total = warmup + decay
    final = peak * final_frac
    steps = np.arange(0, 300)  # one shape for every example: compiled once
    got = np.asarray(losses.warmup_cosine(steps, peak=peak, warmup_steps=warmup,
                                          total_steps=total, final=final))
    sched = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, total, final)
    want = np.asarray(sched(jnp.asarray(steps)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7 * peak)
    assert got[0] == pytest.approx(0.0 if warmup else peak, rel=1e-6, abs=1e-9)
    assert got.max() == pytest.approx(peak, rel=1e-6)
    assert got[total:].tolist() == pytest.approx([final] * (300 - total), rel=1e-5, abs=1e-9)


# ---- scheduled sampling -------------------------------------------------------------------------
def test_scheduled_sampling_mixes_the_model_s_draws_at_the_given_rate():
    rng = np.random.default_rng(0)
    B, T, V = 64, 50, 7
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    # Peaked logits: the model's draw at t-1 is (almost surely) symbol (3 * t) % V.
    pred = (3 * np.arange(T)) % V
    logits = jnp.asarray(60.0 * np.eye(V)[pred][None].repeat(B, 0), jnp.float32)
    key = jax.random.key(1)
    none = losses.scheduled_sampling_inputs(key, tokens, logits, 0.0)
    np.testing.assert_array_equal(np.asarray(none), np.asarray(tokens))
    every = np.asarray(losses.scheduled_sampling_inputs(key, tokens, logits, 1.0))
    np.testing.assert_array_equal(every[:, 0], np.asarray(tokens[:, 0]))  # position 0 is kept
    np.testing.assert_array_equal(every[:, 1:], np.broadcast_to(pred[:-1], (B, T - 1)))
    half = np.asarray(losses.scheduled_sampling_inputs(key, tokens, logits, 0.3))
    replaced = (half[:, 1:] == pred[None, :-1]) & (np.asarray(tokens[:, 1:]) != pred[None, :-1])
    could = np.asarray(tokens[:, 1:]) != pred[None, :-1]
    assert replaced.sum() / could.sum() == pytest.approx(0.3, abs=0.03)


# ---- make_optimizer is the hand-built chains the chapters used -----------------------------------
def _updates(tx, steps=30):
    params = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)}
    state = tx.init(params)
    out = []
    for t in range(steps):
        g = {"w": jnp.sin(params["w"] * (t + 1)) * (3.0 if t % 5 == 0 else 0.3)}
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(np.asarray(params["w"]))
    return np.stack(out)


@pytest.mark.parametrize("name", ["ch03", "ch03 recall", "ch04", "ch05", "ch06"])
def test_make_optimizer_equals_the_chapters_hand_built_chains(name):
    """Chapters 03-06 built clip + Adam(W) by hand before issue 10; make_optimizer gives the very
    same parameters, bit for bit, so their numbers did not move."""
    S, lr = 30, 1e-2
    clip = optax.clip_by_global_norm(1.0)
    hand, mine = {
        "ch03": (optax.chain(clip, optax.adam(optax.warmup_cosine_decay_schedule(
                     lr / 10, lr, 3, S, lr / 20))),
                 losses.make_optimizer(lr, S, warmup_steps=3, init_lr=lr / 10, final_lr=lr / 20)),
        "ch03 recall": (optax.chain(clip, optax.adam(lr)), losses.make_optimizer(lr, S, final_lr=lr)),
        "ch04": (optax.chain(clip, optax.adam(optax.cosine_decay_schedule(lr, S, alpha=0.1))),
                 losses.make_optimizer(lr, S, final_lr=lr * 0.1)),
        "ch05": (optax.chain(clip, optax.adamw(optax.warmup_cosine_decay_schedule(
                     0.0, lr, 2, S, lr * 0.05), weight_decay=1e-4)),
                 losses.make_optimizer(lr, S, warmup_steps=2, final_lr=lr * 0.05,
                                       weight_decay=1e-4)),
        "ch06": (optax.chain(clip, optax.adamw(optax.warmup_cosine_decay_schedule(
                     0.0, lr, 6, S, lr / 10), weight_decay=0.01)),
                 losses.make_optimizer(lr, S, warmup_steps=6, final_lr=lr / 10, weight_decay=0.01)),
    }[name]
    np.testing.assert_array_equal(_updates(hand), _updates(mine))


def test_make_optimizer_checks_its_steps():
    with pytest.raises(ValueError, match="total_steps"):
        losses.make_optimizer(1e-2, True)
    with pytest.raises(ValueError, match="warmup_steps"):
        losses.make_optimizer(1e-2, 10, warmup_steps=10)
