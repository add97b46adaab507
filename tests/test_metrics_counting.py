"""Metrics agree with their definitions; counting is maximum likelihood and normalised."""

import math

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import counting, metrics
from arcourse.data import MarkovSource


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(2, 9), st.integers(0, 10**6))
def test_nll_from_logits_equals_the_direct_definition(T, V, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, V)) * 5
    y = rng.integers(0, V, T)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    direct = -np.mean(np.log(p[np.arange(T), y]))
    assert math.isclose(float(metrics.nll_from_logits(jnp.asarray(logits), jnp.asarray(y))),
                        direct, rel_tol=1e-4, abs_tol=1e-5)


def test_units_convert_consistently():
    nll = math.log(4)
    assert math.isclose(metrics.nats_to_bits(nll), 2.0)
    assert math.isclose(metrics.perplexity(nll), 4.0)
    assert math.isclose(metrics.bits_to_nats(metrics.nats_to_bits(0.7)), 0.7)
    assert math.isclose(float(metrics.entropy(jnp.array([0.5, 0.5, 0.0]))), math.log(2), rel_tol=1e-6)


def test_nll_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="targets"):
        metrics.nll_from_logits(jnp.zeros((3, 4)), jnp.zeros((4,), int))


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 3), st.integers(2, 4), st.integers(0, 10**6))
def test_counts_add_up_and_match_a_loop(order, V, seed):
    seq = np.random.default_rng(seed).integers(0, V, 60)
    counts = counting.count_transitions(seq, order, V)
    assert counts.sum() == len(seq) - order
    loop = np.zeros_like(counts)
    for t in range(order, len(seq)):
        c = 0
        for s in seq[t - order : t]:
            c = c * V + s
        loop[c, seq[t]] += 1
    np.testing.assert_array_equal(counts, loop)


def test_smoothed_rows_are_distributions_and_alpha_zero_is_mle():
    counts = np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 0.0]])
    p = counting.smoothed_conditional(counts, 0.5)
    np.testing.assert_allclose(p.sum(1), 1.0)
    mle = counting.smoothed_conditional(counts, 0.0)
    np.testing.assert_allclose(mle[0], [0.75, 0.25, 0.0])
    np.testing.assert_allclose(mle[1], [1 / 3] * 3)  # an unseen context: uniform


def test_mle_maximises_the_training_likelihood():
    seq = MarkovSource.random(order=1, vocab_size=3, seed=2).sample(1, 500)
    counts = counting.count_transitions(seq, 1, 3)

    def loglik(theta):
        return float(np.where(counts > 0, counts * np.log(np.where(counts > 0, theta, 1.0)), 0.0).sum())

    mle = counting.smoothed_conditional(counts, 0.0)
    rng = np.random.default_rng(0)
    for _ in range(20):
        other = np.clip(mle + rng.normal(scale=0.05, size=mle.shape), 1e-3, None)
        other /= other.sum(1, keepdims=True)
        assert loglik(other) <= loglik(mle) + 1e-9


def test_ngram_model_is_a_distribution_over_sequences():
    src = MarkovSource.random(order=2, vocab_size=3, seed=5)
    model = counting.NGramCounts(order=2, vocab_size=3, alpha=0.3).fit(src.sample(0, 300))
    total = sum(math.exp(model.log_prob(s)) for s in src.all_sequences(5))
    assert math.isclose(total, 1.0, rel_tol=1e-9)


def test_count_model_samples_take_the_seed_first():
    src = MarkovSource.random(order=2, vocab_size=3, seed=5)
    model = counting.NGramCounts(order=2, vocab_size=3, alpha=0.3).fit(src.sample(0, 3000))
    a = model.sample(7, 50, prefix=[1, 2])
    assert a.shape == (50,) and a.dtype == np.int32
    np.testing.assert_array_equal(a, model.sample(7, 50, prefix=[1, 2]))
    np.testing.assert_array_equal(a, model.sample(np.random.default_rng(7), 50, prefix=[1, 2]))
    assert not np.array_equal(a, model.sample(8, 50, prefix=[1, 2]))
    assert model.sample(0, 5).shape == (5,)
    with pytest.raises(ValueError, match="length"):
        model.sample(0, True)


def test_eval_windows_cut_consecutive_windows_with_shifted_targets():
    tokens = np.arange(23)
    x, y = metrics.eval_windows(tokens, 5)
    assert x.shape == y.shape == (4, 5)  # (23 - 1) // 5
    np.testing.assert_array_equal(np.asarray(x).ravel(), np.arange(20))
    np.testing.assert_array_equal(np.asarray(y).ravel(), np.arange(1, 21))
    x2, y2 = metrics.eval_windows(tokens, 5, num=2)
    np.testing.assert_array_equal(x2, x[:2])
    with pytest.raises(ValueError, match="num"):
        metrics.eval_windows(tokens, 5, num=5)
    with pytest.raises(ValueError, match="length"):
        metrics.eval_windows(tokens, True)
    with pytest.raises(ValueError, match="too few"):
        metrics.eval_windows(np.arange(5), 5)


def test_count_model_approaches_the_source():
    src = MarkovSource.random(order=2, vocab_size=4, seed=1)
    heldout = src.sample(2, 50_000)
    model = counting.NGramCounts(order=2, vocab_size=4).fit(src.sample(1, 200_000))
    gap = -model.conditional_log_probs(heldout).mean() + src.conditional_log_probs(heldout).mean()
    assert 0 <= gap < 0.005


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.integers(2, 4), st.floats(0.05, 2.0), st.integers(0, 10**6))
def test_cross_entropy_rate_is_entropy_rate_plus_kl_rate(order, V, alpha, seed):
    """-sum_c pi(c) sum_x A ln theta = H + D(p || q); D >= 0, and D = 0 for the true table."""
    src = MarkovSource.random(order=order, vocab_size=V, concentration=0.5, seed=seed)
    model = counting.NGramCounts(order, V, alpha).fit(src.sample(seed, 300))
    kl = counting.kl_divergence_rate(src, model.log_probs)
    cross = float(-(src.stationary[:, None] * src.transitions * model.log_probs).sum())
    assert math.isclose(cross, src.entropy_rate() + kl, rel_tol=1e-9, abs_tol=1e-12)
    assert kl >= 0.0
    assert abs(counting.kl_divergence_rate(src, np.log(src.transitions))) < 1e-12


def test_heldout_gap_to_the_source_estimates_the_kl_rate():
    src = MarkovSource.random(order=2, vocab_size=3, concentration=0.5, seed=3)
    model = counting.NGramCounts(order=2, vocab_size=3, alpha=0.5).fit(src.sample(0, 2_000))
    heldout = src.sample(1, 400_000)
    gap = float(src.conditional_log_probs(heldout).mean()
                - model.conditional_log_probs(heldout).mean())
    assert math.isclose(gap, counting.kl_divergence_rate(src, model.log_probs), abs_tol=2e-3)
    with pytest.raises(ValueError, match="shape"):
        counting.kl_divergence_rate(src, np.zeros((3, 3)))
