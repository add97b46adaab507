"""arcourse.kneser_ney: normalisation, agreement with a direct (dictionary) implementation of the
formulas, and the two ways of scoring agreeing."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse.kneser_ney import AddK, KneserNey, ngram_keys

SETTINGS = settings(max_examples=25, deadline=None)


def corpora(max_v=5):
    return st.integers(2, max_v).flatmap(
        lambda V: st.tuples(st.just(V), st.lists(st.integers(0, V - 1), min_size=8, max_size=60)))


def naive_kn(train, order, V, discounts, history, w):
    """Interpolated Kneser-Ney straight from the definition, with dictionaries."""
    train = [int(t) for t in train]
    grams = {m: Counter(tuple(train[i:i + m]) for i in range(len(train) - m + 1))
             for m in range(1, order + 1)}
    cont = {m: Counter(g[1:] for g in grams[m + 1]) for m in range(1, order)}

    def a(m, g):
        return grams[m][g] if m == order else cont[m][g]

    p = 1.0 / V
    for m in range(1, order + 1):
        if len(history) < m - 1:
            break
        h = tuple(history[len(history) - (m - 1):]) if m > 1 else ()
        row = [a(m, h + (v,)) for v in range(V)]
        total = sum(row)
        if total == 0:
            continue
        types = sum(r > 0 for r in row)
        D = discounts[m - 1]
        p = (max(row[w] - D, 0) + D * types * p) / total
    return p


@SETTINGS
@given(data=corpora(), order=st.integers(1, 4), seed=st.integers(0, 1000))
def test_kneser_ney_sums_to_one(data, order, seed):
    V, train = data
    lm = KneserNey(order, V).fit(np.array(train))
    rng = np.random.default_rng(seed)
    for length in (0, 1, order + 2):
        p = lm.next_distribution(rng.integers(0, V, size=length))
        assert p.shape == (V,) and np.all(p > 0)
        np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)


@SETTINGS
@given(data=corpora(4), order=st.integers(1, 4), seed=st.integers(0, 1000))
def test_kneser_ney_matches_the_definition(data, order, seed):
    V, train = data
    lm = KneserNey(order, V).fit(np.array(train))
    rng = np.random.default_rng(seed)
    history = list(rng.integers(0, V, size=int(rng.integers(0, order + 2))))
    got = lm.next_distribution(np.array(history, np.int64))
    want = [naive_kn(train, order, V, lm.discounts, history, w) for w in range(V)]
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_discount_is_ney_estimate():
    train = np.array([0, 1, 0, 1, 2, 0, 1, 1, 2, 2, 0])
    lm = KneserNey(2, 3).fit(train)
    c = Counter(tuple(train[i:i + 2]) for i in range(len(train) - 1))
    n1, n2 = sum(v == 1 for v in c.values()), sum(v == 2 for v in c.values())
    assert lm.discounts[1] == pytest.approx(n1 / (n1 + 2 * n2))


@SETTINGS
@given(data=corpora(), order=st.integers(1, 4), seed=st.integers(0, 1000))
def test_log_probs_agree_with_next_distribution(data, order, seed):
    """Scoring a text in one vectorised pass equals asking position by position."""
    V, train = data
    rng = np.random.default_rng(seed)
    test = rng.integers(0, V, size=12)
    ctx = rng.integers(0, V, size=3)
    for lm in (KneserNey(order, V).fit(np.array(train)), AddK(order, V, 0.3).fit(np.array(train))):
        lp = lm.log_probs(test, context=ctx)
        full = np.concatenate([ctx, test])
        for t in range(len(test)):
            p = lm.next_distribution(full[: len(ctx) + t])
            assert lp[t] == pytest.approx(np.log(p[test[t]]), rel=1e-10)


@SETTINGS
@given(data=corpora(), order=st.integers(1, 4), k=st.floats(0.01, 5.0), seed=st.integers(0, 99))
def test_add_k_formula_and_normalisation(data, order, k, seed):
    V, train = data
    lm = AddK(order, V, k).fit(np.array(train))
    rng = np.random.default_rng(seed)
    h = [int(x) for x in rng.integers(0, V, size=order + 1)][len(train) % 2:]
    p = lm.next_distribution(np.array(h))
    np.testing.assert_allclose(p.sum(), 1.0, rtol=1e-12)
    ctx = tuple(h[len(h) - (order - 1):]) if order > 1 else ()
    grams = Counter(tuple(train[i:i + order]) for i in range(len(train) - order + 1))
    c_h = sum(v for g, v in grams.items() if g[:-1] == ctx)
    for w in range(V):
        assert p[w] == pytest.approx((grams[ctx + (w,)] + k) / (c_h + k * V), rel=1e-10)


def test_kneser_ney_learns_a_periodic_text():
    train = np.tile(np.arange(5), 200)
    lm = KneserNey(3, 5).fit(train)
    assert lm.bits_per_symbol(np.tile(np.arange(5), 4), context=train) < 0.1
    assert AddK(3, 5, 1.0).fit(train).bits_per_symbol(np.arange(5), context=train) < 0.1


def test_continuation_counts_favour_versatile_symbols():
    """'b' follows only 'a' (often), 'c' follows many symbols (rarely): the unigram level of KN
    ranks c above b although b is more frequent."""
    train = np.array([0, 1] * 20 + [2, 3, 4, 3, 0, 3, 1, 3, 2, 3])
    lm = KneserNey(2, 5).fit(train)
    p1 = lm.next_distribution(np.zeros(0, np.int64))  # no history: the lowest order only
    assert np.sum(train == 1) > np.sum(train == 3) and p1[3] > p1[1]


def test_ngram_keys():
    assert list(ngram_keys(np.array([1, 2, 3]), 2, 10)) == [12, 23]


def test_argument_errors():
    with pytest.raises(ValueError, match="order"):
        KneserNey(0, 5)
    with pytest.raises(ValueError, match="order"):
        KneserNey(40, 100)
    with pytest.raises(ValueError, match="vocab_size"):
        KneserNey(2, 1)
    with pytest.raises(ValueError, match="k must"):
        AddK(2, 5, k=0)
    with pytest.raises(ValueError, match="discounts"):
        KneserNey(2, 5, discounts=[0.5])
    with pytest.raises(RuntimeError, match="fit"):
        KneserNey(2, 5).log_probs(np.array([1, 2]))
    lm = KneserNey(2, 3).fit(np.array([0, 1, 2, 0]))
    with pytest.raises(ValueError, match="tokens"):
        lm.log_probs(np.array([0, 3]))
    with pytest.raises(ValueError, match="1-D"):
        lm.log_probs(np.zeros((2, 2), int))


@pytest.mark.parametrize("cls", [KneserNey, AddK])
def test_sampling_takes_the_seed_first_and_follows_next_distribution(cls):
    train = np.array([0, 1, 2, 0, 1, 2, 0, 1, 1, 2, 0, 2] * 30)
    lm = cls(3, 3).fit(train)
    a = lm.sample(4, 30, prefix=[0, 1])
    assert a.shape == (30,) and a.dtype == np.int32
    np.testing.assert_array_equal(a, lm.sample(np.random.default_rng(4), 30, prefix=[0, 1]))
    assert lm.sample(4, 10).shape == (10,)  # no prefix
    first = np.array([lm.sample(s, 1, prefix=[0, 1])[0] for s in range(3000)])
    p = lm.next_distribution(np.array([0, 1]))
    np.testing.assert_allclose(np.bincount(first, minlength=3) / 3000, p, atol=0.03)
    with pytest.raises(ValueError, match="length"):
        lm.sample(0, 0)
