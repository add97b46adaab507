"""Chapter 00: warm-up exercises that show how grading works, and the JAX primer's warm-ups."""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

from arcourse.course.grading import Case, CheckFailure, register, translate_error


def one_hot(labels, num_classes):
    """out[i, j] = 1.0 if labels[i] == j else 0.0; shape (len(labels), num_classes)."""
    labels = np.asarray(labels)
    return (labels[:, None] == np.arange(num_classes)[None, :]).astype(np.float32)


def softmax(logits):
    r"""$\mathrm{softmax}(z)_i = e^{z_i - \max z} / \sum_j e^{z_j - \max z}$ along the last axis."""
    z = np.asarray(logits, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_sum_exp(logits):
    r"""$\ln \sum_j e^{z_j}$ along the last axis, computed as $m + \ln\sum_j e^{z_j - m}$."""
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=-1)
    return m + np.log(np.exp(z - m[..., None]).sum(axis=-1))


register(
    "welcome.one_hot",
    title="One-hot encoding",
    points=1,
    reference=one_hot,
    cases=lambda rng: [
        Case((np.array([0, 2, 1]), 3), label="three labels, three classes"),
        Case((np.array([4]), 5), label="one label, the last class"),
        Case((np.array([0, 1, 1]), 5), label="5 classes, the last two never used"),
        Case((rng.integers(0, 7, 20), 7), label="20 random labels"),
    ],
    wrong={
        "transposed (classes first)": lambda y, n: one_hot(y, n).T,
        "off by one": lambda y, n: one_hot(np.asarray(y) - 1, n),
        "class count from the labels (max + 1) instead of num_classes": lambda y, n: one_hot(
            y, int(np.max(y)) + 1),
        "class count = number of distinct labels": lambda y, n: one_hot(y, len(np.unique(y))),
    },
    hint="compare the labels, as a column, with every class index 0..num_classes-1, as a row: "
         "broadcasting gives the whole table of comparisons; num_classes (not the labels) sets "
         "its width",
)

# Logits that overflow exp() unless each row is shifted by its OWN maximum: large values, a row
# whose entries span more than the float range (shifting by its minimum or mean overflows), one
# very low entry (shifting by the minimum overflows, by the mean does not: the two are told
# apart), and two rows far apart (one maximum for the whole batch underflows a row to 0/0).
_big = np.array([[1000.0, 999.0, 990.0]])
_wide = np.array([[-800.0, -300.0, 0.0, 400.0, 800.0]])
_low = np.array([[-1000.0, 0.0, 1.0, 2.0]])
_apart = np.array([[1000.0, 999.0, 990.0], [-1000.0, -1001.0, -1010.0]])


def _quiet(f):
    """A wrong answer whose overflow is the point: without NumPy's warnings about it."""
    def wrong(*args):
        with np.errstate(all="ignore"):
            return f(*args)
    return wrong


def _shift_softmax(shift):
    def wrong(z):
        z = np.asarray(z, dtype=np.float64)
        with np.errstate(all="ignore"):
            e = np.exp(z - shift(z))
            return e / e.sum(-1, keepdims=True)
    return wrong


def _shift_lse(shift):
    def wrong(z):
        z = np.asarray(z, dtype=np.float64)
        m = shift(z)
        with np.errstate(all="ignore"):
            return m[..., 0] + np.log(np.exp(z - m).sum(-1))
    return wrong


_row_min = lambda z: z.min(-1, keepdims=True)  # noqa: E731
_row_mean = lambda z: z.mean(-1, keepdims=True)  # noqa: E731
_batch_max = lambda z: np.full(z.shape[:-1] + (1,), z.max())  # noqa: E731

_STABLE_CASES = lambda rng: [  # noqa: E731
    Case((_big,), label="large logits (exp overflows without the max)"),
    Case((_wide,), label="a wide row, -800..800 (a shift by the row's min or mean overflows)"),
    Case((_low,), label="one entry at -1000 (a shift by the row's minimum overflows)"),
    Case((_apart,), label="two rows 2000 apart (one max for the whole batch underflows a row)"),
]

register(
    "welcome.softmax",
    title="A numerically stable softmax",
    points=1,
    reference=softmax,
    cases=lambda rng: [
        Case((np.array([0.0, 1.0, 2.0]),), label="small logits"),
        Case((rng.normal(size=(4, 6)),), label="a batch of 4 rows"),
        *_STABLE_CASES(rng),
    ],
    wrong={
        "no max subtraction (overflows to NaN)": _quiet(
            lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True)),
        "normalised over the wrong axis": _quiet(lambda z: (lambda e: e / e.sum(0, keepdims=True))(
            np.exp(np.asarray(z) - np.max(z)))),
        "shifted by the row's minimum instead of its maximum": _shift_softmax(_row_min),
        "shifted by the row's mean instead of its maximum": _shift_softmax(_row_mean),
        "shifted by one maximum for the whole batch, not each row's": _shift_softmax(_batch_max),
    },
    hint="subtract from each row its own largest logit before exponentiating (keepdims=True keeps "
         "the row axis so it broadcasts): the result is unchanged and nothing overflows",
)

register(
    "welcome.log_sum_exp",
    title="log-sum-exp",
    points=1,
    reference=log_sum_exp,
    cases=lambda rng: [
        Case((np.array([0.0, 0.0]),), label="ln 2"),
        Case((rng.normal(size=(3, 5)) * 10,), label="a batch of 3 rows"),
        Case((np.array([-1000.0, -1001.0]),), label="very negative logits (exp underflows)"),
        *_STABLE_CASES(rng),
    ],
    wrong={
        "naive log(sum(exp))": _quiet(lambda z: np.log(np.exp(np.asarray(z)).sum(-1))),
        "forgets to add the max back": lambda z: np.log(
            np.exp(np.asarray(z) - np.max(z, -1, keepdims=True)).sum(-1)),
        "shifted by the row's minimum instead of its maximum": _shift_lse(_row_min),
        "shifted by the row's mean instead of its maximum": _shift_lse(_row_mean),
        "shifted by one maximum for the whole batch, not each row's": _shift_lse(_batch_max),
    },
    hint="with m the largest entry of EACH row, ln sum_j e^{z_j} = m + ln sum_j e^{z_j - m}: "
         "every exponent is then at most 0, and the largest term is exactly 1",
)


# ============================================================================================
# The primer's warm-ups (JAX)
# ============================================================================================
def _default_run(ex, fn):
    """Compare ``fn`` with the reference on every case, as an exercise without a ``test`` does."""
    return dataclasses.replace(ex, test=None).run(fn)


def _under_jit(fn):
    """``fn`` compiled with ``jax.jit``; a tracing error becomes a failure that explains it."""
    compiled = jax.jit(fn)

    def call(*args):
        try:
            return compiled(*args)
        except NotImplementedError:
            raise
        except Exception as e:  # noqa: BLE001 - tracing errors of the learner's code
            name = type(e).__name__
            if "TracerArrayConversion" in name:
                said = ("a numpy function (np.*) was given a traced array: inside jit, compute "
                        "with jax.numpy (jnp.*) instead.")
            elif any(w in name for w in ("Tracer", "Concret")):
                said = translate_error(e) or "it needs a value that jit does not know yet."
            else:
                raise
            raise CheckFailure(f"your function does not run under jax.jit ({name}): "
                               f"{said}") from None
    return call


# --- 4. a pytree-wide update ----------------------------------------------------------------
def sgd_step(params, grads, learning_rate):
    """One step of gradient descent on every leaf: new = param - learning_rate * grad."""
    return jax.tree_util.tree_map(lambda p, g: p - learning_rate * g, params, grads)


def _tree(rng, *shapes):
    return [rng.normal(size=s).astype(np.float32) for s in shapes]


def _sgd_cases(rng):
    w, b, gw, gb = _tree(rng, (2, 3), (3,), (2, 3), (3,))
    flat = Case(({"w": w, "b": b}, {"w": gw, "b": gb}, 0.1), label="a dict of two arrays")
    e, w1, b1, w2, b2 = _tree(rng, (5, 2), (2, 2), (2,), (2, 4), (4,))
    ge, gw1, gb1, gw2, gb2 = _tree(rng, (5, 2), (2, 2), (2,), (2, 4), (4,))
    nested = Case(({"embed": e, "layers": [{"w": w1, "b": b1}, {"w": w2, "b": b2}]},
                   {"embed": ge, "layers": [{"w": gw1, "b": gb1}, {"w": gw2, "b": gb2}]}, 0.01),
                  label="nested: a dict holding a list of dicts")
    (x,), (g,) = _tree(rng, (4,)), _tree(rng, (4,))
    return [flat, nested, Case((x, g, 1.0), label="a single array (a tree with one leaf)"),
            Case(((w, b), (gw, gb), 0.5), label="a tuple of two arrays")]


def _tree_op(f):
    def wrong(p, g, lr):
        return jax.tree_util.tree_map(lambda a, b: f(a, b, lr), p, g)
    return wrong


register(
    "welcome.sgd_step",
    title="A gradient step on a whole pytree (tree_map)",
    points=1,
    reference=sgd_step,
    cases=_sgd_cases,
    wrong={
        "adds the gradient (climbs the loss)": _tree_op(lambda p, g, lr: p + lr * g),
        "forgets the learning rate": _tree_op(lambda p, g, lr: p - g),
        "returns the step, not the new parameters": _tree_op(lambda p, g, lr: -lr * g),
    },
    hint="jax.tree_util.tree_map(f, tree_a, tree_b) calls f once per leaf position, with the "
         "leaf of each tree at that position, and rebuilds the structure from what f returns",
)


# --- 5. jnp.where instead of an if --------------------------------------------------------------
def entropy(probs):
    r"""$H(p) = -\sum_x p_x \ln p_x$ along the last axis, with $0 \ln 0 = 0$; works under jit."""
    p = jnp.asarray(probs)
    safe = jnp.where(p > 0, p, 1.0)
    return -jnp.sum(jnp.where(p > 0, p * jnp.log(safe), 0.0), axis=-1)


def _entropy_cases(rng):
    rows = rng.dirichlet(np.full(7, 0.5), size=5)
    rows[:, 2] = 0.0
    rows[1, 5] = 0.0
    rows /= rows.sum(1, keepdims=True)
    return [
        Case((np.full(4, 0.25, np.float32),), label="uniform over 4: ln 4"),
        Case((np.array([0.5, 0.5, 0.0, 0.0], np.float32),), label="two zeros: ln 2 (0 ln 0 = 0)"),
        Case((np.eye(3, dtype=np.float32),), label="one-hot rows: entropy 0"),
        Case((rows.astype(np.float32),), label="5 random rows with zeros"),
        Case((rng.dirichlet(np.ones(4), size=(2, 3)).astype(np.float32),),
             label="a (2, 3, 4) batch: one entropy per row"),
    ]


def _entropy_test(fn, ex):
    return _default_run(ex, _under_jit(fn))


def _entropy_masked(p):
    p = jnp.asarray(p)
    q = p[p > 0]  # boolean-mask indexing: the shape depends on the values
    return -jnp.sum(q * jnp.log(q))


register(
    "welcome.entropy",
    title="Entropy with 0 ln 0 = 0, under jit (jnp.where)",
    points=1,
    reference=entropy,
    cases=_entropy_cases,
    test=_entropy_test,
    rtol=1e-4,
    atol=1e-5,
    wrong={
        "no 0 ln 0 = 0 (NaN where a probability is zero)": lambda p: -jnp.sum(
            p * jnp.log(p), axis=-1),
        "log base 2 (bits, not nats)": lambda p: entropy(p) / np.log(2.0),
        "sums over the first axis": lambda p: -jnp.sum(
            jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=0),
        "boolean-mask indexing p[p > 0] (fails under jit)": _entropy_masked,
    },
    hint="compute p ln p for every entry, then let jnp.where(condition, a, b) choose 0 where the "
         "probability is 0 (give the log a safe argument there, so no NaN is ever made); sum "
         "along the last axis. A Python if or p[p > 0] needs values that jit does not have",
)


# --- 6. a scan ------------------------------------------------------------------------------------
def moving_average(xs, decay):
    r"""$h_t = \text{decay}\, h_{t-1} + (1 - \text{decay})\, x_t$ with $h_0 = 0$, over axis 0."""
    xs = jnp.asarray(xs)

    def update(h, x):
        h = decay * h + (1.0 - decay) * x
        return h, h

    _, hs = jax.lax.scan(update, jnp.zeros_like(xs[0]), xs)
    return hs


def _ema_variant(init_first=False, before=False, swap=False):
    def wrong(xs, decay):
        a, b = (1.0 - decay, decay) if swap else (decay, 1.0 - decay)
        h = xs[0] if init_first else jnp.zeros_like(xs[0])
        out = [h] if init_first else []
        for x in xs[1:] if init_first else xs:
            if before:
                out.append(h)
            h = a * h + b * x
            if not before:
                out.append(h)
        return jnp.stack(out)
    return wrong


register(
    "welcome.moving_average",
    title="An exponential moving average with lax.scan",
    points=1,
    reference=moving_average,
    cases=lambda rng: [
        Case((np.array([1.0, 1.0, 1.0, 1.0], np.float32), 0.5), label="constant 1, decay 0.5"),
        Case((rng.normal(size=12).astype(np.float32), 0.9), label="12 steps, decay 0.9"),
        Case((rng.normal(size=(6, 3)).astype(np.float32), 0.7),
             label="(6, 3): 6 steps of a 3-vector, decay 0.7"),
    ],
    test=lambda fn, ex: _default_run(ex, _under_jit(fn)),
    rtol=1e-5,
    atol=1e-6,
    wrong={
        "outputs h_{t-1}, the state before each update": _ema_variant(before=True),
        "decay and 1 - decay swapped": _ema_variant(swap=True),
        "starts from h_1 = x_1 instead of h_0 = 0": _ema_variant(init_first=True),
    },
    hint="jax.lax.scan(f, init, xs) calls f(carry, x) once per row of xs and stacks the second "
         "thing f returns; here the carry is h_{t-1}, and the new h is both the next carry and "
         "this step's output",
)


# --- 7. a sampler that splits its key -------------------------------------------------------
def random_walk(key, logits, start, length):
    """A Markov chain: x_0 = start, x_t ~ categorical(logits[x_{t-1}]); returns x_1..x_length."""
    def move(x, step_key):
        nxt = jax.random.categorical(step_key, logits[x])
        return nxt, nxt

    _, path = jax.lax.scan(move, jnp.asarray(start, jnp.int32), jax.random.split(key, length))
    return path


_WALK = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3], [0.3, 0.3, 0.4]])


def _walk_test(fn, ex) -> str:
    logits = jnp.log(jnp.asarray(_WALK, jnp.float32))
    key = jax.random.key(0)
    out = np.asarray(fn(key, logits, 1, 6))
    if out.shape != (6,):
        raise CheckFailure(f"length 6: expected shape (6,) (x_1..x_6, not the start), got {out.shape}")
    if not np.issubdtype(out.dtype, np.integer):
        raise CheckFailure(f"expected integer symbols, got dtype {out.dtype}")
    again = np.asarray(fn(key, logits, 1, 6))
    if not np.array_equal(out, again):
        raise CheckFailure("the same key gave two different walks: draw only from the key you "
                           "are given (jax.random), never from a global generator")
    n, length, V = 4000, 3, 3
    keys = jax.random.split(jax.random.key(1), n)
    walks = np.asarray(jax.jit(jax.vmap(lambda k: fn(k, logits, 0, length)))(keys))
    if walks.min() < 0 or walks.max() >= V:
        raise CheckFailure(f"symbols must lie in 0..{V - 1}, got {walks.min()}..{walks.max()}")
    counts = np.bincount(np.ravel_multi_index(walks.T, (V,) * length), minlength=V**length)
    exact = np.array([_WALK[0, a] * _WALK[a, b] * _WALK[b, c]
                      for a, b, c in itertools.product(range(V), repeat=length)])
    from scipy import stats  # imported here: scipy takes ~0.7 s to import
    _, pval = stats.chisquare(counts, exact * n)
    if pval < 1e-4:
        worst = int(np.argmax(np.abs(counts - exact * n) / np.sqrt(exact * n)))
        walk = tuple(int(v) for v in np.unravel_index(worst, (V,) * length))
        raise CheckFailure(
            f"the walks do not follow the chain: over {n} keys, walks of 3 steps from 0, the walk "
            f"{walk} came up {int(counts[worst])} times where {exact[worst] * n:.0f} were expected "
            f"(chi-square p = {pval:.2g}). Is every step drawn with a fresh key, from the row "
            f"of the current symbol, with logits (not probabilities)?")
    return f"{n} walks follow the chain (chi-square p = {pval:.2f}); the same key repeats its walk"


def _walk_variant(reuse=False, from_start=False, probs=False, shifted=False):
    def wrong(key, logits, start, length):
        keys = jax.random.split(key, length)
        x = jnp.asarray(start, jnp.int32)
        path = []
        for t in range(length):
            row = logits[start] if from_start else logits[x]
            row = jax.nn.softmax(row) if probs else row
            nxt = jax.random.categorical(key if reuse else keys[t], row)
            path.append(x if shifted else nxt)
            x = nxt
        return jnp.stack(path)
    return wrong


register(
    "welcome.random_walk",
    title="A sampler that splits its key",
    points=1,
    reference=random_walk,
    test=_walk_test,
    wrong={
        "reuses one key for every step": _walk_variant(reuse=True),
        "ignores the current symbol (every step from the start's row)": _walk_variant(from_start=True),
        "passes probabilities where jax.random.categorical wants logits": _walk_variant(probs=True),
        "returns x_0..x_{length-1} (the start, not the last step)": _walk_variant(shifted=True),
    },
    hint="jax.random.split(key, n) gives n independent keys: one per step. Carry the current "
         "symbol from step to step (a Python loop or lax.scan), and draw the next one from the "
         "table's row of the current symbol with jax.random.categorical, which takes logits",
)
