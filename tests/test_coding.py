"""Arithmetic coding (chapter 13): exact round trips on random sequences and models, the size
within 1% of the ideal code length, and every predictor's encoder and decoder rows agreeing bit
for bit."""

import math

import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import coding, counting, data, gpt, kneser_ney


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 300), st.integers(0, 300), st.floats(0.02, 5.0), st.integers(0, 2**31))
def test_round_trip_random_sequences_and_models(V, N, concentration, seed):
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(V, concentration), size=N) if N else np.zeros((0, V))
    x = np.array([rng.choice(V, p=row) for row in p], np.int64)
    # sometimes code a symbol the model thought nearly impossible
    if N:
        i = rng.integers(N)
        x[i] = int(np.argmin(p[i]))
    f = coding.quantise(p)
    code = coding.encode(x, f)
    assert coding.decode(code, N, lambda prefix: f[len(prefix)]).tolist() == x.tolist()
    ideal = coding.code_length(p, x) if N else 0.0
    assert 8 * len(code) <= ideal + 0.01 * ideal + 16  # quantisation + 2 bits + a byte of padding


def test_rare_symbols_stay_encodable():
    p = np.tile([1 - 3e-12, 1e-12, 1e-12, 1e-12], (50, 1))
    x = np.array([1, 2, 3, 0] * 12 + [3, 3])
    f = coding.quantise(p)
    assert f.min() >= 1
    code = coding.encode(x, f)
    assert coding.decode(code, len(x), lambda prefix: f[len(prefix)]).tolist() == x.tolist()


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 50))
def test_narrow_splits_the_interval_into_the_symbols_slices(seed, V):
    rng = np.random.default_rng(seed)
    low = int(rng.integers(0, 1 << 31))
    high = low + int(rng.integers(1 << 30, 1 << 31))
    f = coding.quantise(rng.dirichlet(np.ones(V)), total=1 << 16)
    cum = np.concatenate([[0], np.cumsum(f)]).tolist()
    pieces = [coding.narrow(low, high, cum[s], cum[s + 1], cum[-1]) for s in range(V)]
    assert pieces[0][0] == low and pieces[-1][1] == high
    assert all(a[1] + 1 == b[0] for a, b in zip(pieces, pieces[1:]))  # contiguous, no overlap
    assert all(hi >= lo for lo, hi in pieces)  # every symbol keeps a non-empty slice


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 200), st.integers(0, 2**31), st.sampled_from([1 << 10, 1 << 16, 1 << 24]))
def test_quantise_keeps_every_symbol_and_the_total(V, seed, total):
    p = np.random.default_rng(seed).dirichlet(np.full(V, 0.1), size=5)
    if V + 1 > total:
        return
    f = coding.quantise(p, total)
    assert f.dtype == np.int64 and f.min() >= 1
    assert np.all(f.sum(-1) <= total) and np.all(f.sum(-1) >= total - V)


def test_code_length_is_bits():
    assert coding.code_length(np.full((8, 4), 0.25), np.arange(8) % 4) == pytest.approx(16.0)


def _rows_agree(pred, x):
    """all_probs (the encoder's rows) equals next_probs (the decoder's), bit for bit."""
    P = pred.all_probs(x)
    for t in range(len(x) + 1 if len(x) < 40 else 40):
        if t < len(x):
            assert np.array_equal(P[t], pred.next_probs(list(x[:t]))), f"row {t}"
    return P


def test_markov_source_rows_and_the_entropy_rate():
    src = data.MarkovSource.random(order=2, vocab_size=4, concentration=0.5, seed=0)
    pred = coding.MarkovPredictor(src)
    x = src.sample(1, 20_000)
    P = _rows_agree(pred, x)
    assert np.log(P[np.arange(len(x)), x]).sum() == pytest.approx(src.log_prob(x), rel=1e-9)
    code = coding.compress(pred, x, probs=P)
    assert np.array_equal(coding.decompress(pred, code, limit=3000), x[:3000])
    bits = 8 * (len(code) - 4) / len(x)
    assert abs(bits - src.entropy_rate() / math.log(2)) < 0.03


def test_count_model_round_trip():
    src = data.MarkovSource.random(order=2, vocab_size=5, concentration=0.5, seed=3)
    model = counting.NGramCounts(order=2, vocab_size=5, alpha=0.5).fit(src.sample(0, 5000))
    pred = coding.CountPredictor(model)
    x = src.sample(1, 2000)
    P = _rows_agree(pred, x)
    assert np.log(P[np.arange(len(x)), x]).sum() == pytest.approx(model.log_prob(x), rel=1e-9)
    code = coding.compress(pred, x)
    assert np.array_equal(coding.decompress(pred, code), x)


@pytest.fixture(scope="module")
def corpus():
    return data.char_corpus()


def test_kneser_ney_within_one_percent_of_the_ideal_on_held_out_text(corpus):
    model = kneser_ney.KneserNey(5, corpus.vocab_size).fit(corpus.train)
    pred = coding.KneserNeyPredictor(model, context=corpus.train)
    x = corpus.valid[:8000]
    P = _rows_agree(pred, x)
    assert np.allclose(np.log(P[np.arange(len(x)), x]), model.log_probs(x, context=corpus.train))
    code = coding.compress(pred, x, probs=P)
    ideal = coding.code_length(P, x)
    assert 8 * len(code) <= 1.01 * ideal + 64
    assert np.array_equal(coding.decompress(pred, code, limit=400), x[:400])


def test_neural_predictor_round_trip(corpus):
    cfg = gpt.GPTConfig(vocab_size=corpus.vocab_size, context=16, dim=32, num_layers=1,
                        num_heads=2)
    model = gpt.GPT(cfg, rngs=nnx.Rngs(0))
    pred = coding.NeuralPredictor(model, window=16)
    x = corpus.valid[:150]
    P = _rows_agree(pred, x)
    assert np.allclose(P.sum(-1), 1.0, atol=1e-5)
    code = coding.compress(pred, x, probs=P)
    assert 8 * len(code) <= 1.01 * coding.code_length(P, x) + 64
    assert np.array_equal(coding.decompress(pred, code), x)


def test_empty_and_invalid_inputs():
    assert coding.decode(coding.encode(np.zeros(0, np.int64), np.ones((0, 3), np.int64)), 0,
                         lambda p: np.ones(3)).size == 0
    with pytest.raises(ValueError, match=">= 1"):
        coding.encode([0, 1], np.array([[1, 0], [1, 1]]))
    with pytest.raises(ValueError, match="must lie in"):
        coding.encode([0, 2], np.ones((2, 2), np.int64))
    with pytest.raises(ValueError, match="total"):
        coding.quantise(np.full(4, 0.25), total=4)
    with pytest.raises(ValueError, match="non-negative"):
        coding.quantise(np.array([0.5, -0.1]))
