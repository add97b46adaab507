"""arcourse.wavenet: mu-law pinned at its boundaries and invertible to within a bin; the dilated
causal convolution and the WaveNet are causal with exactly R inputs per output (by Jacobian);
fast generation with queues gives the naive decoder's logits and samples; the synthetic audio."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import causality, counting, data, decoding
from arcourse import wavenet as wn


# --------------------------------------------------------------------------------------------
# mu-law
# --------------------------------------------------------------------------------------------
def test_mu_law_boundaries():
    q = wn.mu_law_encode(jnp.array([-1.0, 0.0, 1.0]))
    assert q.dtype == jnp.int32
    assert q.tolist() == [0, 128, 255]
    # clipped outside [-1, 1]
    assert wn.mu_law_encode(jnp.array([-7.0, 3.0])).tolist() == [0, 255]
    np.testing.assert_allclose(wn.mu_law_decode(jnp.array([0, 255])), [-1.0, 1.0], atol=1e-6)


def test_decode_then_encode_is_the_identity_on_levels():
    q = jnp.arange(256)
    assert (wn.mu_law_encode(wn.mu_law_decode(q)) == q).all()
    assert (jnp.diff(wn.mu_law_decode(q)) > 0).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1.0, 1.0, allow_nan=False, width=32), min_size=16, max_size=16))
def test_round_trip_within_one_bin(xs):
    x = jnp.asarray(xs, jnp.float32)
    q = wn.mu_law_encode(x)
    assert ((q >= 0) & (q <= 255)).all()
    back = wn.mu_law_decode(q)
    # in the compressed domain the bins have width 2/255: x is within half a bin of its centre
    err = jnp.abs(wn.mu_law_compress(x) - wn.mu_law_compress(back))
    assert float(err.max()) <= 1 / 255 + 1e-6
    # and x lies between the centres of the neighbouring levels
    lo = wn.mu_law_decode(jnp.maximum(q - 1, 0))
    hi = wn.mu_law_decode(jnp.minimum(q + 1, 255))
    assert bool(((lo <= x + 1e-7) & (x <= hi + 1e-7)).all())


def test_mu_law_is_monotone_and_finer_near_zero():
    x = jnp.sort(jnp.concatenate([jnp.linspace(-1, 1, 100_001), jnp.zeros(1)]))
    q = wn.mu_law_encode(x)
    assert (jnp.diff(q) >= 0).all() and set(np.unique(q).tolist()) == set(range(256))
    width = jnp.diff(wn.mu_law_decode(jnp.arange(256)))
    assert float(width[127]) < float(width[0]) / 100


def test_mu_law_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mu"):
        wn.mu_law_encode(jnp.zeros(3), mu=0)
    with pytest.raises(ValueError, match="integer levels"):
        wn.mu_law_decode(jnp.zeros(3))


# --------------------------------------------------------------------------------------------
# Dilated causal convolutions
# --------------------------------------------------------------------------------------------
def _loop_conv(x, w, d):
    T, k = x.shape[0], w.shape[0]
    y = np.zeros((T, w.shape[2]))
    for t in range(T):
        for i in range(k):
            s = t - (k - 1 - i) * d
            if s >= 0:
                y[t] += x[s] @ w[i]
    return y


@settings(max_examples=12, deadline=None)
@given(k=st.integers(1, 4), d=st.integers(1, 9), T=st.integers(1, 30), seed=st.integers(0, 99))
def test_causal_conv_is_the_definition(k, d, T, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(T, 3)).astype(np.float32)
    w = rng.normal(size=(k, 3, 2)).astype(np.float32)
    np.testing.assert_allclose(wn.causal_conv(x, w, d), _loop_conv(x, w, d), rtol=1e-4, atol=1e-4)
    # batched, and equal to XLA's dilated convolution padded on the left only
    xb = jnp.stack([x, 2 * x])
    y = wn.causal_conv(xb, w, d)
    lax = jax.lax.conv_general_dilated(jnp.moveaxis(xb, -1, 1), jnp.transpose(w, (2, 1, 0)), (1,),
                                       [((k - 1) * d, 0)], rhs_dilation=(d,))
    np.testing.assert_allclose(y, jnp.moveaxis(lax, 1, -1), rtol=1e-4, atol=1e-4)


def _conv_dependencies(conv, T=32, k=2, d=3):
    w = jax.random.normal(jax.random.key(0), (k, 2, 2))
    x = jax.random.normal(jax.random.key(1), (T, 2))
    return causality.dependency_map(lambda v: conv(v, w, d), x)


def test_causal_conv_reads_exactly_its_taps_and_same_padding_leaks_the_future():
    D = _conv_dependencies(wn.causal_conv)
    for i in range(D.shape[0]):
        assert set(np.flatnonzero(D[i])) == {j for j in (i - 3, i) if j >= 0}
    assert causality.is_causal(D, strict=False)
    D_same = _conv_dependencies(wn.same_conv)
    assert not causality.is_causal(D_same, strict=False)
    assert set(np.flatnonzero(D_same[10])) == {9, 12}  # d=3, k=2: padding 1 left, 2 right


@pytest.mark.parametrize("k, dilations", [(2, (1, 2, 4, 8)), (3, (1, 2)), (2, (1, 1, 2, 5))])
def test_receptive_field_formula(k, dilations):
    assert wn.receptive_field(dilations, k) == (k - 1) * sum(dilations) + 1
    with pytest.raises(ValueError):
        wn.receptive_field((), 2)
    with pytest.raises(ValueError):
        wn.receptive_field((1, 0), 2)


# --------------------------------------------------------------------------------------------
# The model: causal, exactly R inputs per output
# --------------------------------------------------------------------------------------------
def _model(k=2, dilations=(1, 2, 4, 8), classes=3, seed=0):
    cfg = wn.WaveNetConfig(dilations=dilations, kernel_size=k, residual=8, skip=12,
                           num_classes=classes)
    return wn.WaveNet(cfg, rngs=nnx.Rngs(seed))


@pytest.mark.parametrize("k, dilations", [(2, (1, 2, 4, 8)), (3, (1, 3))])
def test_wavenet_is_causal_with_receptive_field_R_by_jacobian(k, dilations):
    model = _model(k, dilations)
    R = model.receptive_field
    T = R + 12
    h = model.embed(jax.random.randint(jax.random.key(2), (1, T), 0, 256))[0]
    D = causality.dependency_map(lambda e: model.from_embeddings(e[None], jnp.array([1]))[0], h)
    for i in range(T):
        assert set(np.flatnonzero(D[i])) == set(range(max(0, i - R + 1), i + 1)), i
    assert causality.is_causal(D, strict=False)


def test_teacher_forced_logits_shape_and_label_check():
    model = _model()
    x = jnp.zeros((2, 7), jnp.int32)
    assert model(x, jnp.array([0, 2])).shape == (2, 7, 256)
    assert model(x).shape == (2, 7, 256)  # no label: the extra "unknown" row
    with pytest.raises(ValueError, match="labels"):
        model(x, jnp.array([0, 1, 2]))
    with pytest.raises(ValueError, match="tokens"):
        model(jnp.zeros((7,), jnp.int32))


# --------------------------------------------------------------------------------------------
# Fast generation: the queues
# --------------------------------------------------------------------------------------------
def test_queue_step_returns_the_input_of_d_steps_ago():
    B, d, C = 2, 3, 4
    q = jnp.zeros((B, d, C))
    xs = jax.random.normal(jax.random.key(0), (10, B, C))
    for t in range(10):
        past, q = wn.queue_step(q, t, xs[t])
        np.testing.assert_array_equal(past, xs[t - d] if t >= d else jnp.zeros((B, C)))


@pytest.mark.parametrize("k, dilations, classes", [(2, (1, 2, 4, 8), 3), (3, (1, 3), 0)])
def test_fast_and_naive_steps_give_the_teacher_forced_logits(k, dilations, classes):
    model = _model(k, dilations, classes)
    R = model.receptive_field
    T = R + 9  # past the point where the naive window is full
    x = jax.random.randint(jax.random.key(3), (2, T), 0, 256)
    labels = jnp.array([2, 0]) if classes else None
    full = model(x, labels)
    for dec in (model, wn.NaiveWaveNet(model)):
        state = dec.init_state(2, T, labels=labels)
        logits, state = dec.prefill(state, x[:, :5])
        got = [logits]
        step = jax.jit(dec.step)
        for t in range(5, T):
            logits, state = step(state, x[:, t])
            got.append(logits)
        np.testing.assert_allclose(jnp.stack(got, 1), full[:, 4:], rtol=1e-5, atol=1e-5)


def test_fast_generation_gives_the_naive_samples_for_the_same_key():
    model = _model()
    labels = jnp.array([0, 1, 2])
    prompt = jnp.full((3, 2), 128, jnp.int32)
    key = jax.random.key(7)
    fast = decoding.generate(wn.conditioned(model, labels), prompt, 80, key)
    naive = decoding.generate(wn.conditioned(wn.NaiveWaveNet(model), labels), prompt, 80, key)
    assert fast.shape == (3, 80)
    np.testing.assert_array_equal(fast, naive)
    # unconditional too, and the state does not grow with max_len
    fast = decoding.generate(model, prompt, 40, key, temperature=0.7)
    naive = decoding.generate(wn.NaiveWaveNet(model), prompt, 40, key, temperature=0.7)
    np.testing.assert_array_equal(fast, naive)
    small, big = model.init_state(1, 10), model.init_state(1, 10_000)
    assert jax.tree.map(jnp.shape, small) == jax.tree.map(jnp.shape, big)


def test_sample_draws_what_generate_draws_and_checks_arguments():
    model = _model()
    cond = wn.conditioned(model, jnp.array([2, 0]))
    prompt = jnp.full((2, 1), 128, jnp.int32)
    key = jax.random.key(11)
    np.testing.assert_array_equal(wn.sample(key, cond, prompt, 30),
                                  decoding.generate(cond, prompt, 30, key))
    with pytest.raises(ValueError, match="prompt"):
        wn.sample(key, cond, jnp.zeros((2,), jnp.int32), 5)
    with pytest.raises(ValueError, match="temperature"):
        wn.sample(key, cond, prompt, 5, temperature=0.0)


def test_conditioned_checks_its_labels():
    with pytest.raises(ValueError, match="without conditioning"):
        wn.conditioned(_model(classes=0), jnp.array([0]))
    with pytest.raises(ValueError, match="labels must lie"):
        wn.conditioned(_model(classes=3), jnp.array([4]))
    with pytest.raises(ValueError, match="batch_size"):
        wn.conditioned(_model(classes=3), jnp.array([1, 2])).init_state(3, 5)


def test_config_checks():
    with pytest.raises(ValueError, match="kernel_size"):
        wn.WaveNetConfig(kernel_size=1)
    with pytest.raises(ValueError, match="dilation"):
        wn.WaveNetConfig(dilations=(1, 0))
    with pytest.raises(ValueError, match="dilations"):
        wn.WaveNetConfig(dilations=())
    assert wn.WaveNetConfig().receptive_field == 1024


# --------------------------------------------------------------------------------------------
# Training helpers and baselines
# --------------------------------------------------------------------------------------------
def test_random_crops_are_shifted_windows_with_labels():
    levels = jnp.arange(5 * 50).reshape(5, 50) % 256
    notes = jnp.arange(5)
    x, y, lab = wn.random_crops(jax.random.key(0), levels, notes, 16, 10, drop_label=0.5,
                                num_classes=5)
    assert x.shape == y.shape == (16, 10) and lab.shape == (16,)
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    rows = np.asarray(x[:, 0]) // 50
    assert all(int(l) in (int(r), 5) for l, r in zip(lab, rows))
    assert 5 in np.asarray(lab).tolist()


def test_count_model_matches_ngram_counts_and_beats_the_marginal():
    rng = np.random.default_rng(0)
    src = data.MarkovSource.random(order=1, vocab_size=6, seed=1)
    train = np.stack([src.sample(s, 200) for s in range(5)])
    test = np.stack([src.sample(s, 200) for s in range(5, 7)])
    model = counting.NGramCounts(order=1, vocab_size=6, alpha=0.5).fit(train.ravel())
    # NGramCounts counts across clip boundaries: recount per clip for an exact comparison
    counts = sum(counting.count_transitions(c, 1, 6) for c in train)
    table = np.log(counting.smoothed_conditional(counts, 0.5))
    want = -np.mean([table[c[:-1], c[1:]] for c in test]) / np.log(2)
    assert wn.count_model_bits(train, test, 1, 0.5, levels=6) == pytest.approx(want, rel=1e-9)
    assert model.order == 1 and rng is not None
    assert wn.count_model_bits(train, test, 1, 0.5, levels=6) < wn.marginal_bits(train, test, 6)


# --------------------------------------------------------------------------------------------
# The synthetic audio
# --------------------------------------------------------------------------------------------
def test_audio_clips_are_seeded_labelled_and_bounded():
    a = data.audio_clips(num_train=6, num_test=3, num_samples=400, seed=0)
    b = data.audio_clips(num_train=6, num_test=3, num_samples=400, seed=0)
    c = data.audio_clips(num_train=6, num_test=3, num_samples=400, seed=1)
    assert a.train.shape == (6, 400) and a.test.shape == (3, 400) and a.train.dtype == np.float32
    np.testing.assert_array_equal(a.train, b.train)
    assert not np.array_equal(a.train, c.train)
    assert np.abs(a.train).max() <= 1.0 and a.train_notes.max() < a.num_notes
    assert a.sample_rate == 4000


def test_a_note_has_its_pitch():
    note = 4  # A4, 440 Hz
    s = data.synth_note(note, 4000, decay=10.0)
    spectrum = np.abs(np.fft.rfft(s))
    freqs = np.fft.rfftfreq(4000, 1 / 4000)
    assert abs(freqs[np.argmax(spectrum)] - 440.0) < 2.0
    assert data.synth_melody([0, 1, 2], note_samples=100).shape == (300,)
    with pytest.raises(ValueError, match="note"):
        data.synth_note(8, 10)
