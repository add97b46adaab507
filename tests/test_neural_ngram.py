"""The neural n-gram model: what each position sees, free-running sampling, and that it learns."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import neural_ngram as ng
from arcourse.data import MarkovSource, random_windows
from arcourse.losses import make_optimizer, next_token_loss
from arcourse.train import fit

V = 5
MODELS = {n: ng.NeuralNGram(V, n, 4, 16, rngs=nnx.Rngs(n)) for n in (1, 2, 4)}


@nnx.jit
def _apply(model, tokens):
    return model(tokens)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 5), st.integers(1, 9), st.integers(0, 2**16))
def test_context_windows_hold_the_n_previous_symbols_left_padded(n, T, seed):
    x = np.random.default_rng(seed).integers(0, V, (2, T))
    win = np.asarray(ng.context_windows(x, n, V))
    assert win.shape == (2, T, n)
    for t in range(T):
        for j in range(n):
            s = t - n + 1 + j
            np.testing.assert_array_equal(win[:, t, j], x[:, s] if s >= 0 else V)


@settings(max_examples=25, deadline=None)
@given(st.sampled_from([1, 2, 4]), st.integers(0, 11), st.integers(0, 2**16))
def test_position_t_depends_on_exactly_tokens_t_minus_n_plus_1_to_t(n, s, seed):
    """Changing token s changes the logits at positions s..s+n-1 and nowhere else: no position
    sees the future (causality), and none sees further back than its context."""
    model, T = MODELS[n], 12
    x = np.random.default_rng(seed).integers(0, V, (1, T)).astype(np.int32)
    y = x.copy()
    y[0, s] = (y[0, s] + 1) % V
    diff = np.abs(np.asarray(_apply(model, jnp.asarray(x)) - _apply(model, jnp.asarray(y))))
    changed = diff.max(-1)[0] > 0
    want = np.zeros(T, bool)
    want[s : s + n] = True
    np.testing.assert_array_equal(changed, want)


def test_output_shapes_and_next_logits_agree():
    model = MODELS[4]
    x = jnp.asarray(np.random.default_rng(0).integers(0, V, (3, 7)), jnp.int32)
    logits = model(x)
    assert logits.shape == (3, 7, V) and logits.dtype == jnp.float32
    win = ng.context_windows(x, 4, model.pad_id)
    np.testing.assert_allclose(np.asarray(model.next_logits(win[:, 5])), np.asarray(logits[:, 5]),
                               rtol=1e-5, atol=1e-6)


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="vocab_size"):
        ng.NeuralNGram(1, 2, 4, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="context"):
        ng.NeuralNGram(4, 0, 4, 8, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden_size"):
        ng.NeuralNGram(4, 2, 4, 2.5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens"):
        MODELS[2](jnp.zeros((2, 3)))
    with pytest.raises(ValueError, match="tokens"):
        MODELS[2](jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="window"):
        MODELS[2].next_logits(jnp.zeros((3, 4), jnp.int32))
    with pytest.raises(ValueError, match="temperature"):
        ng.sample(jax.random.key(0), MODELS[2], 2, 3, temperature=0.0)


def test_free_running_log_probs_are_the_teacher_forced_ones_and_it_compiles_once():
    """The model's log-probability of what it drew equals its teacher-forced log-probability
    of the same sequence: generation and scoring are the same model."""
    model = MODELS[4]
    x, lp = ng.sample(jax.random.key(3), model, 6, 20)
    assert x.shape == lp.shape == (6, 20) and x.dtype == jnp.int32
    assert int(x.min()) >= 0 and int(x.max()) < V
    first = jax.nn.log_softmax(model.next_logits(jnp.full((1, 4), model.pad_id)))[0]
    tf = jax.nn.log_softmax(model(x), axis=-1)
    want = np.concatenate([np.asarray(first)[np.asarray(x[:, :1])],
                           np.take_along_axis(np.asarray(tf[:, :-1]), np.asarray(x[:, 1:, None]),
                                              -1)[..., 0]], axis=1)
    np.testing.assert_allclose(np.asarray(lp), want, rtol=1e-5, atol=1e-5)
    before = ng._sample._cache_size()
    ng.sample(jax.random.key(4), model, 6, 20, temperature=0.7)  # a new temperature: no retrace
    assert ng._sample._cache_size() == before


def test_low_temperature_sampling_is_greedy():
    model = MODELS[2]
    x, _ = ng.sample(jax.random.key(0), model, 3, 10, temperature=1e-4)
    greedy = jnp.argmax(model(x), axis=-1)
    np.testing.assert_array_equal(np.asarray(x[:, 1:]), np.asarray(greedy[:, :-1]))


def test_it_learns_a_markov_source_down_to_its_entropy_rate():
    src = MarkovSource.random(order=2, vocab_size=3, concentration=0.5, seed=0)
    train = jnp.asarray(src.sample(1, 20_000))
    valid = src.sample(2, 4_000)
    model = ng.NeuralNGram(3, 2, 8, 32, rngs=nnx.Rngs(0))

    def eval_fn(m):
        lp = jax.nn.log_softmax(m(jnp.asarray(valid)[None])[0, 1:-1])
        return {"nll": -jnp.mean(jnp.take_along_axis(lp, jnp.asarray(valid)[2:, None], -1))}

    fit(model, make_optimizer(1e-2, 300, warmup_steps=30), lambda m, b: next_token_loss(m(b), b),
        lambda k: random_windows(k, train, 32, 32)[0], steps=300, eval_fn=eval_fn,
        eval_every=100, select_on="nll", progress=False, verbose=False)
    nll = float(eval_fn(model)["nll"])
    true = -float(np.mean(src.conditional_log_probs(valid)))
    assert nll - true < 0.03, (nll, true)


# ---- the model as a Markov chain: exact context distributions ------------------------------
@settings(max_examples=20, deadline=None)
@given(st.integers(2, 4), st.integers(1, 4), st.integers(0, 2**16))
def test_all_contexts_are_numbered_like_the_markov_source(vocab, n, seed):
    """Row i of all_contexts is the context MarkovSource numbers i (oldest symbol first)."""
    ctx = ng.all_contexts(vocab, n)
    assert ctx.shape == (vocab**n, n) and len({tuple(r) for r in ctx}) == vocab**n
    src = MarkovSource.random(order=n, vocab_size=vocab, seed=seed % 100)
    seq = src.sample(seed, 40)
    ids = src.context_ids(seq)
    for t, i in enumerate(ids):
        np.testing.assert_array_equal(ctx[i], seq[t : t + n])


def test_transition_table_is_the_model_on_every_context():
    model = MODELS[2]
    table = ng.transition_table(model)
    assert table.shape == (V**2, V)
    np.testing.assert_allclose(table.sum(1), 1.0, atol=1e-12)
    ctx = ng.all_contexts(V, 2)
    logits = model(jnp.asarray(ctx))[:, -1]  # the last position sees the whole (unpadded) window
    np.testing.assert_allclose(table, np.asarray(jax.nn.softmax(logits, -1)), rtol=1e-5, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(st.integers(2, 3), st.integers(1, 2), st.integers(0, 2), st.integers(0, 2**16))
def test_stationary_contexts_of_a_source_extend_its_stationary_law(vocab, k, extra, seed):
    """Read as a chain over windows of n >= k symbols, a source visits them in its own stationary
    law: the window distribution is a fixed point of context_step, and its marginal over the
    last k symbols is MarkovSource.stationary."""
    src = MarkovSource.random(order=k, vocab_size=vocab, seed=seed)
    n = k + extra
    table = src.transitions[np.arange(vocab**n) % vocab**k]
    pi = ng.stationary_contexts(table)
    assert abs(pi.sum() - 1) < 1e-12 and pi.min() >= 0
    np.testing.assert_allclose(ng.context_step(pi, table), pi, atol=1e-11)
    np.testing.assert_allclose(pi.reshape(vocab**extra, vocab**k).sum(0), src.stationary,
                               atol=1e-8)


def test_context_step_is_one_generated_symbol():
    """From a point mass on one window, one step puts the table's row on the shifted windows."""
    src = MarkovSource.random(order=2, vocab_size=3, seed=1)
    table = src.transitions
    d = np.zeros(9)
    d[5] = 1.0  # the window (1, 2)
    new = ng.context_step(d, table)
    want = np.zeros(9)
    want[[6, 7, 8]] = table[5]  # the windows (2, x)
    np.testing.assert_allclose(new, want)


def test_kl_rows_and_the_teacher_forced_gap():
    """KL(p || q) >= 0 with equality at q = p, and under the source's own windows its average is
    exactly the model's cross-entropy rate minus the entropy rate (what teacher forcing sees)."""
    src = MarkovSource.random(order=2, vocab_size=V, seed=3)
    model = MODELS[2]
    q, p = ng.transition_table(model), src.transitions
    kl = ng.kl_rows(p, q)
    assert kl.shape == (V**2,) and kl.min() >= 0
    np.testing.assert_allclose(ng.kl_rows(p, p), 0.0, atol=1e-12)
    pi = ng.stationary_contexts(p)
    cross = -np.sum(pi[:, None] * p * np.log(q))
    np.testing.assert_allclose(pi @ kl, cross - src.entropy_rate(), rtol=1e-9)
    with pytest.raises(ValueError, match="power"):
        ng.context_step(np.ones(5) / 5, np.ones((5, 3)) / 3)
