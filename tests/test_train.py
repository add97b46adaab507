"""The training loop: it learns, it selects on validation loss, it restores the best model."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

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


def test_data_parallel_training_equals_one_device():
    """`import arcourse` gives JAX one CPU device per core; fit splits each batch over them. The
    same steps on the same batches end at the same parameters, to float tolerance."""
    import jax

    if len(jax.devices()) < 2:
        pytest.skip("one device only (JAX started before arcourse could add devices)")
    _, _, loss_fn, sample, eval_fn = _setup()
    runs = []
    for devices in (1, None):
        m = Bigram(5, nnx.Rngs(0))
        h = train.fit(m, optax.adam(0.05), loss_fn, sample, steps=60, eval_fn=eval_fn,
                      eval_every=20, devices=devices, progress=False, verbose=False)
        runs.append((h, np.asarray(m.table.embedding[...])))
        assert list(m.table.embedding[...].devices()) == [jax.devices()[0]]  # back on one device
    (h1, w1), (hn, wn) = runs
    assert h1.devices == 1 and hn.devices == min(len(jax.devices()), 16)
    np.testing.assert_allclose(wn, w1, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(hn.train_loss, h1.train_loss, rtol=1e-4)


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
