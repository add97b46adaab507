"""Chapter 01: the chain rule and exact likelihood."""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from arcourse import counting
from arcourse.course.grading import Case, CheckFailure, assert_matches, register
from arcourse.data import MarkovSource

_SOURCE = MarkovSource.random(order=2, vocab_size=3, concentration=0.4, seed=7)


def _uniform(v):
    return lambda prefix: np.full(v, 1.0 / v)


# --- 1. the joint log-probability through the chain rule ------------------------------------
def joint_log_prob(cond_probs, seq):
    r"""$\ln p(x_{1:T}) = \sum_{t=1}^{T} \ln p(x_t \mid x_{<t})$, one conditional at a time."""
    return float(sum(math.log(cond_probs(seq[:t])[seq[t]]) for t in range(len(seq))))


def _joint_cases(rng):
    return [
        Case((_SOURCE.next_symbol_probs, np.array([0, 1, 2, 2, 1])), label="a 5-symbol sequence"),
        Case((_SOURCE.next_symbol_probs, np.array([2])), label="a single symbol"),
        Case((_uniform(4), rng.integers(0, 4, 7)), label="uniform model, 7 symbols"),
        Case((_SOURCE.next_symbol_probs, _SOURCE.sample(3, 1500)),
             label="1500 symbols (the product of probabilities underflows)"),
    ]


def _log_of_product(f, s):
    with np.errstate(divide="ignore"):
        return float(np.log(np.prod([f(s[:t])[s[t]] for t in range(len(s))])))


register(
    "chain_rule.joint_log_prob",
    title="The joint log-probability by the chain rule",
    points=2,
    reference=joint_log_prob,
    cases=_joint_cases,
    rtol=1e-6,
    wrong={
        "skips the first symbol": lambda f, s: float(
            sum(math.log(f(s[:t])[s[t]]) for t in range(1, len(s)))),
        "log of the product (underflows)": lambda f, s: _log_of_product(f, s),
        "conditions on the symbol itself": lambda f, s: float(
            sum(math.log(f(s[: t + 1])[s[t]]) for t in range(len(s)))),
        "averages instead of summing (that is minus the NLL per symbol)": lambda f, s: float(
            np.mean([math.log(f(s[:t])[s[t]]) for t in range(len(s))])),
        "log base 2 (bits, not nats)": lambda f, s: float(
            sum(math.log2(f(s[:t])[s[t]]) for t in range(len(s)))),
    },
    hint="every position t = 0..T-1 contributes the natural log of the probability the model "
         "gives to seq[t] after the prefix of the symbols before it (empty for t = 0); add them",
)


# --- 2. counting transitions ------------------------------------------------------------------
def _as_float_counts(fn):
    """The learner's counts as floats: integer counts are as right as float ones."""
    def counts(*args):
        out = fn(*args)
        arr = np.asarray(out) if out is not None else None
        if arr is not None and arr.dtype.kind in "iu":
            return arr.astype(np.float64)
        return out
    return counts


def _count_test(fn, ex):
    return dataclasses.replace(ex, test=None).run(_as_float_counts(fn))


def _padded_counts(s, k, v):
    """Counts the first k positions too, with a context padded by symbol 0."""
    return counting.count_transitions(np.concatenate([np.zeros(k, np.int64), s]), k, v)


def _counts_skip_last(s, k, v):
    return counting.count_transitions(np.asarray(s)[:-1], k, v)


def _counts_vocab_from_data(s, k, v):
    return counting.count_transitions(s, k, int(np.max(s)) + 1)


register(
    "chain_rule.count_transitions",
    title="Counting (context, next symbol) pairs",
    points=2,
    reference=counting.count_transitions,
    cases=lambda rng: [
        Case((np.array([0, 1, 0, 1, 1]), 1, 2), label="order 1, binary"),
        Case((np.array([0, 1, 2, 0, 1, 2, 0]), 2, 3), label="order 2, 3 symbols"),
        Case((rng.integers(0, 4, 200), 2, 4), label="order 2, 200 random symbols"),
        Case((np.array([1, 0, 1]), 0, 2), label="order 0 (unigram counts)"),
        Case((np.array([2, 1, 2, 2, 0, 2]), 1, 4), label="order 1, symbol 3 of 4 never occurs"),
        Case((np.array([1, 0]), 2, 2), label="a sequence no longer than the order: no pairs"),
    ],
    test=_count_test,
    wrong={
        "context includes the symbol being predicted": lambda s, k, v: counting.count_transitions(
            np.concatenate([s[1:], s[:1]]), k, v),
        "newest context symbol most significant": lambda s, k, v: (
            counting.count_transitions(s, k, v).reshape((v,) * k + (v,))
            .transpose(tuple(range(k))[::-1] + (k,)).reshape(v**k, v)),
        "also counts the first `order` positions (context padded with 0)": _padded_counts,
        "skips the last position": _counts_skip_last,
    },
    hint="only positions t >= order have a full context (the order symbols just before t); read "
         "that context as a number in base V, the oldest symbol the most significant digit, "
         "and add one to the entry of that row and the column of seq[t]",
)


# --- 3. smoothed estimates --------------------------------------------------------------------
def _smooth_variant(f):
    def wrong(c, a):
        c = np.asarray(c, dtype=np.float64)
        return f(c, a)
    return wrong


register(
    "chain_rule.smoothed_conditional",
    title="Add-alpha smoothed conditional probabilities",
    points=2,
    reference=counting.smoothed_conditional,
    cases=lambda rng: [
        Case((np.array([[3.0, 1.0, 0.0], [0.0, 0.0, 5.0]]), 1.0), label="add-one"),
        Case((rng.integers(0, 9, (6, 4)).astype(float), 0.5), label="add-half, 6 contexts"),
        Case((np.array([[2.0, 2.0], [1.0, 3.0]]), 0.0), label="alpha 0: maximum likelihood"),
        Case((np.array([[4, 0, 0, 1], [0, 0, 0, 0], [1, 1, 1, 1]]), 0.1),
             label="integer counts, a context never seen (its row: uniform)"),
        Case((rng.integers(0, 50, (2, 5)), 2.0), label="integer counts, add-two, 2 contexts of 5"),
    ],
    wrong={
        "forgets the alpha*V in the denominator": _smooth_variant(
            lambda c, a: (c + a) / (c.sum(1, keepdims=True) + a)),
        "normalises over contexts (axis 0)": _smooth_variant(
            lambda c, a: (c + a) / (c + a).sum(0, keepdims=True)),
        "V taken as the number of contexts (axis 0)": _smooth_variant(
            lambda c, a: (c + a) / (c.sum(1, keepdims=True) + a * c.shape[0])),
        "divides by the whole table's total": _smooth_variant(
            lambda c, a: (c + a) / (c + a).sum()),
    },
    hint="each row c is one distribution over the V next symbols: add alpha to every entry, and "
         "divide by the row's count plus alpha once per symbol, so the row sums to one",
)


# --- 4. units -----------------------------------------------------------------------------------
def nll_units(total_log_prob, num_symbols):
    """(NLL in nats per symbol, perplexity, bits per symbol) from a total log-probability in nats."""
    nll = -total_log_prob / num_symbols
    return nll, math.exp(nll), nll / math.log(2)


def _units_test(fn, ex):
    def as_tuple(*args):
        out = fn(*args)
        if isinstance(out, np.ndarray | list) and np.shape(out) == (3,):
            return tuple(out)
        return out
    return dataclasses.replace(ex, test=None).run(as_tuple)


register(
    "chain_rule.nll_units",
    title="NLL, perplexity and bits per symbol",
    points=1,
    reference=nll_units,
    test=_units_test,
    cases=lambda rng: [
        Case((-100.0 * math.log(4), 100), label="uniform over 4 symbols: 2 bits, perplexity 4"),
        Case((-1234.5, 1000), label="1000 symbols"),
        Case((float(-rng.uniform(10, 500)), int(rng.integers(5, 300))), label="random"),
    ],
    wrong={
        "perplexity as 2**nll_nats": lambda lp, n: (-lp / n, 2 ** (-lp / n), -lp / n / math.log(2)),
        "bits as nats * ln 2": lambda lp, n: (-lp / n, math.exp(-lp / n), -lp / n * math.log(2)),
        "forgets the minus sign": lambda lp, n: (lp / n, math.exp(lp / n), lp / n / math.log(2)),
        "does not divide by the number of symbols": lambda lp, n: (
            -lp, math.exp(-lp / n), -lp / math.log(2)),
    },
    hint="perplexity = exp(NLL in nats) = 2**(bits per symbol)",
)


# --- 5. ancestral sampling --------------------------------------------------------------------
def ancestral_sample(cond_probs, length, rng):
    """Draw x_1, ..., x_length one at a time, each from p(x_t | the symbols drawn so far)."""
    seq = []
    for _ in range(length):
        p = cond_probs(np.array(seq, dtype=np.int64))
        seq.append(int(rng.choice(len(p), p=p)))
    return np.array(seq, dtype=np.int64)


def _test_sampler(fn, ex) -> str:
    src = _SOURCE
    first, again = (np.asarray(fn(src.next_symbol_probs, 8, np.random.default_rng(5)))
                    for _ in range(2))
    if first.shape != again.shape or not np.array_equal(first, again):
        raise CheckFailure("two generators with the same seed gave different sequences: draw "
                           "every symbol with the `rng` you are given (rng.choice), not with "
                           "np.random's global generator")
    rng = np.random.default_rng(2024)
    n, length = 3000, 3
    counts = np.zeros(src.vocab_size**length)
    for i in range(n):
        s = np.asarray(fn(src.next_symbol_probs, length, rng))
        if i == 0:
            if s.shape != (length,):
                raise CheckFailure(f"expected a sequence of shape ({length},), got shape {s.shape}")
            if not np.issubdtype(s.dtype, np.integer):
                raise CheckFailure(f"expected integer symbols, got dtype {s.dtype}")
        if s.min() < 0 or s.max() >= src.vocab_size:
            raise CheckFailure(f"symbols must lie in 0..{src.vocab_size - 1}, got {s}")
        counts[int(np.ravel_multi_index(tuple(s), (src.vocab_size,) * length))] += 1
    exact = np.array([math.exp(src.log_prob(x)) for x in src.all_sequences(length)])
    from scipy import stats  # imported here: scipy takes ~0.7 s to import
    chi2, pval = stats.chisquare(counts, exact * n)
    if pval < 1e-4:
        worst = int(np.argmax(np.abs(counts - exact * n) / np.sqrt(exact * n + 1e-9)))
        seq = np.unravel_index(worst, (src.vocab_size,) * length)
        raise CheckFailure(
            f"the sequences drawn do not follow the model: over {n} draws of length {length}, "
            f"{tuple(int(v) for v in seq)} came up {int(counts[worst])} times where "
            f"{exact[worst] * n:.0f} were expected (chi-square p = {pval:.2g})")
    assert_matches(np.asarray(fn(_uniform(2), 5, np.random.default_rng(0))).shape, (5,),
                   where="length 5")
    return f"{n} sequences follow the model's distribution (chi-square p = {pval:.2f})"


register(
    "chain_rule.ancestral_sample",
    title="Ancestral sampling",
    points=2,
    reference=ancestral_sample,
    test=_test_sampler,
    wrong={
        "ignores the prefix (draws every symbol from p(x_1))": lambda f, n, rng: np.array(
            [rng.choice(len(f(np.array([], int))), p=f(np.array([], int))) for _ in range(n)]),
        "greedy (argmax) instead of sampling": lambda f, n, rng: _greedy(f, n),
        "conditions on the last symbol only": lambda f, n, rng: _last_only(f, n, rng),
        "draws with np.random's global generator, not rng": lambda f, n, rng: np.array(
            _global_draws(f, n)),
    },
    hint="append each new symbol to the prefix before asking for the next conditional",
)


def _greedy(f, n):
    seq: list[int] = []
    for _ in range(n):
        seq.append(int(np.argmax(f(np.array(seq, dtype=np.int64)))))
    return np.array(seq)


def _last_only(f, n, rng):
    seq: list[int] = []
    for _ in range(n):
        p = f(np.array(seq[-1:], dtype=np.int64))
        seq.append(int(rng.choice(len(p), p=p)))
    return np.array(seq)


def _global_draws(f, n):
    seq: list[int] = []
    for _ in range(n):
        p = f(np.array(seq, dtype=np.int64))
        seq.append(int(np.random.choice(len(p), p=p)))
    return seq
