"""arcourse.rnn: the cells against Flax's on the same weights, scan against a Python loop,
causality of the character model, and generation that carries the state."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import decoding, losses, rnn
from arcourse.rnn import (
    CharRNN,
    GRUCell,
    LSTMCell,
    RNNCell,
    gru_step,
    input_gradient_norms,
    lstm_step,
    python_unroll,
    rnn_step,
    unroll,
)

jax.config.update("jax_default_matmul_precision", "highest")
SETTINGS = settings(max_examples=5, deadline=None)


def _k(x):
    return np.asarray(x[...])


def _cell_pair(flax_cell, my_cell, D, H, B, seed):
    """A Flax cell and ours sharing its input/hidden weights and bias, plus random (x, h)."""
    ref = flax_cell(D, H, rngs=nnx.Rngs(1), bias_init=nnx.initializers.normal(0.5))
    mine = my_cell(D, H, rngs=nnx.Rngs(2))
    mine.W_x[...] = _k(ref.dense_i.kernel)
    mine.b[...] = _k(ref.dense_i.bias)
    mine.W_h[...] = _k(ref.dense_h.kernel)
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    h = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
    return ref, mine, x, h


# --------------------------------------------------------------------------------------------
# The cells equal Flax's on shared weights
# --------------------------------------------------------------------------------------------
def test_lstm_cell_matches_flax():
    D, H, B = 5, 7, 3
    ref = nnx.LSTMCell(D, H, rngs=nnx.Rngs(1), bias_init=nnx.initializers.normal(0.5))
    mine = LSTMCell(D, H, rngs=nnx.Rngs(2))
    # Flax keeps one Linear per gate (i, f, g, o); ours keeps the blocks side by side.
    mine.W_x[...] = jnp.concatenate([_k(l.kernel) for l in (ref.ii, ref.if_, ref.ig, ref.io)], 1)
    mine.W_h[...] = jnp.concatenate([_k(l.kernel) for l in (ref.hi, ref.hf, ref.hg, ref.ho)], 1)
    mine.b[...] = jnp.concatenate([_k(l.bias) for l in (ref.hi, ref.hf, ref.hg, ref.ho)])
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(B, D)), jnp.float32)
    carry = tuple(jnp.asarray(rng.normal(size=(B, H)), jnp.float32) for _ in range(2))
    (c1, h1), out1 = ref(carry, x)
    (c2, h2), out2 = mine(carry, x)
    np.testing.assert_allclose(c2, c1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out2, out1, rtol=1e-5, atol=1e-6)
    # and the pure function of the exercises says the same
    c3, h3 = lstm_step(x, carry, mine.W_x[...], mine.W_h[...], mine.b[...])
    np.testing.assert_allclose(c3, c1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(h3, h1, rtol=1e-5, atol=1e-6)


def test_gru_cell_matches_flax():
    ref, mine, x, h = _cell_pair(nnx.GRUCell, GRUCell, 4, 6, 3, seed=1)
    h1, _ = ref(h, x)
    h2, out2 = mine(h, x)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out2, h1, rtol=1e-5, atol=1e-6)
    h3 = gru_step(x, h, mine.W_x[...], mine.W_h[...], mine.b[...])
    np.testing.assert_allclose(h3, h1, rtol=1e-5, atol=1e-6)


def test_rnn_cell_matches_flax_simple_cell():
    ref, mine, x, h = _cell_pair(nnx.SimpleCell, RNNCell, 4, 5, 2, seed=2)
    h1, _ = ref(h, x)
    h2, _ = mine(h, x)
    np.testing.assert_allclose(h2, h1, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rnn_step(x, h, mine.W_x[...], mine.W_h[...], mine.b[...]), h1,
                               rtol=1e-5, atol=1e-6)


def test_lstm_forget_bias_starts_at_one():
    cell = LSTMCell(3, 4, rngs=nnx.Rngs(0))
    b = np.asarray(cell.b[...])
    np.testing.assert_array_equal(b[4:8], 1.0)
    np.testing.assert_array_equal(np.r_[b[:4], b[8:]], 0.0)


def test_gru_update_gate_interpolates():
    """With z = 1 (huge update-gate bias) the GRU copies its state: h' = h."""
    cell = GRUCell(3, 4, rngs=nnx.Rngs(0))
    cell.b[...] = cell.b[...].at[4:8].set(100.0)
    h = jnp.linspace(-1, 1, 8).reshape(2, 4)
    h_new, _ = cell(h, jnp.ones((2, 3)))
    np.testing.assert_allclose(h_new, h, atol=1e-6)


# --------------------------------------------------------------------------------------------
# Unrolling: lax.scan equals the Python loop
# --------------------------------------------------------------------------------------------
@SETTINGS
@given(kind=st.sampled_from(["rnn", "lstm", "gru"]), B=st.integers(1, 3), T=st.integers(1, 9),
       H=st.integers(1, 6), seed=st.integers(0, 10_000))
def test_scan_equals_python_loop(kind, B, T, H, seed):
    cell = rnn.CELLS[kind](3, H, rngs=nnx.Rngs(seed))
    xp = cell.project(jax.random.normal(jax.random.key(seed), (B, T, 3)))
    c1, hs1 = unroll(cell, cell.init_carry(B), xp)
    c2, hs2 = python_unroll(cell, cell.init_carry(B), xp)
    np.testing.assert_allclose(hs1, hs2, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c2)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert hs1.shape == (B, T, H)


# --------------------------------------------------------------------------------------------
# The character model
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["rnn", "lstm", "gru"])
def model(request):
    return CharRNN(11, 8, cell=request.param, rngs=nnx.Rngs(0))


def test_shapes_and_types(model):
    x = jnp.zeros((2, 5), jnp.int32)
    assert model(x).shape == (2, 5, 11)
    logits, carry = model.step(model.init_state(2, 5), x[:, 0])
    assert logits.shape == (2, 11) and logits.dtype == jnp.float32
    # the state of a recurrent model does not grow with max_len
    small, large = model.init_state(2, 5), model.init_state(2, 5000)
    assert [a.shape for a in jax.tree.leaves(small)] == [a.shape for a in jax.tree.leaves(large)]


@SETTINGS
@given(seed=st.integers(0, 10_000), T=st.integers(2, 10), data=st.data())
def test_position_t_ignores_the_future(seed, T, data):
    """Changing the token at position s leaves the logits at every position < s unchanged."""
    m = CharRNN(7, 5, cell=data.draw(st.sampled_from(["rnn", "lstm", "gru"])),
                embed_size=data.draw(st.sampled_from([None, 4])), rngs=nnx.Rngs(seed % 7))
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 7, size=(1, T))
    s = data.draw(st.integers(0, T - 1))
    y = x.copy()
    y[0, s] = (y[0, s] + 1 + rng.integers(0, 6)) % 7
    a, b = m(jnp.asarray(x)), m(jnp.asarray(y))
    np.testing.assert_allclose(a[:, :s], b[:, :s], rtol=1e-6, atol=1e-6)
    assert not np.allclose(a[:, s], b[:, s])  # ... and position s does see its own token


def test_embedding_gradient_is_causal():
    """d logits_t / d embedding of x_s = 0 for s > t (Jacobian check with an embedding table)."""
    m = CharRNN(6, 5, cell="lstm", embed_size=3, rngs=nnx.Rngs(0))
    x = jnp.array([[1, 2, 3, 4, 5]])
    e = m.embed(x)

    def logits_from_embeddings(e):
        xp = m.cell.project(e)
        _, hs = unroll(m.cell, m.init_state(1), xp)
        return m.out(hs)[0, :, 0]  # (T,)

    J = jax.jacrev(logits_from_embeddings)(e)[:, 0]  # (T_out, T_in, E)
    norms = np.linalg.norm(np.asarray(J), axis=-1)
    assert np.all(np.triu(norms, 1) == 0)
    assert np.all(np.diag(norms) > 0)


def test_step_loop_equals_teacher_forcing(model):
    x = jax.random.randint(jax.random.key(3), (3, 7), 0, 11)
    carry = model.init_state(3)
    outs = []
    for t in range(7):
        logits, carry = model.step(carry, x[:, t])
        outs.append(logits)
    np.testing.assert_allclose(jnp.stack(outs, 1), model(x), rtol=1e-5, atol=1e-5)


def test_scan_carries_state_across_chunks(model):
    """Reading a text in two halves, passing the carry, equals reading it whole."""
    x = jax.random.randint(jax.random.key(4), (2, 10), 0, 11)
    whole, c_whole = model.scan(x)
    a, c = model.scan(x[:, :4])
    b, c2 = model.scan(x[:, 4:], c)
    np.testing.assert_allclose(jnp.concatenate([a, b], 1), whole, rtol=1e-5, atol=1e-5)
    for u, v in zip(jax.tree.leaves(c2), jax.tree.leaves(c_whole)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


def test_loss_is_next_token_nll(model):
    x = jax.random.randint(jax.random.key(5), (2, 6), 0, 11)
    y = jnp.roll(x, -1, axis=1)
    lp = jax.nn.log_softmax(model(x))
    want = -np.mean(np.take_along_axis(np.asarray(lp), np.asarray(y)[..., None], -1))
    np.testing.assert_allclose(losses.lm_loss(model, (x, y)), want, rtol=1e-5)


def test_prefill_equals_reading_the_prompt_step_by_step(model):
    """The decoding interface: prefill (one scan over the prompt) gives the logits and state of
    feeding the prompt to step one token at a time."""
    decoding.check_decoder(model)
    x = jax.random.randint(jax.random.key(6), (2, 5), 0, 11)
    a, sa = model.prefill(model.init_state(2, 8), x)
    b, sb = decoding.prefill_by_steps(model, model.init_state(2, 8), x)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(a, model(x)[:, -1], rtol=1e-5, atol=1e-5)
    for u, v in zip(jax.tree.leaves(sa), jax.tree.leaves(sb)):
        np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------
def test_greedy_sampling_follows_the_argmax(model):
    prompt = jnp.array([[1, 2, 3], [4, 5, 6]], jnp.int32)
    out = decoding.generate(model, prompt, 6, jax.random.key(0), temperature=0.0)
    assert out.shape == (2, 6) and out.dtype == jnp.int32
    seq = prompt
    for t in range(6):  # recompute every prediction from scratch with teacher forcing
        nxt = jnp.argmax(model(seq)[:, -1], -1).astype(jnp.int32)
        np.testing.assert_array_equal(out[:, t], nxt)
        seq = jnp.concatenate([seq, nxt[:, None]], 1)


def test_sampling_matches_the_model_distribution():
    """The first sampled token's frequencies match softmax(logits / temperature)."""
    m = CharRNN(5, 4, cell="gru", rngs=nnx.Rngs(1))
    m.out.bias[...] = jnp.array([1.0, 0.0, -1.0, 0.5, 0.0])
    prompt = jnp.full((4000, 2), 3, jnp.int32)
    for tau in (1.0, 0.5):
        first = np.asarray(decoding.generate(m, prompt, 1, jax.random.key(7),
                                             temperature=tau)[:, 0])
        p = np.asarray(jax.nn.softmax(m(prompt[:1])[0, -1] / tau))
        freq = np.bincount(first, minlength=5) / len(first)
        np.testing.assert_allclose(freq, p, atol=0.03)


def test_sampling_compiles_once_and_is_reproducible(monkeypatch):
    m = CharRNN(6, 3, cell="lstm", rngs=nnx.Rngs(0))
    traces = []
    original = CharRNN.step

    def counting_step(self, state, tokens):
        traces.append(1)
        return original(self, state, tokens)

    monkeypatch.setattr(CharRNN, "step", counting_step)
    prompt = jnp.array([[1, 2]], jnp.int32)
    a = decoding.generate(m, prompt, 21, jax.random.key(1), temperature=1.0)
    b = decoding.generate(m, prompt, 21, jax.random.key(1), temperature=0.7)
    c = decoding.generate(m, prompt, 21, jax.random.key(1), temperature=1.0)
    retrained = CharRNN(6, 3, cell="lstm", rngs=nnx.Rngs(5))  # same structure, new parameters
    d = decoding.generate(retrained, prompt, 21, jax.random.key(1), temperature=1.0)
    assert len(traces) == 1, "changing the temperature, the key or the parameters must not retrace"
    np.testing.assert_array_equal(a, c)
    assert a.shape == b.shape == d.shape == (1, 21)
    assert not np.array_equal(a, d)


def test_argument_errors():
    with pytest.raises(ValueError, match="cell"):
        CharRNN(5, 4, cell="transformer", rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="vocab_size"):
        CharRNN(1, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden_size"):
        LSTMCell(3, 0, rngs=nnx.Rngs(0))
    m = CharRNN(5, 4, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="tokens"):
        m(jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match="prompt"):
        decoding.generate(m, jnp.zeros((3,), jnp.int32), 4, jax.random.key(0))
    with pytest.raises(ValueError, match="num_tokens"):
        decoding.generate(m, jnp.zeros((1, 2), jnp.int32), 0, jax.random.key(0))
    with pytest.raises(ValueError, match="temperature"):
        decoding.generate(m, jnp.zeros((1, 2), jnp.int32), 3, jax.random.key(0),
                          temperature=-1.0)
    with pytest.raises(ValueError, match="batch_size"):
        m.init_state(True, 4)  # a bool is not an integer


# --------------------------------------------------------------------------------------------
# Gradients through time
# --------------------------------------------------------------------------------------------
def test_gradient_norms_without_recurrence_reach_one_step_only():
    cell = RNNCell(3, 4, rngs=nnx.Rngs(0))
    cell.W_h[...] = jnp.zeros((4, 4))
    xp = cell.project(jax.random.normal(jax.random.key(0), (2, 6, 3)))
    g = np.asarray(input_gradient_norms(cell, xp))
    assert g[0] > 0 and np.all(g[1:] == 0)


def test_gradient_norms_of_a_linear_rnn_are_geometric():
    """tanh'(0) = 1: with tiny inputs and W_h = a I the norms go as a^k."""
    cell = RNNCell(2, 3, rngs=nnx.Rngs(0))
    cell.W_h[...] = 0.5 * jnp.eye(3)
    cell.b[...] = jnp.zeros(3)
    xp = jnp.zeros((1, 8, 3))
    g = np.asarray(input_gradient_norms(cell, xp))
    np.testing.assert_allclose(g, g[0] * 0.5 ** np.arange(8), rtol=1e-5)


# --------------------------------------------------------------------------------------------
# The memory task
# --------------------------------------------------------------------------------------------
def _oracle_log_probs(task, x):
    """ln p(x_t | x_<t) under the true source, for the targets of task.batch (sequence-aligned)."""
    L = task.segment_length
    lp = []
    for t in range(1, x.shape[1]):
        phase = t % L
        if phase == 0:
            lp.append(np.full(x.shape[0], -np.log(task.num_keys)))
        elif phase <= task.gap:
            lp.append(np.full(x.shape[0], -np.log(task.num_noise)))
        elif phase == task.gap + 1:
            lp.append(np.where(x[:, t] == task.marker, 0.0, -np.inf))
        else:
            lp.append(np.where(x[:, t] == x[:, t - L + 1], 0.0, -np.inf))
    return np.stack(lp, 1)


@settings(max_examples=10, deadline=None)
@given(K=st.integers(2, 6), N=st.integers(1, 4), gap=st.integers(1, 6), S=st.integers(1, 4),
       seed=st.integers(0, 1000))
def test_recall_task_structure_and_exact_optimum(K, N, gap, S, seed):
    from arcourse.rnn_tasks import RecallTask

    task = RecallTask(K, N, gap)
    x = np.asarray(task.sample(jax.random.key(seed), 5, S))
    L = task.segment_length
    assert x.shape == (5, S * L)
    seg = x.reshape(5, S, L)
    assert np.all(seg[..., 0] < K) and np.all(seg[..., -1] == seg[..., 0])
    assert np.all((seg[..., 1:-2] >= K) & (seg[..., 1:-2] < K + N))
    assert np.all(seg[..., -2] == task.marker)
    lp = _oracle_log_probs(task, x)
    assert np.all(np.isfinite(lp))
    np.testing.assert_allclose(-lp.mean(1), task.optimal_nll(S), rtol=1e-12)
    mask = task.recall_mask(S)
    assert mask.sum() == S and np.all(x[:, 1:][:, mask] < K)
    # a model that cannot see the key pays ln K at every recall
    extra = task.window_bound(S, gap + 1) - task.optimal_nll(S)
    assert extra == pytest.approx(S * np.log(K) / (S * L - 1))
    assert task.window_bound(S, gap + 2) == task.optimal_nll(S)
    inputs, targets = task.batch(jax.random.key(seed), 2, S)
    np.testing.assert_array_equal(inputs[:, 1:], targets[:, :-1])


def test_recall_task_argument_errors():
    from arcourse.rnn_tasks import RecallTask

    with pytest.raises(ValueError, match="num_keys"):
        RecallTask(num_keys=1)
    with pytest.raises(ValueError, match="gap"):
        RecallTask(gap=0)
    with pytest.raises(ValueError, match="num_segments"):
        RecallTask().sample(jax.random.key(0), 2, 0)


# --------------------------------------------------------------------------------------------
# The keeping gate's initial bias, and ||dh_T / dh_{T-k}||
# --------------------------------------------------------------------------------------------
def test_keep_bias_sets_the_gate_that_keeps_the_state():
    H = 4
    gru = np.asarray(GRUCell(3, H, rngs=nnx.Rngs(0)).b[...])
    np.testing.assert_array_equal(gru, 0.0)  # the default is unchanged: Flax's and PyTorch's
    gru = np.asarray(GRUCell(3, H, keep_bias=1.0, rngs=nnx.Rngs(0)).b[...])
    np.testing.assert_array_equal(gru[H:2 * H], 1.0)  # blocks r, z, n: the update gate
    np.testing.assert_array_equal(np.r_[gru[:H], gru[2 * H:]], 0.0)
    lstm = np.asarray(LSTMCell(3, H, keep_bias=0.0, rngs=nnx.Rngs(0)).b[...])
    np.testing.assert_array_equal(lstm, 0.0)
    m = CharRNN(5, H, cell="gru", keep_bias=2.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(m.cell.b[...])[H:2 * H], 2.0)
    # the weights are drawn as before: only the bias differs
    a, b = GRUCell(3, H, rngs=nnx.Rngs(0)), GRUCell(3, H, keep_bias=1.0, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(a.W_h[...], b.W_h[...])
    with pytest.raises(ValueError, match="keep_bias"):
        RNNCell(3, H, keep_bias=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="keep_bias"):
        CharRNN(5, H, cell="rnn", keep_bias=1.0, rngs=nnx.Rngs(0))


def _unrolled_jacobian_norms(step, h0, xs):
    """||dh_T / dh_{T-k}||_2 straight from jax.jacobian of k steps, without the step product."""
    hs = [h0]
    for x in xs:
        hs.append(step(hs[-1], x))
    T, out = len(xs), []
    for k in range(T + 1):
        def last_state(h, k=k):
            for x in xs[T - k:]:
                h = step(h, x)
            return h
        out.append(np.linalg.norm(np.asarray(jax.jacobian(last_state)(hs[T - k])), 2))
    return np.asarray(out)


@SETTINGS
@given(kind=st.sampled_from(["rnn", "gru"]), H=st.integers(1, 5), T=st.integers(1, 6),
       seed=st.integers(0, 10_000))
def test_state_jacobian_norms_equal_the_jacobian_of_the_unrolled_steps(kind, H, T, seed):
    cell = rnn.CELLS[kind](2, H, rngs=nnx.Rngs(seed))
    cell.W_h[...] = 1.5 * cell.W_h[...]
    xs = cell.project(jax.random.normal(jax.random.key(seed), (T, 2)))
    h0 = 0.5 * jax.random.normal(jax.random.key(seed + 1), (H,))
    got = np.asarray(rnn.state_jacobian_norms(cell.recur, h0, xs))
    assert got.shape == (T + 1,) and got[0] == 1.0
    np.testing.assert_allclose(got, _unrolled_jacobian_norms(cell.recur, h0, xs), rtol=1e-4,
                               atol=1e-6)


def test_state_jacobian_norms_of_a_linear_rnn_are_geometric():
    """tanh'(0) = 1 on a zero trajectory: with W_h = a Q (Q orthogonal) the norms are a^k."""
    q = np.linalg.qr(np.random.default_rng(0).normal(size=(4, 4)))[0]
    step = lambda h, x: rnn_step(x[None], h[None], jnp.zeros((1, 4)), 0.7 * jnp.asarray(q, jnp.float32),
                                 jnp.zeros(4))[0]
    got = np.asarray(rnn.state_jacobian_norms(step, jnp.zeros(4), jnp.zeros((6, 1))))
    np.testing.assert_allclose(got, 0.7 ** np.arange(7), rtol=1e-5)


def test_the_jacobian_grader_accepts_another_valid_method():
    from arcourse.course.grading import check

    def direct(step, h0, xs):
        return jnp.asarray(_unrolled_jacobian_norms(step, h0, xs), jnp.float32)

    assert check("rnns.jacobian_norms", direct, quiet=True).outcome == "passed"


def test_the_jacobian_graders_reference_is_the_modules():
    from arcourse.course.grading import get_exercise

    ex = get_exercise("rnns.jacobian_norms")
    for case in ex.make_cases():
        np.testing.assert_allclose(ex.reference(*case.args), rnn.state_jacobian_norms(*case.args),
                                   rtol=1e-5, atol=1e-7)
