"""arcourse.gpt: the cached decoder gives the logits of the parallel pass, the model is causal,
the cache holds what the formula says, and the decoders plug into decoding.generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import causality, decoding
from arcourse.attention import kv_cache_bytes_per_token
from arcourse.gpt import (
    GPT,
    CroppedGPT,
    GPTConfig,
    UncachedGPT,
    copy_task,
    induction_task,
    num_params,
)
from arcourse.losses import lm_loss
from arcourse.rnn import CharRNN

V, T = 13, 12
CONFIGS = {
    "modern GQA": dict(num_kv_heads=2),
    "MQA, no positions": dict(num_kv_heads=1, position="none"),
    "GPT-2 style": dict(position="learned", norm="layer", mlp="gelu"),
}


def _model(seed=0, **kw):
    cfg = GPTConfig(vocab_size=V, context=T + 4, dim=32, num_layers=2, num_heads=4, **kw)
    return GPT(cfg, rngs=nnx.Rngs(seed))


@pytest.fixture(scope="module", params=list(CONFIGS))
def model(request):
    return _model(**CONFIGS[request.param])


@jax.jit
def _tokens(key):
    return jax.random.randint(key, (2, T), 0, V)


def test_cached_decoding_gives_the_full_forward_logits_at_every_position(model):
    x = _tokens(jax.random.key(0))
    full = model(x)
    decode_step = jax.jit(model.step)
    for p in (1, 5):
        cache = model.init_state(2, T + 4)
        logits, cache = model.prefill(cache, x[:, :p])
        got = [logits]
        for t in range(p, T):
            logits, cache = decode_step(cache, x[:, t])
            got.append(logits)
        assert int(cache.length) == T
        np.testing.assert_allclose(jnp.stack(got, 1), full[:, p - 1:], rtol=1e-5, atol=1e-5)


def test_the_gpt_is_causal_by_jacobian(model):
    """Output i (which predicts token i+1) depends on inputs 0..i and on nothing after."""
    h = model.embed_tokens(_tokens(jax.random.key(1)))[0]
    D = causality.dependency_map(lambda e: model.from_embeddings(e[None])[0], h)
    assert causality.is_causal(D, strict=False)
    assert len(causality.missing_dependencies(D, strict=False)) == 0


def test_cache_arrays_hold_the_formula_bytes_per_token(model):
    cfg = model.cfg
    cache = model.init_state(3, 10)
    per_token = cache.nbytes / (3 * 10)
    assert per_token == kv_cache_bytes_per_token(cfg.num_layers, cfg.kv_heads, cfg.head_dim, 4)


def test_decoders_plug_into_generate_and_agree():
    model = _model(num_kv_heads=2)
    prompt = _tokens(jax.random.key(2))[:, :4]
    n = 6
    decoding.check_decoder(model)
    decoding.check_decoder(UncachedGPT(model))
    cached = decoding.generate(model, prompt, n, jax.random.key(3), temperature=0.0)
    uncached = decoding.generate(UncachedGPT(model), prompt, n, jax.random.key(3), temperature=0.0)
    np.testing.assert_array_equal(cached, uncached)
    # greedy means: every token is the argmax of the full forward pass on what came before
    seq = jnp.concatenate([prompt, cached], 1)
    np.testing.assert_array_equal(jnp.argmax(model(seq[:, :-1])[:, 3:], -1), cached)
    # sampling too: the same key gives the same tokens through the cache and without it
    kw = dict(temperature=0.9, top_k=6, repetition_penalty=1.2, max_len=T + 4)
    np.testing.assert_array_equal(
        decoding.generate(model, prompt, n, jax.random.key(4), **kw),
        decoding.generate(UncachedGPT(model), prompt, n, jax.random.key(4), **kw))


def test_uncached_decoder_steps_give_the_forward_logits(model):
    x = _tokens(jax.random.key(6))
    dec = UncachedGPT(model)
    logits, state = dec.prefill(dec.init_state(2, T), x[:, :3])
    got = [logits]
    for t in range(3, T):
        logits, state = dec.step(state, x[:, t])
        got.append(logits)
    np.testing.assert_allclose(jnp.stack(got, 1), model(x)[:, 2:], rtol=1e-5, atol=1e-5)


def test_cropped_decoder_runs_the_model_on_the_last_window_tokens(model):
    """Within the window it is the full forward pass; past it, each step's logits are those of
    the model run on the last ``window`` tokens alone (positions restarting at 0)."""
    W = 5
    x = _tokens(jax.random.key(8))
    dec = CroppedGPT(model, window=W)
    logits, state = dec.prefill(dec.init_state(2, T), x[:, :3])
    got = [logits]
    for t in range(3, T):
        logits, state = dec.step(state, x[:, t])
        got.append(logits)
    want = [model(x[:, max(0, t + 1 - W): t + 1])[:, -1] for t in range(2, T)]
    np.testing.assert_allclose(jnp.stack(got, 1), jnp.stack(want, 1), rtol=1e-5, atol=1e-5)
    # a prompt longer than the window is cropped too
    logits, _ = dec.prefill(dec.init_state(2, T), x[:, :8])
    np.testing.assert_allclose(logits, model(x[:, 3:8])[:, -1], rtol=1e-5, atol=1e-5)


def test_cropped_decoder_generates_past_the_context():
    model = _model(position="learned")  # context T + 4: a learned table cannot go further
    decoding.check_decoder(CroppedGPT(model))
    out = decoding.generate(CroppedGPT(model), _tokens(jax.random.key(2))[:, :4], 3 * T,
                            jax.random.key(0))
    assert out.shape == (2, 3 * T)
    with pytest.raises(ValueError, match="window"):
        CroppedGPT(model, window=T + 5)


def test_a_retrained_model_reuses_the_compiled_loop():
    prompt = _tokens(jax.random.key(2))[:, :4]
    decoding.generate(_model(num_kv_heads=2), prompt, 5, jax.random.key(0))
    before = decoding._generate._cache_size()
    decoding.generate(_model(seed=9, num_kv_heads=2), prompt, 5, jax.random.key(0))
    assert decoding._generate._cache_size() == before  # parameters are arguments, not constants


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 9), st.integers(2, 20), st.integers(0, 1000))
def test_copy_task_repeats_the_string_and_masks_the_predictable_half(length, vocab, seed):
    x, y, m = copy_task(jax.random.key(seed), 3, length, vocab)
    assert x.shape == y.shape == m.shape == (3, 2 * length - 1)
    s = np.concatenate([np.asarray(x), np.asarray(y)[:, -1:]], 1)
    np.testing.assert_array_equal(s[:, :length], s[:, length:])
    np.testing.assert_array_equal(np.asarray(x)[:, 1:], np.asarray(y)[:, :-1])
    assert np.all(np.asarray(m)[:, length - 1:]) and not np.any(np.asarray(m)[:, : length - 1])
    assert 0 <= int(s.min()) and int(s.max()) < vocab


@settings(max_examples=8, deadline=None)
@given(st.integers(2, 6), st.integers(0, 4), st.integers(0, 10), st.integers(0, 1000))
def test_induction_task_repeats_distinct_symbols_at_a_random_offset(lo, extra, spare, seed):
    hi = lo + extra
    vocab = hi + spare
    x, y, rep, first = induction_task(jax.random.key(seed), 16, hi, vocab, min_repeat=lo)
    assert x.shape == y.shape == rep.shape == first.shape == (16, 2 * hi - 1)
    x, y, rep, first = (np.asarray(a) for a in (x, y, rep, first))
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    s = np.concatenate([x, y[:, -1:]], 1)
    assert 0 <= s.min() and s.max() < vocab
    t = np.arange(2 * hi - 1)
    for row, r, f in zip(s, rep, first):
        L = int(f.sum()) + 1  # the first copy's targets are u_2..u_L
        assert lo <= L <= hi
        np.testing.assert_array_equal(f, t <= L - 2)
        np.testing.assert_array_equal(r, (t >= L) & (t <= 2 * L - 2))
        assert len(set(row[:L].tolist())) == L  # distinct: one earlier occurrence each
        np.testing.assert_array_equal(row[L:2 * L], row[:L])
        # every masked target is the symbol after the previous occurrence of the current one
        for i in np.flatnonzero(r):
            prev = int(np.flatnonzero(row[:L] == row[i])[0])
            assert row[i + 1] == row[prev + 1]


def test_induction_task_varies_the_offset():
    *_, first = induction_task(jax.random.key(0), 64, 12, 32, min_repeat=4)
    assert len(set(np.asarray(first).sum(1).tolist())) >= 5  # no fixed offset to learn


def test_losses_and_sizes():
    model = _model()
    x = _tokens(jax.random.key(4))
    lp = jax.nn.log_softmax(model(x[:, :-1]), -1)
    manual = -jnp.mean(jnp.take_along_axis(lp, x[:, 1:, None], 2))
    np.testing.assert_allclose(lm_loss(model, (x[:, :-1], x[:, 1:])), manual, rtol=1e-5)
    mask = jnp.zeros_like(x[:, 1:]).at[:, -1].set(1)
    want = -jnp.mean(jnp.take_along_axis(lp[:, -1], x[:, -1:], 1))
    np.testing.assert_allclose(lm_loss(model, (x[:, :-1], x[:, 1:], mask)), want, rtol=1e-5)
    d, h = 32, GPTConfig(vocab_size=V, dim=32).hidden
    assert h % 8 == 0 and h >= 8 * d // 3
    blocks = 2 * (4 * d * d + 3 * d * h + 2 * d)  # attention, SwiGLU, two RMSNorm gains
    assert num_params(model) == V * d + blocks + d + d * V


def test_arguments_are_validated():
    with pytest.raises(ValueError, match="position"):
        GPTConfig(vocab_size=5, position="sinusoidal")
    with pytest.raises(ValueError, match="num_layers"):
        GPTConfig(vocab_size=5, num_layers=0)
    with pytest.raises(ValueError, match="divisible"):
        GPT(GPTConfig(vocab_size=5, dim=30, num_heads=4), rngs=nnx.Rngs(0))
    m = _model(position="learned")
    with pytest.raises(ValueError, match="learned position"):
        m(jnp.zeros((1, T + 5), jnp.int32))
    with pytest.raises(ValueError, match="max_len"):
        m.init_state(1, T + 5)
    with pytest.raises(ValueError, match="max_len"):
        UncachedGPT(m).init_state(1, T + 5)
    with pytest.raises(ValueError, match="does not fit"):
        _model().prefill(_model().init_state(1, 3), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="batch_size"):
        _model().init_state(True, 4)  # a bool is not an integer
    with pytest.raises(TypeError, match="GPT"):
        UncachedGPT(CharRNN(5, 4, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="length"):
        copy_task(jax.random.key(0), 2, 1, 4)
    with pytest.raises(ValueError, match="max_repeat"):
        induction_task(jax.random.key(0), 2, 8, 4)  # 8 distinct symbols from an alphabet of 4


def test_attention_maps_are_causal_distributions(model):
    x = _tokens(jax.random.key(5))
    maps = np.asarray(model.attention_maps(x))
    assert maps.shape == (2, 2, 4, T, T)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(maps, 1) == 0.0)


def test_attention_maps_are_the_weights_the_forward_pass_uses():
    """GQA (4 query heads, 2 key/value heads): in every layer, the maps applied to the values of
    the model's own projections, with query head h reading key/value head h // (H / G),
    reproduce that layer's attention output in the forward pass. A map with another head
    grouping (h % G) does not."""
    model = _model(seed=3, num_kv_heads=2)
    x = _tokens(jax.random.key(7))
    maps = model.attention_maps(x)  # (L, B, H, T, T)
    H, G = model.cfg.num_heads, model.cfg.kv_heads
    h = model.embed_tokens(x)
    for layer, block in enumerate(model.blocks):
        attn, xin = block.attn, block.norm1(h)
        _, _, v = attn.qkv(xin, jnp.arange(T))  # v (B, T, G, dh)
        want = attn(xin)  # the forward pass: (B, T, dim)
        for group, should_match in ((np.arange(H) // (H // G), True), (np.arange(H) % G, False)):
            out = jnp.einsum("bhij,bjhd->bihd", maps[layer], v[:, :, group])
            got = attn.wo(out.reshape(*out.shape[:2], -1))
            assert np.allclose(got, want, rtol=1e-4, atol=1e-5) == should_match
        h = block(h)
