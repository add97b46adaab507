"""Offline data: the Markov source's exact quantities, the corpus snapshot, the digits split."""

import math

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import data


@settings(max_examples=15, deadline=None)
@given(order=st.integers(1, 3), vocab=st.integers(2, 4), seed=st.integers(0, 10**6),
       conc=st.floats(0.1, 3.0))
def test_stationary_distribution_is_stationary(order, vocab, seed, conc):
    src = data.MarkovSource.random(order=order, vocab_size=vocab, concentration=conc, seed=seed)
    pi = src.stationary
    assert np.isclose(pi.sum(), 1.0) and np.all(pi >= 0)
    # one step of the context chain leaves pi unchanged
    nxt = np.zeros_like(pi)
    for c in range(src.num_contexts):
        for x in range(vocab):
            nxt[(c * vocab + x) % src.num_contexts] += pi[c] * src.transitions[c, x]
    np.testing.assert_allclose(nxt, pi, atol=1e-10)


@settings(max_examples=10, deadline=None)
@given(order=st.integers(1, 2), vocab=st.integers(2, 3), seed=st.integers(0, 10**6),
       length=st.integers(1, 5))
def test_joint_probabilities_sum_to_one_and_match_the_chain_rule(order, vocab, seed, length):
    src = data.MarkovSource.random(order=order, vocab_size=vocab, seed=seed)
    length = max(length, order)
    seqs = src.all_sequences(length)
    logps = np.array([src.log_prob(s) for s in seqs])
    assert math.isclose(np.exp(logps).sum(), 1.0, rel_tol=1e-9)
    s = seqs[len(seqs) // 2]
    chain = sum(np.log(src.next_symbol_probs(s[:t])[s[t]]) for t in range(length))
    assert math.isclose(chain, src.log_prob(s), rel_tol=1e-9, abs_tol=1e-12)


def test_entropy_rate_matches_a_long_sample():
    src = data.MarkovSource.random(order=2, vocab_size=4, seed=3)
    x = src.sample(1, 400_000)
    nll = -src.conditional_log_probs(x).mean()
    assert abs(nll - src.entropy_rate()) < 0.01
    # a deterministic source has zero entropy; a uniform one has ln V
    t = np.zeros((4, 2))
    t[np.arange(4), np.arange(4) % 2] = 1.0
    assert data.MarkovSource(order=2, vocab_size=2, transitions=t).entropy_rate() == 0.0
    u = data.MarkovSource(order=1, vocab_size=3, transitions=np.full((3, 3), 1 / 3))
    assert math.isclose(u.entropy_rate(), math.log(3))


def test_sampling_is_seeded():
    src = data.MarkovSource.random(seed=1)
    np.testing.assert_array_equal(src.sample(4, 500), src.sample(4, 500))
    assert not np.array_equal(src.sample(4, 500), src.sample(5, 500))


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="order"):
        data.MarkovSource.random(order=0)
    with pytest.raises(ValueError, match="transitions"):
        data.MarkovSource(order=1, vocab_size=2, transitions=np.ones((2, 2)))
    with pytest.raises(ValueError, match="length"):
        data.MarkovSource.random(order=3).sample(0, 2)
    with pytest.raises(ValueError, match="valid_fraction"):
        data.char_corpus(valid_fraction=1.5)


def test_corpus_snapshot_is_pinned_and_round_trips():
    c = data.char_corpus()
    assert len(c.text) > 450_000 and c.vocab_size < 100
    assert len(c.train) + len(c.valid) == len(c.text)
    assert c.decode(c.encode("def f(x):\n    return x")) == "def f(x):\n    return x"
    assert c.decode(c.train[:50]) == c.text[:50]
    with pytest.raises(ValueError, match="vocabulary"):
        c.encode("é")


def test_digits_split_is_fixed_and_disjoint():
    d = data.digits()
    assert d.x_train.shape == (1500, 8, 8) and d.x_test.shape == (297, 8, 8)
    assert d.x_train.min() >= 0 and d.x_train.max() <= 16
    np.testing.assert_array_equal(data.digits().x_test, d.x_test)
    # the independent per-pixel baseline quoted in the design: 2.42 bits/dim on the test split
    counts = np.stack([(d.x_train == v).sum(0) for v in range(17)], -1) + 0.5
    p = counts / counts.sum(-1, keepdims=True)
    bpd = -np.log2(np.take_along_axis(p[None], d.x_test[..., None], -1)).mean()
    assert abs(bpd - 2.42) < 0.005


def test_digits_are_scikit_learns_whether_read_from_its_file_or_through_load_digits(monkeypatch):
    from sklearn.datasets import load_digits

    ref = load_digits()
    perm = np.random.default_rng(0).permutation(len(ref.target))
    d = data.digits()  # read from the file scikit-learn ships
    np.testing.assert_array_equal(d.x_train, ref.images.astype(np.int32)[perm[:1500]])
    np.testing.assert_array_equal(d.y_test, ref.target[perm[1500:]])
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)  # no file: load_digits
    e = data.digits()
    np.testing.assert_array_equal(e.x_train, d.x_train)
    np.testing.assert_array_equal(e.y_train, d.y_train)
    with pytest.raises(ValueError, match="num_train"):
        data.digits(num_train=1797)


def test_random_windows_are_shifted_by_one():
    tokens = np.arange(100)
    x, y = jax.jit(lambda k: data.random_windows(k, tokens, 8, 10))(jax.random.key(0))
    assert x.shape == y.shape == (8, 10)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(x) + 1)
