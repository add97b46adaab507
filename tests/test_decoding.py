"""Decoding: the processors' exact definitions, generate's compiled loop, beam search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from arcourse import decoding as dec
from arcourse.gpt import GPT, GPTConfig
from arcourse.rnn import CharRNN

# Probabilities exact in binary: softmax(log p) gives them back exactly, and every partial sum
# is exact, so the boundaries of top-p and min-p can be tested with equality.
P = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], np.float32)
LOGITS = jnp.log(jnp.asarray(P))
# Compiled once per shape (the settings are traced): keeps the property tests quick.
top_p_mask = jax.jit(dec.top_p_mask)
top_k_mask = jax.jit(dec.top_k_mask)
min_p_filter = jax.jit(dec.min_p_filter)
repetition_penalty = jax.jit(dec.repetition_penalty)


def kept(mask):
    return np.flatnonzero(np.asarray(mask)).tolist()


# ---- top-p -----------------------------------------------------------------------------------
@pytest.mark.parametrize("p, expect", [
    (0.5, [0]),                 # the first token alone reaches 0.5 exactly
    (0.5000001, [0, 1]),        # just above: the crossing token 1 is kept
    (0.75, [0, 1]),             # 0.5 + 0.25 reaches 0.75 exactly
    (0.76, [0, 1, 2]),
    (0.875, [0, 1, 2]),
    (0.9375, [0, 1, 2, 3]),
    (0.96875, [0, 1, 2, 3, 4]),  # a tie at the end: the lower id is taken first
    (0.97, [0, 1, 2, 3, 4, 5]),
    (1e-6, [0]),                 # at least one token is always kept
    (1.0, [0, 1, 2, 3, 4, 5]),
])
def test_top_p_boundaries_are_exact(p, expect):
    assert kept(dec.top_p_mask(jnp.asarray(P), p)) == expect
    filtered = dec.top_p_filter(LOGITS, p)
    assert kept(jnp.isfinite(filtered)) == expect
    if p != 0.96875:  # (away from the tie) the order of the vocabulary does not matter
        perm = np.array([3, 0, 5, 2, 1, 4])  # position j holds token perm[j]
        got = kept(dec.top_p_mask(jnp.asarray(P[perm]), p))
        assert sorted(perm[got].tolist()) == expect


def test_top_p_tie_goes_to_lower_token_id():
    probs = jnp.asarray([0.25, 0.5, 0.25], jnp.float32)
    assert kept(dec.top_p_mask(probs, 0.6)) == [0, 1]


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 5, 12]), st.floats(0.01, 1.0), st.integers(0, 2**16))
def test_top_p_is_the_smallest_set_reaching_p(V, p, seed):
    probs = np.random.default_rng(seed).dirichlet(np.ones(V)).astype(np.float32)
    mask = np.asarray(top_p_mask(jnp.asarray(probs), p))
    mass = probs[mask].sum(dtype=np.float64)
    assert mask.any()
    # Kept tokens are the most likely ones, and dropping the least likely kept one falls below p.
    assert probs[mask].min() >= probs[~mask].max(initial=0.0)
    assert mass >= p - 1e-6 or mask.all()
    assert mass - probs[mask].min() < p + 1e-6


# ---- top-k -----------------------------------------------------------------------------------
def test_top_k_keeps_the_k_largest_and_all_ties():
    z = jnp.asarray([[1.0, 3.0, 2.0, 3.0, 0.0]])
    assert kept(dec.top_k_mask(z, 1)[0]) == [1, 3]  # a tie for first: both kept
    assert kept(dec.top_k_mask(z, 2)[0]) == [1, 3]
    assert kept(dec.top_k_mask(z, 3)[0]) == [1, 2, 3]
    assert kept(dec.top_k_mask(z, 5)[0]) == [0, 1, 2, 3, 4]
    assert kept(dec.top_k_mask(z, 99)[0]) == [0, 1, 2, 3, 4]
    out = dec.top_k_filter(z, 3)
    np.testing.assert_array_equal(out, [[-np.inf, 3.0, 2.0, 3.0, -np.inf]])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([1, 7, 20]), st.integers(1, 25), st.integers(0, 2**16))
def test_top_k_without_ties_keeps_exactly_k(V, k, seed):
    z = jnp.asarray(np.random.default_rng(seed).permutation(V).astype(np.float32))
    mask = np.asarray(top_k_mask(z, k))
    assert mask.sum() == min(k, V)
    assert np.asarray(z)[mask].min() > np.asarray(z)[~mask].max(initial=-1)


def test_top_k_traced_k_does_not_recompile():
    traces = []

    @jax.jit
    def f(z, k):
        traces.append(k)
        return dec.top_k_mask(z, k)

    z = jnp.arange(6.0)
    assert kept(f(z, 2)) == [4, 5] and kept(f(z, 4)) == [2, 3, 4, 5]
    assert len(traces) == 1


# ---- min-p -----------------------------------------------------------------------------------
@pytest.mark.parametrize("min_p, expect", [
    (0.0, [0, 1, 2, 3, 4, 5]),
    (0.0625, [0, 1, 2, 3, 4, 5]),  # 0.03125 is exactly 0.0625 * 0.5: kept (not strictly below)
    (0.07, [0, 1, 2, 3]),
    (0.25, [0, 1, 2]),             # 0.125 == 0.25 * 0.5 stays
    (0.5, [0, 1]),
    (0.6, [0]),
    (1.0, [0]),
])
def test_min_p_boundaries_are_exact(min_p, expect):
    assert kept(dec.min_p_mask(jnp.asarray(P), min_p)) == expect
    assert kept(jnp.isfinite(dec.min_p_filter(LOGITS, min_p))) == expect


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 5, 12]), st.floats(0.0, 1.0), st.integers(0, 2**16))
def test_min_p_log_space_agrees_with_probabilities(V, min_p, seed):
    z = np.random.default_rng(seed).normal(size=V).astype(np.float32) * 3
    probs = np.exp(z - z.max()) / np.exp(z - z.max()).sum()
    ratio = probs / probs.max()
    if np.min(np.abs(ratio - min_p)) < 1e-5:  # too close to the boundary for float32 to decide
        return
    want = ratio >= min_p
    np.testing.assert_array_equal(np.isfinite(min_p_filter(jnp.asarray(z), min_p)), want)


# ---- repetition penalty ----------------------------------------------------------------------
def test_repetition_penalty_divides_positive_multiplies_negative():
    z = jnp.asarray([[2.0, -2.0, 1.0, -1.0, 0.0]])
    out = dec.repetition_penalty(z, jnp.asarray([[0, 1, 1, 1, 4]]), 2.0)
    np.testing.assert_allclose(out, [[1.0, -4.0, 1.0, -1.0, 0.0]])


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 9]), st.sampled_from([1, 12]), st.floats(1.0, 5.0),
       st.integers(0, 2**16))
def test_repetition_penalty_once_per_distinct_token(V, L, theta, seed):
    rng = np.random.default_rng(seed)
    z = jnp.asarray(rng.normal(size=(2, V)).astype(np.float32))
    hist = rng.integers(0, V, size=(2, L))
    out = np.asarray(repetition_penalty(z, jnp.asarray(hist), theta))
    zn = np.asarray(z)
    for b in range(2):
        seen = set(hist[b].tolist())
        for v in range(V):
            if v not in seen:
                assert out[b, v] == zn[b, v]
            else:  # penalised once, never raised, however often v occurs
                want = zn[b, v] / theta if zn[b, v] > 0 else zn[b, v] * theta
                np.testing.assert_allclose(out[b, v], want, rtol=1e-6)
                assert out[b, v] <= zn[b, v]


# ---- temperature -----------------------------------------------------------------------------
def test_temperature_must_be_positive_and_zero_is_greedy():
    z = jnp.asarray([[0.0, 1.0, 3.0]])
    with pytest.raises(ValueError, match="temperature=0 is greedy"):
        dec.apply_temperature(z, 0.0)
    with pytest.raises(ValueError, match="temperature"):
        dec.apply_temperature(z, -1.0)
    np.testing.assert_allclose(dec.apply_temperature(z, 0.5), 2 * z)
    keys = jax.random.split(jax.random.key(0), 50)
    toks = jax.vmap(lambda k: dec.sample_token(k, z, 0.0))(keys)
    assert np.all(np.asarray(toks) == 2)
    with pytest.raises(ValueError, match="temperature"):
        dec.generate(ConstModel(z), jnp.zeros((1, 1), jnp.int32), 3, jax.random.key(0),
                     temperature=-0.1)


def test_argument_errors_name_the_argument():
    z = jnp.zeros((1, 4))
    for fn, args, name in [(dec.top_k_mask, (z, 0), "k"), (dec.top_p_mask, (z, 0.0), "p"),
                           (dec.top_p_mask, (z, 1.5), "p"), (dec.min_p_mask, (z, -0.1), "min_p"),
                           (dec.repetition_penalty, (z, jnp.zeros((1, 2), jnp.int32), 0.0),
                            "penalty"),
                           (dec.top_k_mask, (z, 2.5), "k")]:
        with pytest.raises(ValueError, match=name):
            fn(*args)
    with pytest.raises(ValueError, match="prompt"):
        dec.generate(ConstModel(z), jnp.zeros((2,), jnp.int32), 3, jax.random.key(0))
    with pytest.raises(ValueError, match="num_tokens"):
        dec.generate(ConstModel(z), jnp.zeros((1, 2), jnp.int32), 0, jax.random.key(0))


# ---- sampling matches the filtered distribution (chi-square) ---------------------------------
class ConstModel(nnx.Module):
    """A decoder whose next-token logits are always ``logits`` (V,), whatever it has read."""

    def __init__(self, logits):
        self.logits = nnx.Variable(jnp.asarray(logits, jnp.float32))

    def init_state(self, batch_size, max_len):
        return jnp.zeros((batch_size,), jnp.int32)

    def _out(self, batch_size):
        return jnp.broadcast_to(self.logits[...], (batch_size, self.logits.shape[-1]))

    def prefill(self, state, prompt):
        return self._out(prompt.shape[0]), state

    def step(self, state, tokens):
        return self._out(tokens.shape[0]), state


@pytest.mark.parametrize("kw", [
    dict(temperature=1.0),
    dict(temperature=0.7, top_k=3),
    dict(temperature=1.3, top_p=0.8),
    dict(temperature=1.0, min_p=0.1),
    dict(temperature=0.9, top_k=5, top_p=0.9, min_p=0.05),
])
def test_sample_frequencies_match_filtered_distribution(kw):
    z = jnp.asarray(np.random.default_rng(1).normal(size=8).astype(np.float32) * 1.5)
    want = np.asarray(dec.filtered_probs(z, **kw), np.float64)
    want /= want.sum()
    toks = dec.generate(ConstModel(z), jnp.zeros((4000, 1), jnp.int32), 5,
                        jax.random.key(7), **kw)
    counts = np.bincount(np.asarray(toks).ravel(), minlength=8)
    assert np.all(counts[want == 0] == 0), "a filtered-out token was sampled"
    support = want > 0
    res = stats.chisquare(counts[support], want[support] * counts.sum())
    assert res.pvalue > 1e-3, (counts, want)


def test_repetition_penalty_in_generate_uses_prompt_and_samples():
    # Two tokens with equal logits 1.0; greedy picks token 0, then the penalty turns it away.
    z = jnp.asarray([1.0, 1.0, -5.0])
    toks = dec.generate(ConstModel(z), jnp.asarray([[2]]), 3, jax.random.key(0),
                        temperature=0.0, repetition_penalty=1.5)
    assert np.asarray(toks).tolist() == [[0, 1, 0]]  # both seen: equal again, first wins
    toks = dec.generate(ConstModel(z), jnp.asarray([[0]]), 1, jax.random.key(0),
                        temperature=0.0, repetition_penalty=1.5)
    assert np.asarray(toks).tolist() == [[1]]  # token 0 is in the prompt


# ---- a tiny recurrent model for the generation tests -----------------------------------------
V, H = 3, 5


class TinyRNN(nnx.Module):
    """h_t = tanh(h_{t-1} W + E[x_t]), logits U h_t: a decoder whose prompt is read step by step."""

    def __init__(self, seed=0):
        r = np.random.default_rng(seed)
        self.E = nnx.Param(jnp.asarray(r.normal(size=(V, H)), jnp.float32))
        self.Wh = nnx.Param(jnp.asarray(r.normal(size=(H, H)) * 0.9, jnp.float32))
        self.U = nnx.Param(jnp.asarray(r.normal(size=(H, V)) * 2.0, jnp.float32))

    def init_state(self, batch_size, max_len):
        return jnp.zeros((batch_size, H))

    def prefill(self, state, prompt):
        return dec.prefill_by_steps(self, state, prompt)

    def step(self, h, tokens):
        h = jnp.tanh(h @ self.Wh[...] + self.E[...][tokens])
        return h @ self.U[...], h


def tiny_model(seed=0):
    """The model and an exact log-probability, computed one token at a time in Python."""
    model = TinyRNN(seed)

    def log_prob(prompt, seq):
        h = jnp.zeros((H,))
        for t in prompt:
            logits, h = model.step(h, jnp.asarray(t))
        total = 0.0
        for t in seq:
            total += float(jax.nn.log_softmax(logits)[t])
            logits, h = model.step(h, jnp.asarray(t))
        return total

    return model, log_prob


def test_generate_compiled_equals_python_loop_at_fixed_seed():
    model, _ = tiny_model()
    prompt = jnp.asarray([[0, 1], [2, 2]], jnp.int32)
    kw = dict(temperature=0.9, top_k=2, top_p=0.95, repetition_penalty=1.2)
    a = dec.generate(model, prompt, 40, jax.random.key(3), **kw)
    b = dec.generate_python_loop(model, prompt, 40, jax.random.key(3), **kw)
    assert a.shape == (2, 40) and a.dtype == jnp.int32
    np.testing.assert_array_equal(a, b)


TRACES = []


class CountingRNN(TinyRNN):
    def step(self, h, tokens):
        TRACES.append(1)
        return super().step(h, tokens)


def test_generate_compiles_once_for_any_settings_and_parameters():
    prompt = jnp.zeros((2, 3), jnp.int32)
    TRACES.clear()
    for kw in [dict(temperature=1.0), dict(temperature=0.0), dict(temperature=0.5, top_k=2),
               dict(top_p=0.5, min_p=0.2, repetition_penalty=1.3)]:
        dec.generate(CountingRNN(0), prompt, 10, jax.random.key(0), **kw)
    n = len(TRACES)
    dec.generate(CountingRNN(1), prompt, 10, jax.random.key(1), temperature=2.0)
    assert len(TRACES) == n and n <= 3  # eval_shape + prefill + loop body, once


PREFILLS = []


class OneGoPrefill(TinyRNN):
    def prefill(self, state, prompt):  # reads the prompt its own way, as a transformer would
        PREFILLS.append(1)
        for t in range(prompt.shape[1]):
            logits, state = self.step(state, prompt[:, t])
        return logits, state


def test_the_models_own_prefill_is_used():
    a = dec.generate(TinyRNN(0), jnp.asarray([[1, 2]]), 8, jax.random.key(0))
    b = dec.generate(OneGoPrefill(0), jnp.asarray([[1, 2]]), 8, jax.random.key(0))
    assert PREFILLS
    np.testing.assert_array_equal(a, b)


def test_a_model_without_the_interface_is_refused():
    class NoStep(nnx.Module):
        def init_state(self, batch_size, max_len):
            return jnp.zeros((batch_size,))

        def prefill(self, state, prompt):
            return jnp.zeros((prompt.shape[0], 3)), state

    with pytest.raises(TypeError, match="step"):
        dec.generate(NoStep(), jnp.zeros((1, 2), jnp.int32), 3, jax.random.key(0))
    with pytest.raises(ValueError, match="max_len"):
        dec.generate(TinyRNN(0), jnp.zeros((1, 2), jnp.int32), 3, jax.random.key(0), max_len=4)


def test_take_rows_gathers_batched_leaves_and_keeps_scalars():
    state = (jnp.arange(6).reshape(3, 2), {"n": jnp.asarray(7)})
    out = dec.take_rows(state, jnp.asarray([2, 2, 0]))
    assert out[0].tolist() == [[4, 5], [4, 5], [0, 1]] and int(out[1]["n"]) == 7


# ---- beam search -----------------------------------------------------------------------------
def test_beam_as_wide_as_all_sequences_is_exact():
    model, log_prob = tiny_model(seed=2)
    N, prompt = 4, [1, 0]
    res = dec.beam_search(model, jnp.asarray([prompt]), N, V**N)
    seqs = list(itertools.product(range(V), repeat=N))
    exact = np.array([log_prob(prompt, s) for s in seqs])
    order = np.argsort(-exact, kind="stable")
    np.testing.assert_array_equal(res.tokens[0, 0], seqs[order[0]])
    np.testing.assert_allclose(res.log_probs[0], exact[order], rtol=1e-4, atol=1e-4)
    got = {tuple(t) for t in np.asarray(res.tokens[0]).tolist()}
    assert got == set(seqs)  # every sequence exactly once


@pytest.mark.parametrize("alpha", [0.0, 1.0, 3.0])
def test_beam_with_eos_and_length_penalty_is_exact(alpha):
    model, log_prob = tiny_model(seed=4)
    N, prompt, eos = 4, [2], 0
    res = dec.beam_search(model, jnp.asarray([prompt]), N, V**N,
                          length_penalty=alpha, eos_id=eos)
    best = {}
    for s in itertools.product(range(V), repeat=N):
        s = list(s)
        if eos in s:  # everything after the first EOS is padding
            s = s[: s.index(eos) + 1]
        L = len(s)
        lp = log_prob(prompt, s)
        best[tuple(s)] = lp / ((5 + L) / 6) ** alpha
    want_seq, want = max(best.items(), key=lambda kv: kv[1])
    got = np.asarray(res.tokens[0, 0]).tolist()[: int(res.lengths[0, 0])]
    assert tuple(got) == want_seq
    np.testing.assert_allclose(float(res.scores[0, 0]), want, rtol=1e-4)


def test_greedy_equals_beam_width_one():
    model, _ = tiny_model(seed=5)
    prompt = jnp.asarray([[0], [1], [2]], jnp.int32)
    g = dec.generate(model, prompt, 12, jax.random.key(0), temperature=0.0)
    b = dec.beam_search(model, prompt, 12, 1)
    np.testing.assert_array_equal(g, b.tokens[:, 0])


def test_beam_search_never_worse_than_greedy():
    model, log_prob = tiny_model(seed=6)
    g = dec.generate(model, jnp.asarray([[0]]), 8, jax.random.key(0),
                     temperature=0.0)
    b = dec.beam_search(model, jnp.asarray([[0]]), 8, 4)
    assert float(b.log_probs[0, 0]) >= log_prob([0], np.asarray(g[0]).tolist()) - 1e-4


def test_beam_step_ranks_all_beams_together():
    lp = jnp.log(jnp.asarray([[0.6, 0.4], [0.9, 0.1]]))
    scores, parents, tokens = dec.beam_step(jnp.log(jnp.asarray([0.5, 0.5])), lp, 2)
    assert parents.tolist() == [1, 0] and tokens.tolist() == [0, 0]
    np.testing.assert_allclose(np.exp(scores), [0.45, 0.3], rtol=1e-6)


# ---- measuring samples -----------------------------------------------------------------------
def test_sequence_log_prob_matches_stepwise():
    model, log_prob = tiny_model(seed=7)

    def logits_fn(ids):
        def body(h, t):
            logits, h = model.step(h, t)
            return h, logits
        _, out = jax.lax.scan(body, jnp.zeros((ids.shape[0], H)), ids.T)
        return jnp.swapaxes(out, 0, 1)

    total, per = dec.sequence_log_prob(logits_fn, jnp.asarray([[1, 2]]), jnp.asarray([[0, 2, 1]]))
    np.testing.assert_allclose(float(total[0]), log_prob([1, 2], [0, 2, 1]), rtol=1e-5)
    assert per.shape == (1, 3)


def test_distinct_ngrams_and_repetition_period():
    assert dec.distinct_ngrams(np.array([[1, 2, 3, 4]]), 2) == 1.0
    assert dec.distinct_ngrams(np.array([[1, 1, 1, 1, 1]]), 1) == 0.2
    assert dec.distinct_ngrams(np.array([[1, 2, 1, 2, 1]]), 2) == 0.5
    assert dec.repetition_period([5, 1, 2, 3, 1, 2, 3], min_length=1) == 3
    assert dec.repetition_period([9] * 5 + [1, 2, 3] * 6) == 3  # 18 >= min_length 16
    assert dec.repetition_period([9] * 5 + [1, 2, 3] * 4) is None  # loop too short to tell
    assert dec.repetition_period([1, 2, 3, 4] * 2 + [5, 5]) is None  # a doubled letter
    assert dec.repetition_period([7] * 20) == 1


def test_distinct_ngrams_pooled_is_li_et_als_corpus_level_measure():
    """Pooled: distinct n-grams of all rows together over all tokens; n-grams never span rows."""
    same = np.array([[1, 2, 3, 4], [1, 2, 3, 4]])
    assert dec.distinct_ngrams(same, 2) == 1.0  # each row alone repeats nothing
    assert dec.distinct_ngrams(same, 2, pooled=True) == 3 / 8  # but the rows repeat each other
    # (1, 2) | (3, 4): no n-gram across the row boundary, such as (2, 3)
    assert dec.distinct_ngrams(np.array([[1, 2], [3, 4]]), 2, pooled=True) == 2 / 4
    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(5, 12))
    want = len({tuple(r[i:i + 3]) for r in x for i in range(10)}) / x.size
    assert dec.distinct_ngrams(x, 3, pooled=True) == want
    assert dec.distinct_ngrams(x[:1], 3, pooled=True) <= dec.distinct_ngrams(x[:1], 3)


def test_generate_on_a_char_rnn_matches_teacher_forcing():
    m = CharRNN(7, 8, cell="lstm", rngs=nnx.Rngs(0))
    prompt = jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
    toks = dec.generate(m, prompt, 6, jax.random.key(0))
    total, _ = dec.sequence_log_prob(m, prompt, toks)
    assert np.all(np.isfinite(np.asarray(total)))
    # Greedy through the decoding interface equals the arg max of teacher-forced logits.
    g = dec.generate(m, prompt, 5, jax.random.key(0), temperature=0.0)
    ids = jnp.concatenate([prompt, g], 1)
    np.testing.assert_array_equal(jnp.argmax(m(ids)[:, 2:-1], -1), g)


def test_beam_search_on_a_char_rnn():
    m = CharRNN(6, 8, cell="gru", rngs=nnx.Rngs(3))
    prompt = jnp.asarray([[1, 2], [3, 4]], jnp.int32)
    g = dec.generate(m, prompt, 7, jax.random.key(0), temperature=0.0)
    b1 = dec.beam_search(m, prompt, 7, 1)
    np.testing.assert_array_equal(g, b1.tokens[:, 0])
    b4 = dec.beam_search(m, prompt, 7, 4)
    total, _ = dec.sequence_log_prob(m, prompt, b4.tokens[:, 0])
    np.testing.assert_allclose(total, b4.log_probs[:, 0], rtol=1e-4)
    assert np.all(np.asarray(b4.log_probs[:, 0]) >= np.asarray(b1.log_probs[:, 0]) - 1e-5)


# ---- the same tokens as before the one decoding interface ------------------------------------
# Recorded from the code of commit 699b627 (before issue 10), run with PYTHONPATH on an export of
# that commit: CharRNN through decoding.module_step_fn, GPT through gpt.kv_cache_decoder (beam
# search with a reorder_fn that gathered the cache rows and kept its length), with the models,
# prompts and keys below. "sample": generate(..., key(7)); "filtered": generate(..., key(8),
# temperature=0.8, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3); "beam":
# beam_search(..., 8 tokens, width 3). The old rnn.sample(m, prompt, 12, key(7), temperature=0.7)
# gave "rnn_sample", now generate(m, prompt, 12, key(7), temperature=0.7).
BEFORE = {
    "rnn_lstm": {
        "sample": [[4, 8, 3, 4, 6, 0, 6, 8, 3, 4, 10, 10], [10, 10, 4, 8, 5, 8, 7, 7, 4, 10, 2, 0]],
        "filtered": [[10, 1, 9, 8, 10, 10, 9, 9, 8, 0, 10, 10], [10, 1, 1, 1, 1, 4, 7, 10, 8, 10, 10, 4]],
        "rnn_sample": [[4, 8, 3, 4, 6, 0, 6, 8, 3, 4, 10, 10], [10, 10, 4, 8, 5, 8, 7, 7, 4, 10, 2, 0]],
        "beam": [
            [[5, 5, 5, 5, 5, 5, 5, 8], [5, 5, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5, 8, 8]],
            [[7, 4, 4, 0, 0, 0, 0, 0], [7, 4, 4, 4, 4, 4, 0, 0], [7, 4, 4, 4, 4, 4, 4, 0]],
        ],
        "beam_logp": [[-17.5984, -17.6212, -17.6341], [-16.7928, -17.116, -17.1302]],
    },
    "rnn_gru": {
        "sample": [[4, 8, 3, 4, 6, 9, 6, 8, 3, 4, 10, 10], [0, 10, 4, 8, 5, 8, 7, 7, 4, 6, 2, 5]],
        "filtered": [[0, 0, 1, 10, 1, 10, 2, 9, 10, 9, 10, 10], [7, 9, 7, 9, 5, 2, 9, 10, 5, 5, 10, 4]],
        "rnn_sample": [[4, 8, 3, 4, 6, 9, 6, 8, 3, 4, 10, 10], [0, 10, 4, 8, 5, 8, 7, 7, 3, 6, 2, 0]],
        "beam": [
            [[2, 2, 2, 2, 2, 2, 2, 2], [2, 2, 2, 2, 2, 2, 2, 9], [2, 2, 2, 2, 2, 2, 2, 4]],
            [[2, 2, 2, 2, 2, 2, 2, 2], [7, 2, 2, 2, 2, 2, 2, 2], [2, 2, 2, 2, 2, 2, 2, 9]],
        ],
        "beam_logp": [[-13.7621, -14.3077, -14.4682], [-13.6242, -13.9048, -14.1975]],
    },
    "gpt_gqa": {
        "sample": [[4, 8, 3, 4, 6, 11, 6, 11, 11, 4, 10, 11], [10, 8, 2, 11, 3, 12, 5, 5, 8, 8, 8, 5]],
        "filtered": [[0, 0, 1, 6, 6, 11, 10, 7, 6, 6, 6, 11], [5, 3, 9, 10, 9, 3, 9, 10, 10, 3, 9, 3]],
        "beam": [
            [[0, 1, 9, 6, 11, 11, 11, 11], [0, 0, 0, 0, 0, 0, 9, 9], [0, 0, 0, 0, 0, 0, 1, 9]],
            [[5, 8, 10, 3, 9, 3, 10, 7], [5, 8, 10, 3, 9, 9, 3, 10], [5, 8, 10, 3, 9, 3, 10, 10]],
        ],
        "beam_logp": [[-10.3712, -10.4829, -10.717], [-11.2637, -11.34, -11.3886]],
    },
    "gpt_gpt2": {
        "sample": [[4, 8, 3, 5, 12, 8, 10, 8, 8, 4, 10, 10], [8, 8, 0, 6, 7, 12, 6, 8, 1, 8, 9, 1]],
        "filtered": [[10, 10, 12, 5, 1, 10, 10, 8, 10, 6, 5, 5], [8, 5, 5, 1, 12, 12, 5, 2, 5, 1, 8, 5]],
        "beam": [
            [[10, 5, 5, 5, 5, 5, 5, 5], [5, 5, 5, 5, 5, 5, 5, 5], [10, 5, 5, 5, 5, 5, 5, 2]],
            [[8, 5, 6, 8, 5, 6, 1, 8], [8, 8, 5, 1, 1, 1, 1, 1], [8, 8, 5, 1, 1, 1, 1, 8]],
        ],
        "beam_logp": [[-8.396, -8.587, -9.7185], [-11.3649, -11.4318, -11.4891]],
    },
}


def _before_model(name):
    if name.startswith("rnn"):
        return CharRNN(11, 16, cell=name.split("_")[1], rngs=nnx.Rngs(0)), \
            jnp.asarray([[1, 2, 3], [4, 5, 6]], jnp.int32)
    kw = dict(num_kv_heads=2) if name == "gpt_gqa" else dict(position="learned", norm="layer",
                                                             mlp="gelu")
    cfg = GPTConfig(vocab_size=13, context=24, dim=32, num_layers=2, num_heads=4, **kw)
    return GPT(cfg, rngs=nnx.Rngs(0)), jnp.asarray([[1, 2, 3, 4], [5, 6, 7, 8]], jnp.int32)


@pytest.mark.parametrize("name", ["rnn_lstm", "rnn_gru", "gpt_gqa", "gpt_gpt2"])
def test_generate_and_beam_search_give_the_tokens_of_before(name):
    model, prompt = _before_model(name)
    want = BEFORE[name]
    got = dec.generate(model, prompt, 12, jax.random.key(7))
    np.testing.assert_array_equal(got, want["sample"])
    got = dec.generate(model, prompt, 12, jax.random.key(8), temperature=0.8, top_k=5, top_p=0.9,
                       min_p=0.05, repetition_penalty=1.3)
    np.testing.assert_array_equal(got, want["filtered"])
    if "rnn_sample" in want:
        got = dec.generate(model, prompt, 12, jax.random.key(7), temperature=0.7)
        np.testing.assert_array_equal(got, want["rnn_sample"])
    beams = dec.beam_search(model, prompt, 8, 3)
    np.testing.assert_array_equal(beams.tokens, want["beam"])
    np.testing.assert_allclose(beams.log_probs, want["beam_logp"], rtol=0, atol=1e-4)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([3, 8]), st.integers(1, 9), st.floats(0.05, 1.0), st.integers(0, 2**16))
def test_pairwise_and_sorting_algorithms_agree(V, k, p, seed):
    rng = np.random.default_rng(seed)
    # Rounded logits so that ties occur; probabilities that are exact in binary.
    z = jnp.asarray(np.round(rng.normal(size=(2, V)) * 2) / 2, jnp.float32)
    probs = jnp.asarray(rng.multinomial(64, np.ones(V) / V, size=2) / 64, jnp.float32)
    pair_k, pair_p = top_k_mask(z, k), top_p_mask(probs, p)
    old = dec.PAIRWISE_MAX_V
    try:
        dec.PAIRWISE_MAX_V = 0
        # (eagerly: a jitted function would reuse its trace of the pairwise branch)
        np.testing.assert_array_equal(pair_k, dec.top_k_mask(z, k))
        np.testing.assert_array_equal(pair_p, dec.top_p_mask(probs, p))
    finally:
        dec.PAIRWISE_MAX_V = old


# ---- the panel -------------------------------------------------------------------------------
def test_decoding_panel_live_and_static(monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    from arcourse.course import widgets

    chars = "abcdef"
    z = jnp.asarray([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    calls = []

    def sample_fn(settings, seed):
        calls.append((settings, seed))
        return [f"sample {seed}"]

    panel = widgets.decoding_panel(z, chars, sample_fn, prompt="x", live=True)
    assert panel.samples == ["sample 1"] and calls[-1][0]["top_k"] is None
    panel.top_k.value = 2  # moving a slider redraws and draws fresh samples
    assert panel.redraws == 2 and panel.samples == ["sample 2"]
    assert calls[-1][0]["top_k"] == 2
    panel.temperature.value = 0.0
    assert calls[-1][0]["temperature"] == 0.0 and panel.redraws == 3
    fig = widgets.decoding_panel(z, chars, sample_fn, prompt="x", live=False)
    assert len(fig.axes) == 6
    monkeypatch.setenv("ARCOURSE_WIDGETS", "static")
    assert not widgets.live_widgets()


def test_plot_filtered_shows_the_kept_tokens():
    import matplotlib

    matplotlib.use("Agg")
    from arcourse.course import widgets

    ax = widgets.plot_filtered(jnp.log(jnp.asarray(P)), "abcdef", {"top_p": 0.75})
    assert "2 token(s) kept" in ax.get_title()
    with pytest.raises(ValueError, match="chars"):
        widgets.plot_filtered(LOGITS, "abc", {})
