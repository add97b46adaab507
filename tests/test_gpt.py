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
    GPTConfig,
    copy_task,
    kv_cache_decoder,
    masked_next_token_loss,
    next_token_loss,
    num_params,
    uncached_decoder,
)

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
    decode_step = jax.jit(model.decode_step)
    for p in (1, 5):
        cache = model.init_cache(2, T + 4)
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
    cache = model.init_cache(3, 10)
    per_token = cache.nbytes / (3 * 10)
    assert per_token == kv_cache_bytes_per_token(cfg.num_layers, cfg.kv_heads, cfg.head_dim, 4)


def test_decoders_plug_into_generate_and_agree():
    model = _model(num_kv_heads=2)
    prompt = _tokens(jax.random.key(2))[:, :4]
    n = 6
    step, prefill, state = kv_cache_decoder(model, 2, 4 + n)
    cached = decoding.generate(step, state, prompt, n, jax.random.key(3), temperature=0.0,
                               prefill_fn=prefill)
    ustep, uprefill, ustate = uncached_decoder(model, 2, 4 + n)
    uncached = decoding.generate(ustep, ustate, prompt, n, jax.random.key(3), temperature=0.0,
                                 prefill_fn=uprefill)
    np.testing.assert_array_equal(cached, uncached)
    # greedy means: every token is the argmax of the full forward pass on what came before
    seq = jnp.concatenate([prompt, cached], 1)
    np.testing.assert_array_equal(jnp.argmax(model(seq[:, :-1])[:, 3:], -1), cached)
    # a model of the same structure reuses the same compiled step function
    assert kv_cache_decoder(_model(seed=9, num_kv_heads=2), 2, 10)[0] is step


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


def test_losses_and_sizes():
    model = _model()
    x = _tokens(jax.random.key(4))
    lp = jax.nn.log_softmax(model(x[:, :-1]), -1)
    manual = -jnp.mean(jnp.take_along_axis(lp, x[:, 1:, None], 2))
    np.testing.assert_allclose(next_token_loss(model, (x[:, :-1], x[:, 1:])), manual, rtol=1e-5)
    mask = jnp.zeros_like(x[:, 1:]).at[:, -1].set(1)
    want = -jnp.mean(jnp.take_along_axis(lp[:, -1], x[:, -1:], 1))
    np.testing.assert_allclose(masked_next_token_loss(model, (x[:, :-1], x[:, 1:], mask)), want,
                               rtol=1e-5)
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
        m.init_cache(1, T + 5)
    with pytest.raises(ValueError, match="does not fit"):
        _model().prefill(_model().init_cache(1, 3), jnp.zeros((1, 4), jnp.int32))
    with pytest.raises(ValueError, match="length"):
        copy_task(jax.random.key(0), 2, 1, 4)


def test_attention_maps_are_causal_distributions(model):
    x = _tokens(jax.random.key(5))
    maps = np.asarray(model.attention_maps(x))
    assert maps.shape == (2, 2, 4, T, T)
    np.testing.assert_allclose(maps.sum(-1), 1.0, rtol=1e-5)
    assert np.all(np.triu(maps, 1) == 0.0)
