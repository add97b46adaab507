"""The training loop: it learns, it selects on validation loss, it restores the best model."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import arcourse
from arcourse import data, metrics, train


class Bigram(nnx.Module):
    def __init__(self, V, rngs):
        self.table = nnx.Embed(V, V, rngs=rngs)

    def __call__(self, x):
        return self.table(x)


def _setup(seed=0):
    src = data.MarkovSource.random(order=1, vocab_size=5, concentration=0.3, seed=seed)
    tokens = jnp.asarray(src.sample(1, 20_000))
    valid = src.sample(2, 5_000)

    def loss_fn(m, batch):
        x, y = batch
        return metrics.nll_from_logits(m(x), y)

    def eval_fn(m):
        return {"loss": metrics.nll_from_logits(m(jnp.asarray(valid[:-1])), jnp.asarray(valid[1:]))}

    return src, valid, loss_fn, (lambda k: data.random_windows(k, tokens, 16, 32)), eval_fn


def test_fit_learns_a_bigram_to_the_source_entropy():
    src, valid, loss_fn, sample, eval_fn = _setup()
    model = Bigram(5, nnx.Rngs(0))
    hist = train.fit(model, optax.adam(0.05), loss_fn, sample, steps=600, eval_fn=eval_fn,
                     eval_every=100, progress=False, verbose=False)
    true = -src.conditional_log_probs(valid).mean()
    assert hist.best_value - true < 0.02
    assert len(hist.train_loss) == 600 and hist.eval_steps[-1] == 600
    # the model object now holds the selected parameters
    assert abs(float(eval_fn(model)["loss"]) - hist.best_value) < 1e-5


def test_fit_restores_the_best_step_not_the_last():
    _, _, loss_fn, sample, eval_fn = _setup()
    model = Bigram(5, nnx.Rngs(0))
    # a learning rate that learns for 200 steps, then turns negative: gradient ascent
    sched = optax.join_schedules([optax.constant_schedule(0.5), optax.constant_schedule(-1.0)], [200])
    hist = train.fit(model, optax.sgd(sched), loss_fn, sample, steps=400, eval_fn=eval_fn,
                     eval_every=50, progress=False, verbose=False)
    assert hist.best_step <= 250
    assert abs(float(eval_fn(model)["loss"]) - hist.best_value) < 1e-5
    assert min(hist.evals["loss"]) == hist.best_value


def test_fit_is_deterministic():
    _, _, loss_fn, sample, eval_fn = _setup()
    runs = []
    for _ in range(2):
        m = Bigram(5, nnx.Rngs(0))
        runs.append(train.fit(m, optax.adam(0.05), loss_fn, sample, steps=50, eval_fn=eval_fn,
                              progress=False, verbose=False).train_loss)
    np.testing.assert_array_equal(runs[0], runs[1])


def test_fit_names_bad_arguments():
    _, _, loss_fn, sample, eval_fn = _setup()
    with pytest.raises(ValueError, match="steps"):
        train.fit(Bigram(5, nnx.Rngs(0)), optax.adam(0.1), loss_fn, sample, steps=0)
    with pytest.raises(ValueError, match="steps must be an integer"):  # a bool is not an integer
        train.fit(Bigram(5, nnx.Rngs(0)), optax.adam(0.1), loss_fn, sample, steps=True)
    with pytest.raises(ValueError, match="eval_every"):
        train.fit(Bigram(5, nnx.Rngs(0)), optax.adam(0.1), loss_fn, sample, steps=10,
                  eval_every=True)
    with pytest.raises(KeyError, match="select_on"):
        train.fit(Bigram(5, nnx.Rngs(0)), optax.adam(0.1), loss_fn, sample, steps=10,
                  eval_fn=eval_fn, select_on="accuracy", progress=False)


def test_divergence_is_reported():
    _, _, loss_fn, sample, _ = _setup()
    with pytest.raises(FloatingPointError, match="non-finite"):
        train.fit(Bigram(5, nnx.Rngs(0)), optax.sgd(0.1), lambda m, b: loss_fn(m, b) * jnp.nan,
                  sample, steps=20,
                  progress=False, verbose=False)


def test_data_parallel_training_equals_one_device(monkeypatch):
    """`import arcourse` gives JAX one CPU device per core; fit splits each batch over them. The
    same steps on the same batches end at the same parameters, to float tolerance."""
    import jax

    if len(jax.devices()) < 2:
        pytest.skip("one device only (JAX started before arcourse could add devices)")
    monkeypatch.delenv("ARCOURSE_QUICK", raising=False)  # full mode: every core by default
    _, _, loss_fn, sample, eval_fn = _setup()
    runs = []
    for devices in (1, None):
        m = Bigram(5, nnx.Rngs(0))
        h = train.fit(m, optax.adam(0.05), loss_fn, sample, steps=60, eval_fn=eval_fn,
                      eval_every=20, devices=devices, progress=False, verbose=False)
        runs.append((h, np.asarray(m.table.embedding[...])))
        assert list(m.table.embedding[...].devices()) == [jax.devices()[0]]  # back on one device
    (h1, w1), (hn, wn) = runs
    assert h1.devices == 1 and hn.devices == len(train.data_parallel_devices(
        jax.eval_shape(sample, jax.random.key(0))))
    assert hn.devices >= 2
    np.testing.assert_allclose(wn, w1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hn.train_loss, h1.train_loss, rtol=1e-4)


def test_quick_mode_trains_on_one_device_unless_told_otherwise(monkeypatch):
    """Quick mode's runs are a few steps: a partitioned program's compilation would cost more than
    the second core saves, so the default is the first device; an explicit count is obeyed."""
    import jax

    batch = (jax.ShapeDtypeStruct((8, 4), np.int32),)
    monkeypatch.setenv("ARCOURSE_QUICK", "1")
    assert train.data_parallel_devices(batch) == [jax.devices()[0]]
    if len(jax.devices()) >= 2:
        assert len(train.data_parallel_devices(batch, 2)) == 2
        monkeypatch.delenv("ARCOURSE_QUICK")
        assert len(train.data_parallel_devices(batch)) >= 2


def test_a_batch_that_does_not_divide_falls_back_cleanly():
    import jax

    shapes = (jax.ShapeDtypeStruct((6, 4), np.int32), jax.ShapeDtypeStruct((6,), np.int32))
    devs = [object()] * 4  # stand-ins: only their number matters here
    assert len(train.data_parallel_devices(shapes, devs)) == 3  # the most that divide 6
    assert len(train.data_parallel_devices((jax.ShapeDtypeStruct((7, 2), np.int32),), devs)) == 1
    assert len(train.data_parallel_devices((jax.ShapeDtypeStruct((), np.int32),), devs)) == 1
    with pytest.raises(ValueError, match="devices"):
        train.fit(Bigram(5, nnx.Rngs(0)), optax.adam(0.1), lambda m, b: 0.0, lambda k: (),
                  steps=1, devices=True)


@pytest.mark.parametrize("quick,user_flags,want", [
    ("1", "", " ".join(arcourse.QUICK_XLA_FLAGS)),
    ("", "", ""),
    ("1", "--xla_backend_optimization_level=2", "--xla_backend_optimization_level=2"),
])
def test_quick_mode_compiles_fast(quick, user_flags, want):
    """`import arcourse` in quick mode passes XLA its compile-fast flags before JAX's CPU backend
    starts; full mode, and a setting the user chose, are left alone. The flags reach the backend
    (XLA aborts on a flag it does not know), and the program gives the default build's value."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("ARCOURSE_QUICK", "XLA_FLAGS")}
    env.update(ARCOURSE_QUICK=quick, XLA_FLAGS=user_flags, JAX_PLATFORMS="cpu")
    code = ("import os, jax._src.xla_bridge as xb, arcourse\n"
            "assert not xb._backends, 'the backend started before the flags were set'\n"
            "import jax, jax.numpy as jnp\n"
            "print(os.environ.get('XLA_FLAGS', ''))\n"
            "print(float(jnp.sum(jnp.tanh(jnp.arange(100.0) / 10) * 3.0 + 1.0)))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    flags, value = out.stdout.split("\n")[:2]
    assert flags.strip() == want
    want_value = np.sum(np.tanh(np.arange(100.0) / 10) * 3.0 + 1.0)
    assert float(value) == pytest.approx(float(want_value), rel=1e-5)


def test_the_pinned_jaxlib_is_one_the_quick_mode_flags_were_checked_on():
    """An unknown XLA flag aborts the process, so quick mode passes its flags only to the jaxlib
    releases they were checked on. Upgrading jaxlib fails here until someone re-checks them."""
    from importlib.metadata import version

    assert version("jaxlib").startswith(arcourse.QUICK_XLA_FLAGS_CHECKED_ON), (
        f"jaxlib {version('jaxlib')}: run test_quick_mode_compiles_fast with it, then add its "
        "release to arcourse.QUICK_XLA_FLAGS_CHECKED_ON (or drop a flag it no longer knows)")


def test_has_convolution_finds_one_at_any_depth():
    import jax

    w, x = jnp.ones((3, 3, 2, 4)), jnp.ones((1, 5, 5, 2))

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def in_scan_grad_and_cond(w):
        def body(c, _):
            g = jax.grad(lambda w: jnp.sum(conv(x, w)))(w)
            return jax.lax.cond(c > 0, lambda: c + g.sum(), lambda: c), None
        return jax.lax.scan(body, 1.0, None, length=2)[0]

    assert train.has_convolution(conv, x, w)
    assert train.has_convolution(in_scan_grad_and_cond, w)
    assert train.has_convolution(jax.jit(lambda w: conv(x, w)), w)
    assert not train.has_convolution(lambda w: jnp.tanh(w @ w.T.reshape(4, -1)).sum(),
                                     w.reshape(-1, 4))


class _TinyConvNet(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(1, 8, (3, 3), rngs=rngs)
        self.out = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.out(nnx.relu(self.conv(x)).mean((1, 2)))[:, 0]


def test_quick_mode_runs_a_convolutional_step_per_call_with_the_same_result(monkeypatch):
    """In quick mode a step with a convolution runs as one compiled call per step (XLA's CPU loop
    would compute its weight gradient with a slow generic loop nest): the same steps on the same
    batches give the same parameters and losses as the loop inside jit of full mode."""
    import jax

    def sample(key):
        x = jax.random.normal(key, (8, 6, 6, 1))
        return x, x.mean((1, 2, 3))

    def loss_fn(m, batch):
        x, y = batch
        return jnp.mean((m(x) - y) ** 2)

    runs = []
    for quick in ("", "1"):
        monkeypatch.setenv("ARCOURSE_QUICK", quick)
        m = _TinyConvNet(nnx.Rngs(0))
        h = train.fit(m, optax.adam(1e-2), loss_fn, sample, steps=25, eval_every=10, devices=1,
                      progress=False, verbose=False)
        runs.append((h.train_loss, np.asarray(m.conv.kernel[...])))
    (loss_full, w_full), (loss_quick, w_quick) = runs
    assert len(loss_quick) == len(loss_full) == 25
    np.testing.assert_allclose(loss_quick, loss_full, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(w_quick, w_full, rtol=1e-4, atol=1e-6)
    assert loss_full[-1] < loss_full[0]  # it trains
