"""arcourse.moe: the two dispatch paths agree with the definition, the balancing losses have the
values the papers state, the bias update balances, the router is trained, the MoE GPT is a GPT,
and the expert-parallel layer on 8 devices equals the single-device layer."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import causality, moe
from arcourse.gpt import GPTConfig
from arcourse.layers import SwiGLU


def _layer(dim=8, hidden=12, e=4, k=2, seed=0, **kw):
    return moe.MoELayer(dim, hidden, e, k, router_std=1.0, rngs=nnx.Rngs(seed), **kw)


@nnx.jit(static_argnums=2)
def _four_ways(layer, x, capacity):
    """One compiled program per shape for the capacity, dropless, dense and layer outputs (op by
    op, every shape drawn would compile each primitive anew: minutes of test time)."""
    _, _, w, ex = layer.route(x)
    y_cap, keep = moe.moe_capacity(x, w, ex, layer.experts.weights, capacity)
    y_dl = moe.moe_dropless(x, w, ex, layer.experts.weights)
    y_ref = moe.moe_dense_reference(x, w, ex, layer.experts.weights)
    y, stats = layer.forward(x)
    return y_cap, keep, y_dl, y_ref, y, stats["dropped"]


@functools.cache
def _roomy_layer(e, k, seed):
    """A layer whose capacity C = N k is never full; built once per (e, k, seed), since building
    the stacked experts costs seconds per expert count."""
    return _layer(e=e, k=k, seed=seed, capacity_factor=float(e))


# shapes: fewer tokens than experts (some experts empty), k = e (every expert), many tokens
@settings(max_examples=8, deadline=None)
@given(shape=st.sampled_from([(1, 8, 2), (3, 4, 4), (6, 8, 3), (24, 4, 1)]),
       seed=st.integers(0, 10**6))
def test_capacity_and_dropless_agree_when_nothing_is_dropped(shape, seed):
    n, e, k = shape
    layer = _roomy_layer(e, k, seed % 2)
    x = jax.random.normal(jax.random.key(seed), (n, 8)) * 2
    y_cap, keep, y_dl, y_ref, y, dropped = _four_ways(layer, x, n * k)
    assert bool(keep.all())
    np.testing.assert_allclose(y_cap, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y_dl, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert abs(float(dropped)) < 1e-6  # a fraction, computed in float32


def test_each_expert_is_the_shared_swiglu():
    layer = _layer(e=3)
    w1, w3, w2 = layer.experts.weights
    x = jax.random.normal(jax.random.key(0), (5, 8))
    out = layer.experts(jnp.broadcast_to(x, (3, 5, 8)))
    for i in range(3):
        s = SwiGLU(8, 12, rngs=nnx.Rngs(0))
        s.w1.kernel.value, s.w3.kernel.value, s.w2.kernel.value = w1[i], w3[i], w2[i]
        np.testing.assert_allclose(out[i], s(x), rtol=1e-6, atol=1e-6)


def test_capacity_drops_exactly_the_overflow():
    e, cap = 4, 3
    experts = jnp.asarray(np.random.default_rng(0).integers(0, e, size=(40, 1)), jnp.int32)
    pos, keep = moe.capacity_positions(experts, e, cap)
    counts = np.bincount(np.asarray(experts[:, 0]), minlength=e)
    assert int(keep.sum()) == int(np.minimum(counts, cap).sum())
    for i in range(e):  # each expert's kept slots are 0..min(count, C)-1, each used once
        slots = np.sort(np.asarray(pos[:, 0])[(np.asarray(experts[:, 0]) == i) & np.asarray(keep[:, 0])])
        np.testing.assert_array_equal(slots, np.arange(min(counts[i], cap)))


def test_first_choices_outrank_second_choices():
    experts = jnp.array([[0, 1], [1, 0]], jnp.int32)  # token 1's first choice is expert 1
    pos, keep = moe.capacity_positions(experts, 2, 1)
    np.testing.assert_array_equal(keep, [[True, False], [True, False]])


def test_capacity_formula():
    assert moe.capacity(2048, 8, 2, 1.25) == 640
    assert moe.capacity(1, 8, 2, 1.0) == 1
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.capacity(10, 4, 1, 0.0)


@pytest.mark.parametrize("e,k", [(4, 1), (8, 1), (8, 2), (16, 3)])
def test_lb_loss_is_alpha_k_at_perfect_balance(e, k):
    n = 4 * e
    experts = (jnp.arange(n)[:, None] * k + jnp.arange(k)) % e
    probs = jnp.full((n, e), 1.0 / e)
    np.testing.assert_allclose(moe.load_balancing_loss(probs, experts, alpha=0.3), 0.3 * k,
                               rtol=1e-6)


def test_lb_loss_grows_with_imbalance():
    e, n = 8, 64
    values = []
    for share in np.linspace(0, 1, 6):  # a growing share of the tokens and probability -> expert 0
        m = int(round(share * n))
        experts = jnp.concatenate([jnp.zeros((m, 1), jnp.int32),
                                   (jnp.arange(n - m)[:, None] % e).astype(jnp.int32)])
        probs = (1 - share) * jnp.full((n, e), 1 / e) + share * jax.nn.one_hot(jnp.zeros(n, int), e)
        values.append(float(moe.load_balancing_loss(probs, experts)))
    assert values[0] == pytest.approx(1.0, rel=1e-6)
    assert all(b > a for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(e, rel=1e-6)  # everything on one expert: alpha * E


def test_z_loss_is_stable_and_zero_free():
    z = jnp.array([[1000.0, 0.0], [0.0, 0.0]])
    want = np.mean([1000.0 ** 2, np.log(2) ** 2])
    np.testing.assert_allclose(moe.router_z_loss(z), want, rtol=1e-6)


def test_bias_update_balances_a_skewed_router():
    probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (512, 8)) + jnp.arange(8) * 0.3)

    def load(b):
        return moe.expert_counts(moe.top_k_gate(probs, 2, b)[1], 8)

    def step(_, b):
        return moe.bias_update(b, load(b), 0.01)

    bias = jax.lax.fori_loop(0, 300, step, jnp.zeros(8))
    before, after = load(jnp.zeros(8)), load(bias)
    assert before.max() / before.mean() > 2.0
    assert after.max() / after.mean() < 1.25
    w0, _ = moe.top_k_gate(probs, 2)
    wb, eb = moe.top_k_gate(probs, 2, bias)  # the weights ignore the bias
    np.testing.assert_allclose(wb, jnp.take_along_axis(probs, eb, 1) /
                               jnp.take_along_axis(probs, eb, 1).sum(1, keepdims=True), rtol=1e-6)
    assert not np.allclose(w0, wb)


def test_gradients_reach_the_router():
    layer = _layer()
    x = jax.random.normal(jax.random.key(1), (16, 8))

    def task(m):
        return jnp.sum(m(x) ** 2)

    def balance(m):
        return m.forward(x)[1]["lb"]

    for fn in (task, balance):
        g = nnx.grad(fn)(layer)
        assert float(jnp.abs(g.router[...]).sum()) > 0
    g = nnx.grad(task)(layer)
    assert all(float(jnp.abs(w).sum()) > 0 for w in jax.tree.leaves(nnx.state(g.experts)))


def test_bias_moves_once_per_training_step():
    model = _gpt(bias_rate=0.1)
    batch = (jax.random.randint(jax.random.key(2), (2, 8), 0, 11), jnp.zeros((2, 8), jnp.int32))
    nnx.jit(lambda m, t: m(t))(model, batch[0])  # a plain forward pass leaves the bias alone
    assert all(float(jnp.abs(m.bias[...]).sum()) == 0.0 for m in model.moe_layers)
    train_step = nnx.jit(nnx.value_and_grad(moe.moe_lm_loss))  # as fit's training step does
    train_step(model, batch)
    for m in model.moe_layers:
        b = np.abs(np.asarray(m.bias[...]))
        assert np.all(np.isclose(b, 0.0) | np.isclose(b, 0.1))  # one step of +-gamma (or 0)
        assert float(jnp.abs(m.bias[...]).sum()) > 0.0
    plain = _gpt()
    train_step(plain, batch)
    assert all(float(jnp.abs(m.bias[...]).sum()) == 0.0 for m in plain.moe_layers)


def _gpt(**kw):
    cfg = GPTConfig(vocab_size=11, context=16, dim=16, num_layers=2, num_heads=2)
    return moe.MoEGPT(moe.MoEConfig(cfg, num_experts=4, k=2, **kw), rngs=nnx.Rngs(0))


def test_dropless_moe_gpt_is_causal_and_decodes_like_its_forward_pass():
    model = _gpt(capacity_factor=None, shared_hidden=8)
    tokens = jax.random.randint(jax.random.key(0), (2, 10), 0, 11)
    # The dependency map row by row, one gradient per output position: jax.lax.ragged_dot (the
    # dropless path) cannot be vmapped over a batch of cotangents, as jacrev would do.
    h0 = model.embed_tokens(tokens[:1])[0]
    u = jax.random.normal(jax.random.key(1), (11,))
    row = jax.jit(lambda h, i: jax.grad(lambda h: model.from_embeddings(h[None])[0][i] @ u)(h))
    D = np.stack([np.abs(np.asarray(row(h0, i))).sum(-1) for i in range(h0.shape[0])])
    assert causality.is_causal(D, strict=False)
    assert (D[np.tril_indices(h0.shape[0])] > 0).all()  # and it does read its past
    full = model(tokens)
    state = model.init_state(2, 10)
    logits, state = model.prefill(state, tokens[:, :4])
    np.testing.assert_allclose(logits, full[:, 3], rtol=1e-4, atol=1e-4)
    for t in range(4, 10):
        logits, state = model.step(state, tokens[:, t])
        np.testing.assert_allclose(logits, full[:, t], rtol=1e-4, atol=1e-4)


def test_moe_gpt_aux_and_active_parameters():
    model = _gpt()
    tokens = jnp.zeros((2, 8), jnp.int32)
    logits, aux = model.forward(tokens)
    np.testing.assert_allclose(logits, model(tokens), rtol=1e-5, atol=1e-5)
    assert logits.shape == (2, 8, 11)
    assert aux["counts"].shape == (2, 4) and int(aux["counts"].sum()) == 2 * 2 * 8 * 2
    per_expert = 3 * 16 * model.moe_cfg.hidden
    total = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert moe.active_params_per_token(model) == total - 2 * (4 - 2) * per_expert


def test_argument_checks():
    with pytest.raises(ValueError, match="k"):
        moe.MoELayer(8, 8, 4, 5, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.MoELayer(8, 8, 4, 2, capacity_factor=-1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="probs"):
        moe.top_k_gate(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="num_groups"):
        _layer(num_groups=3)(jnp.ones((4, 8)))
    with pytest.raises(TypeError, match="MoEConfig"):
        moe.MoEGPT(GPTConfig(vocab_size=5), rngs=nnx.Rngs(0))


SHARDED = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp, numpy as np
    from flax import nnx
    from arcourse import moe
    assert len(jax.devices()) == 8, jax.devices()
    mesh = moe.expert_mesh(8)
    x = jax.random.normal(jax.random.key(0), (128, 16)) * 2
    for cf, shared in [(1.0, None), (2.0, 8), (8.0, None)]:
        layer = moe.MoELayer(16, 24, 8, 2, capacity_factor=cf, num_groups=8, shared_hidden=shared,
                             router_std=1.0, rngs=nnx.Rngs(1))
        y1, stats = layer.forward(x)
        y8 = jax.jit(lambda x: moe.expert_parallel_moe(layer, x, mesh))(x)
        err = float(jnp.abs(y1 - y8).max())
        print("cf", cf, "dropped", float(stats["dropped"]), "max error", err)
        assert err < 1e-5, err
        if cf == 8.0:
            _, _, w, e = layer.route(x)
            ref = moe.moe_dense_reference(x, w, e, layer.experts.weights)
            assert float(jnp.abs(y8 - ref).max()) < 1e-5
    hlo = jax.jit(lambda x: moe.expert_parallel_moe(layer, x, mesh)).lower(x).as_text()
    assert hlo.count("all_to_all") == 2, hlo.count("all_to_all")
    print("OK")
""")


def test_expert_parallel_layer_equals_the_single_device_layer():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    r = subprocess.run([sys.executable, "-c", SHARDED], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "OK" in r.stdout, r.stdout + r.stderr
    assert "dropped 0.0" not in r.stdout.splitlines()[0]  # the first case does drop tokens
