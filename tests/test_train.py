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
    tokens = jnp.asarray(src.sample(20_000, seed=1))
    valid = src.sample(5_000, seed=2)

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
    with pytest.raises(KeyError, match="select_on"):
        train.fit(Bigram(5, nnx.Rngs(0)), optax.adam(0.1), loss_fn, sample, steps=10,
                  eval_fn=eval_fn, select_on="accuracy", progress=False)


def test_divergence_is_reported():
    _, _, loss_fn, sample, _ = _setup()
    with pytest.raises(FloatingPointError, match="non-finite"):
        train.fit(Bigram(5, nnx.Rngs(0)), optax.sgd(0.1), lambda m, b: loss_fn(m, b) * jnp.nan,
                  sample, steps=20,
                  progress=False, verbose=False)
