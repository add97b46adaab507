"""Speculative decoding (chapter 12): GPT.extend, the accept/residual rule, exactness by
chi-square against the enumerated distribution (and a wrong rule failing it), greedy equality,
multi-token prediction."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from arcourse import gpt
from arcourse import speculative as sp
from arcourse.decoding import generate


def _gpt(V, dim, layers, seed, **kw):
    cfg = gpt.GPTConfig(vocab_size=V, context=64, dim=dim, num_layers=layers,
                        num_heads=kw.pop("heads", 2), **kw)
    return gpt.GPT(cfg, rngs=nnx.Rngs(seed))


def _sharpen(model, factor):
    """Scale the unembedding so a random model's distributions are far from uniform."""
    model.head.kernel[...] = model.head.kernel[...] * factor
    return model


@nnx.jit
def _prefill(model, cache, tokens):
    return model.prefill(cache, tokens)


@nnx.jit
def _extend(model, cache, tokens):
    return model.extend(cache, tokens)


@nnx.jit
def _step(model, cache, tokens):
    return model.step(cache, tokens)


@nnx.jit
def _forward(model, tokens):
    return model(tokens)


# Compiled: eagerly, each of the many small operations compiles on its own, once per shape.
@jax.jit
def _residual_and_emitted(p, q):
    r = sp.residual_distribution(p, q)
    return r, q * sp.accept_probability(p, q) + (1 - jnp.minimum(p, q).sum()) * r


_verify_both = jax.jit(lambda u, p, q, drafts, logits: (sp.speculative_verify(u, p, q, drafts),
                                                        sp.greedy_verify(logits, drafts)))
_head_loss_grads = nnx.jit(nnx.grad(sp.mtp_head_loss))


@functools.cache
def _extend_model(position, kv_heads):
    return _gpt(13, 16, 2, 0, heads=2, num_kv_heads=kv_heads, position=position)


@functools.cache
def tiny_pair():
    target = _sharpen(_gpt(3, 16, 1, 0), 3.0)
    draft = _sharpen(_gpt(3, 8, 1, 5), 3.0)
    return target, draft


# --------------------------------------------------------------------------------------------
# GPT.extend
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("position,kv_heads", [("rope", 1), ("learned", 2), ("none", 2)])
@settings(max_examples=3, deadline=None)
@given(prefix=st.integers(1, 6), k=st.integers(1, 5))
def test_extend_equals_k_steps(position, kv_heads, prefix, k):
    model = _extend_model(position, kv_heads)
    tokens = jnp.asarray(np.random.default_rng(prefix * 7 + k).integers(0, 13, (2, prefix + k)),
                         jnp.int32)
    _, cache = _prefill(model, model.init_state(2, 12), tokens[:, :prefix])
    logits, ext = _extend(model, cache, tokens[:, prefix:])
    stepped, c = [], cache
    for i in range(prefix, prefix + k):
        lg, c = _step(model, c, tokens[:, i])
        stepped.append(lg)
    np.testing.assert_allclose(logits, jnp.stack(stepped, 1), atol=1e-5, rtol=1e-5)
    assert int(ext.length) == prefix + k
    for a, b in zip(ext.layers, c.layers):
        np.testing.assert_allclose(a.k[:, :prefix + k], b.k[:, :prefix + k], atol=1e-5)
        np.testing.assert_allclose(a.v[:, :prefix + k], b.v[:, :prefix + k], atol=1e-5)
    # and the teacher-forced forward pass
    np.testing.assert_allclose(logits, _forward(model, tokens)[:, prefix:], atol=1e-5, rtol=1e-5)


def test_extend_after_roll_back_overwrites_stale_entries():
    model = _extend_model("rope", 2)
    tokens = jnp.asarray([[1, 2, 3, 4, 5, 6]], jnp.int32)
    _, cache = _prefill(model, model.init_state(1, 10), tokens[:, :2])
    _, dirty = _extend(model, cache, jnp.asarray([[9, 9, 9]], jnp.int32))
    logits, _ = _extend(model, dirty._replace(length=cache.length), tokens[:, 2:])
    np.testing.assert_allclose(logits, _forward(model, tokens)[:, 2:], atol=1e-5)


def test_extend_rejects_bad_shapes():
    model = _gpt(13, 16, 1, 0)
    cache = model.init_state(2, 4)
    with pytest.raises(ValueError, match="batch=2"):
        model.extend(cache, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="do not fit"):
        model.extend(cache, jnp.zeros((2, 5), jnp.int32))


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------
def _dists(seed, n, V, sharp=2.0):
    z = sharp * np.random.default_rng(seed).normal(size=(n, V))
    e = np.exp(z - z.max(-1, keepdims=True))
    return jnp.asarray(e / e.sum(-1, keepdims=True), jnp.float32)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), V=st.integers(1, 40), sharp=st.floats(0.1, 8.0))
def test_residual_is_a_distribution_and_the_rule_reproduces_p(seed, V, sharp):
    p, q = _dists(seed, 2, V, sharp)
    # P(emit x) = q(x) min(1, p/q) + (1 - sum min(p, q)) r(x) = p(x): the exactness identity
    r, emitted = _residual_and_emitted(p, q)
    assert np.all(np.asarray(r) >= 0)
    np.testing.assert_allclose(r.sum(), 1.0, atol=1e-5)
    np.testing.assert_allclose(emitted, p, atol=1e-5)


def test_residual_edge_cases():
    p = jnp.asarray([0.5, 0.5, 0.0])
    np.testing.assert_allclose(sp.residual_distribution(p, p), p)  # nothing left: p itself
    r = sp.residual_distribution(p, jnp.asarray([1.0, 0.0, 0.0]))
    np.testing.assert_allclose(r, [0.0, 1.0, 0.0])
    batched = sp.residual_distribution(_dists(0, 4, 7), _dists(1, 4, 7))
    np.testing.assert_allclose(batched.sum(-1), np.ones(4), atol=1e-5)
    with pytest.raises(ValueError, match="same shape"):
        sp.residual_distribution(jnp.ones(3) / 3, jnp.ones(4) / 4)


def test_accept_probability():
    a = sp.accept_probability(jnp.asarray([0.2, 0.5, 0.0, 0.3]), jnp.asarray([0.4, 0.1, 0.2, 0.0]))
    np.testing.assert_allclose(a, [0.5, 1.0, 0.0, 1.0])


@pytest.mark.parametrize("gamma", [1, 3, 8])
def test_expected_tokens_per_call(gamma):
    for alpha in (0.0, 0.3, 0.9, 0.999999, 1.0):
        want = sum(alpha ** i for i in range(gamma + 1))
        np.testing.assert_allclose(sp.expected_tokens_per_call(alpha, gamma), want, rtol=1e-4)


def test_verify_matches_greedy_verify_on_one_hots():
    rng = np.random.default_rng(0)
    for _ in range(20):
        gamma, V = rng.integers(1, 6), rng.integers(2, 6)
        logits = jnp.asarray(rng.normal(size=(gamma + 1, V)), jnp.float32)
        drafts = jnp.asarray(rng.integers(0, V, gamma), jnp.int32)
        best = jnp.argmax(logits, -1)
        drafts = jnp.where(jnp.asarray(rng.random(gamma) < 0.6), best[:gamma], drafts)
        p = jax.nn.one_hot(best, V)
        q = jax.nn.one_hot(drafts, V)
        (n, dist), (n_g, tok) = _verify_both(jnp.asarray(rng.random(gamma), jnp.float32), p, q,
                                             drafts, logits)
        assert int(n) == int(n_g)
        assert int(jnp.argmax(dist)) == int(tok) and float(dist.max()) == 1.0


# --------------------------------------------------------------------------------------------
# Exactness, by chi-square against the enumerated distribution
# --------------------------------------------------------------------------------------------
N_TOKENS, SAMPLES = 3, 10_000
PROMPT = jnp.asarray([[1, 2]], jnp.int32)


def _chi_square_pvalue(result, probs, V):
    idx = np.ravel_multi_index(np.asarray(result.tokens).T, (V,) * N_TOKENS)
    counts = np.bincount(idx, minlength=V ** N_TOKENS)
    probs = np.asarray(probs, np.float64)
    keep = probs > 0
    if counts[~keep].sum():  # a sequence of probability zero was drawn: certainly not exact
        return 0.0
    expected = probs[keep] / probs[keep].sum() * counts.sum()
    return stats.chisquare(counts[keep], expected).pvalue


@pytest.mark.parametrize("verify_fn,exact", [
    (None, True),
    (sp.wrong_verify_resample_p, False),
    (sp.wrong_verify_inverted, False),
])
def test_speculative_sampling_is_exact_by_chi_square(verify_fn, exact):
    target, draft = tiny_pair()
    keys = jax.random.split(jax.random.key(11), SAMPLES)
    for settings_ in ({"temperature": 1.0}, {"temperature": 0.7, "top_k": 2}):
        _, probs = sp.sequence_distribution(target, PROMPT, N_TOKENS, **settings_)
        res = sp.speculative_samples(target, draft, PROMPT, N_TOKENS, keys, gamma=2,
                                     verify_fn=verify_fn, **settings_)
        pvalue = _chi_square_pvalue(res, probs, 3)
        if exact:
            assert pvalue > 1e-3, (settings_, pvalue)
            assert 0.2 < res.alpha < 0.95  # the test exercises both acceptance and rejection
        else:
            assert pvalue < 1e-6, (settings_, pvalue)


def test_samples_by_rule_equal_one_rule_at_a_time():
    """One compiled sampler for several rules (a traced index picks the rule) gives, for each
    rule, exactly what speculative_samples gives with that rule alone."""
    target, draft = tiny_pair()
    keys = jax.random.split(jax.random.key(13), 64)
    rules = [sp.speculative_verify, sp.wrong_verify_resample_p, sp.wrong_verify_inverted]
    together = sp.speculative_samples_by_rule(target, draft, PROMPT, N_TOKENS, keys, rules,
                                              gamma=2, temperature=0.8, top_k=2)
    assert len(together) == len(rules)
    for rule, res in zip(rules, together):
        alone = sp.speculative_samples(target, draft, PROMPT, N_TOKENS, keys, gamma=2,
                                       verify_fn=rule, temperature=0.8, top_k=2)
        for a, b in zip(alone, res):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="verify_fns"):
        sp.speculative_samples_by_rule(target, draft, PROMPT, N_TOKENS, keys, [])


def test_speculative_sampling_is_exact_with_top_p_and_min_p():
    """The nucleus (top-p) and min-p filters of chapter 04 shape p and q alike, and the output
    is distributed as the target with those filters."""
    target, draft = tiny_pair()
    keys = jax.random.split(jax.random.key(12), SAMPLES)
    for settings_ in ({"top_p": 0.8}, {"temperature": 1.2, "min_p": 0.2}):
        _, probs = sp.sequence_distribution(target, PROMPT, N_TOKENS, **settings_)
        res = sp.speculative_samples(target, draft, PROMPT, N_TOKENS, keys, gamma=2, **settings_)
        assert _chi_square_pvalue(res, probs, 3) > 1e-3, settings_
        assert 0.2 < res.alpha < 0.99, settings_  # rejections happen


def test_draft_equal_to_target_accepts_everything():
    target, _ = tiny_pair()
    res = sp.speculative_generate(target, target, PROMPT, 20, jax.random.key(0), gamma=3)
    assert int(res.accepted) == int(res.tested) and float(res.alpha) == 1.0
    assert int(res.calls) == 5  # 4 tokens per call: 3 drafts + the bonus


# --------------------------------------------------------------------------------------------
# Greedy: exactly the target's output
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gamma", [1, 4])
def test_greedy_speculative_equals_greedy_target(gamma):
    target = _gpt(29, 32, 2, 0, heads=4, num_kv_heads=2)
    draft = _gpt(29, 16, 1, 3)
    prompt = jnp.asarray([[3, 1, 4, 1, 5]], jnp.int32)
    res = sp.speculative_generate(target, draft, prompt, 40, jax.random.key(0), gamma=gamma,
                                  temperature=0.0)
    want = generate(target, prompt, 40, jax.random.key(0), temperature=0.0)[0]
    np.testing.assert_array_equal(res.tokens, want)
    assert res.tokens.shape == (40,) and int(res.calls) <= 40


def test_arguments_are_checked():
    target, draft = tiny_pair()
    big = _gpt(5, 8, 1, 0)
    with pytest.raises(ValueError, match="gamma"):
        sp.speculative_generate(target, draft, PROMPT, 4, jax.random.key(0), gamma=0)
    with pytest.raises(ValueError, match="vocabulary"):
        sp.speculative_generate(target, big, PROMPT, 4, jax.random.key(0))
    with pytest.raises(ValueError, match="shape"):
        sp.speculative_generate(target, draft, jnp.zeros((2, 3), jnp.int32), 4, jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        sp.speculative_generate(target, draft, PROMPT, 4, jax.random.key(0), temperature=-1.0)
    with pytest.raises(TypeError, match="GPT"):
        sp.speculative_generate(object(), draft, PROMPT, 4, jax.random.key(0))


# --------------------------------------------------------------------------------------------
# Multi-token prediction
# --------------------------------------------------------------------------------------------
def _mtp(V, seed=0):
    trunk = _sharpen(_gpt(V, 16, 1, seed), 3.0)
    model = sp.MTPModel(trunk, 3, rngs=nnx.Rngs(seed + 1))
    for head in model.heads:  # random, different heads (a new head starts as head 1)
        head.mlp.w2.kernel[...] = 0.5 * jax.random.normal(jax.random.key(seed + 2),
                                                          head.mlp.w2.kernel.shape)
    return model


def test_mtp_shapes_and_head_one_is_the_trunk():
    model = _mtp(7)
    tokens = jax.random.randint(jax.random.key(0), (2, 9), 0, 7)
    logits = _forward(model, tokens)
    assert logits.shape == (3, 2, 9, 7)
    np.testing.assert_allclose(logits[0], _forward(model.trunk, tokens), atol=1e-5)
    inputs, targets = sp.mtp_windows(jax.random.key(0), jnp.arange(100), 4, 10, 3)
    np.testing.assert_array_equal(targets[2], inputs + 3)
    fresh = sp.MTPModel(model.trunk, 2, rngs=nnx.Rngs(0))
    both = _forward(fresh, tokens)
    np.testing.assert_allclose(both[1], both[0], atol=1e-6)


def test_mtp_head_loss_leaves_the_trunk_alone():
    model = _mtp(7)
    batch = sp.mtp_windows(jax.random.key(0), jnp.arange(60) % 7, 4, 8, 3)
    grads = _head_loss_grads(model, batch)
    trunk_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads.trunk))
    head_norm = sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(grads.heads))
    assert trunk_norm == 0.0 and head_norm > 0.0


def test_mtp_self_speculative_greedy_equals_greedy():
    model = _mtp(17)
    prompt = jnp.asarray([[1, 2, 3]], jnp.int32)
    res = sp.mtp_generate(model, prompt, 30, jax.random.key(0), temperature=0.0)
    want = generate(model.trunk, prompt, 30, jax.random.key(0), temperature=0.0)[0]
    np.testing.assert_array_equal(res.tokens, want)


def test_mtp_self_speculative_sampling_is_exact_by_chi_square():
    model = _mtp(3)
    _, probs = sp.sequence_distribution(model.trunk, PROMPT, N_TOKENS)
    res = sp.mtp_samples(model, PROMPT, N_TOKENS, jax.random.split(jax.random.key(5), SAMPLES))
    assert _chi_square_pvalue(res, probs, 3) > 1e-3
    assert 0.1 < res.alpha < 0.95
