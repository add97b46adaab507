r"""Count-based n-gram language models: interpolated Kneser-Ney, and add-k for comparison.

Interpolated Kneser-Ney (Kneser & Ney 1995; Chen & Goodman 1998) of order $n$ subtracts a
discount $D_m$ from every count and gives the mass it frees to the next lower order:

$$p_m(w \mid h) = \frac{\max(a_m(h w) - D_m, 0) + D_m\, N_m(h)\, p_{m-1}(w \mid h')}{\sum_v a_m(h v)},$$

where $h$ holds the last $m-1$ symbols, $h'$ is $h$ without its oldest symbol, $N_m(h)$ is the
number of distinct $w$ with $a_m(h w) > 0$, and a context never seen falls back to $p_{m-1}$
entirely. The highest order counts occurrences, $a_n = c$; the lower orders count *continuations*,
$a_m(h w) = |\{x : c(x h w) > 0\}|$: how many different symbols precede $h w$ (a symbol seen after
one frequent context only is a poor guess in new contexts). The recursion ends in the uniform
distribution $p_0 = 1/V$, so every symbol has non-zero probability. The discount of each order is
Ney's estimate $D_m = n_1 / (n_1 + 2 n_2)$, $n_r$ the number of $m$-grams with $a_m = r$.

Add-$k$ smoothing, $p(w \mid h) = (c(h w) + k) / (c(h) + k V)$, is here as the simple baseline.

Everything is numpy: an $m$-gram is one int64 key (the oldest symbol most significant), counts are
``np.unique`` over keys, and look-ups are ``np.searchsorted``, so fitting 400K characters at
$n = 7$ and scoring 46K takes well under a second.
"""

from __future__ import annotations

import math

import numpy as np

from arcourse._checks import check_int

__all__ = ["KneserNey", "AddK", "ngram_keys"]


def _check_tokens(tokens, vocab_size, name="tokens"):
    t = np.asarray(tokens)
    if t.ndim != 1:
        raise ValueError(f"{name} must be a 1-D sequence of symbols, got shape {t.shape}")
    if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {t.dtype}")
    if t.size and (t.min() < 0 or t.max() >= vocab_size):
        raise ValueError(f"{name} must lie in [0, {vocab_size}), got {t.min()}..{t.max()}")
    return t.astype(np.int64)


def _check_order(order, vocab_size):
    check_int("order", order)
    check_int("vocab_size", vocab_size, 2)
    if order * math.log2(vocab_size) >= 62:
        raise ValueError(f"order={order} is too large for vocab_size={vocab_size}: "
                         "an n-gram must fit in one int64 key")


def ngram_keys(tokens: np.ndarray, m: int, vocab_size: int) -> np.ndarray:
    r"""Keys of every $m$-gram of ``tokens``: key $= \sum_j x_{t+j} V^{m-1-j}$, shape (len - m + 1,)."""
    n = len(tokens) - m + 1
    keys = np.zeros(max(n, 0), np.int64)
    for j in range(m):
        keys = keys * vocab_size + tokens[j : j + n]
    return keys


class _Table:
    """For one order: sorted m-gram keys with their counts, and per-context totals and types."""

    def __init__(self, keys: np.ndarray, counts: np.ndarray, vocab_size: int):
        self.keys, self.counts = keys, counts
        ctx, inv = np.unique(keys // vocab_size, return_inverse=True)
        self.ctx = ctx
        self.ctx_total = np.bincount(inv, weights=counts).astype(np.float64)
        self.ctx_types = np.bincount(inv).astype(np.float64)

    @staticmethod
    def _find(sorted_keys, values, q):
        i = np.searchsorted(sorted_keys, q)
        i = np.minimum(i, len(sorted_keys) - 1)
        hit = sorted_keys[i] == q
        return np.where(hit, values[i], 0)

    def count(self, q):
        return self._find(self.keys, self.counts, q).astype(np.float64)

    def context(self, h):
        return (self._find(self.ctx, self.ctx_total, h).astype(np.float64),
                self._find(self.ctx, self.ctx_types, h).astype(np.float64))


class _NGramBase:
    def __init__(self, order: int, vocab_size: int):
        _check_order(order, vocab_size)
        self.order = int(order)
        self.vocab_size = int(vocab_size)
        self._fitted = False

    def fit(self, tokens):
        raise NotImplementedError

    def _require_fit(self):
        if not self._fitted:
            raise RuntimeError(f"call {type(self).__name__}.fit(train_tokens) first")

    def _windows(self, tokens, context):
        """Keys of the n-gram ending at every position of ``tokens`` (context prepended)."""
        tokens = _check_tokens(tokens, self.vocab_size)
        ctx = (_check_tokens(context, self.vocab_size, "context") if context is not None
               else np.zeros(0, np.int64))
        ctx = ctx[len(ctx) - min(len(ctx), self.order - 1):]
        full = np.concatenate([ctx, tokens])
        start = len(ctx)
        # history length available at each scored position (0 .. order-1)
        avail = np.minimum(np.arange(start, len(full)), self.order - 1)
        return full, start, avail

    def _gram_at(self, full, start, m):
        """Key of the m-gram ending at each scored position, -1 where history is too short."""
        pos = np.arange(start, len(full))
        key = np.zeros(len(pos), np.int64)
        ok = pos - (m - 1) >= 0
        for j in range(m - 1, -1, -1):
            key = key * self.vocab_size + full[np.maximum(pos - j, 0)]
        return np.where(ok, key, -1)

    def log_probs(self, tokens, context=None) -> np.ndarray:
        r"""$\ln p(x_t \mid \text{up to } n-1 \text{ previous symbols})$ for every position of ``tokens``.

        ``context`` (optional) are the symbols just before ``tokens`` (for example the end of the
        training text); without it the first positions use shorter histories.
        """
        self._require_fit()
        full, start, avail = self._windows(tokens, context)
        grams = {m: np.where(avail >= m - 1, self._gram_at(full, start, m), -1)
                 for m in range(1, self.order + 1)}
        return np.log(self._probs(grams))

    def bits_per_symbol(self, tokens, context=None) -> float:
        """Mean $-\\log_2 p$ over ``tokens``."""
        return float(-self.log_probs(tokens, context).mean() / math.log(2))

    def next_distribution(self, history) -> np.ndarray:
        """$p(\\cdot \\mid$ the last $n-1$ symbols of ``history``$)$, shape (V,), sums to one."""
        self._require_fit()
        V = self.vocab_size
        history = _check_tokens(history, V, "history")
        grams = {}
        for m in range(1, self.order + 1):
            if len(history) >= m - 1:
                h = 0
                for x in history[len(history) - (m - 1):]:
                    h = h * V + int(x)
                grams[m] = h * V + np.arange(V, dtype=np.int64)
            else:
                grams[m] = np.full(V, -1, np.int64)
        return self._probs(grams)

    def sample(self, seed, length: int, prefix=()) -> np.ndarray:
        """Ancestral sampling of ``length`` symbols after ``prefix`` (a Python loop).

        ``seed`` comes first, as the key of every sampler of the course does: an integer or a
        ``numpy.random.Generator`` (then it is drawn from, and advances). Returns int32[length].
        """
        length = check_int("length", length)
        rng = np.random.default_rng(seed)
        seq = list(_check_tokens(np.asarray(prefix, np.int64) if len(prefix) == 0 else prefix,
                                 self.vocab_size, "prefix"))
        out = []
        for _ in range(length):
            p = self.next_distribution(np.asarray(seq, np.int64))
            w = int(rng.choice(self.vocab_size, p=p / p.sum()))
            seq.append(w)
            out.append(w)
        return np.asarray(out, np.int32)


class KneserNey(_NGramBase):
    """Interpolated Kneser-Ney n-gram model of order ``order`` (see the module docstring).

    >>> lm = KneserNey(order=7, vocab_size=corpus.vocab_size).fit(corpus.train)
    >>> lm.bits_per_symbol(corpus.valid, context=corpus.train)
    """

    def __init__(self, order: int, vocab_size: int, discounts=None):
        super().__init__(order, vocab_size)
        if discounts is not None:
            discounts = [float(d) for d in np.atleast_1d(discounts)]
            if len(discounts) != self.order or not all(0 < d < 1 for d in discounts):
                raise ValueError(f"discounts must be {self.order} numbers in (0, 1), "
                                 f"got {discounts!r}")
        self._fixed_discounts = discounts

    def fit(self, tokens):
        """Count every m-gram (m = 1..order) of ``tokens``; returns ``self``."""
        tokens = _check_tokens(tokens, self.vocab_size)
        if len(tokens) < self.order:
            raise ValueError(f"tokens must hold at least order={self.order} symbols")
        V, n = self.vocab_size, self.order
        self.tables: dict[int, _Table] = {}
        keys, counts = np.unique(ngram_keys(tokens, n, V), return_counts=True)
        self.tables[n] = _Table(keys, counts, V)
        for m in range(n - 1, 0, -1):
            # continuation counts: distinct left extensions x of each m-gram g (x g occurs)
            distinct = np.unique(ngram_keys(tokens, m + 1, V))
            keys, counts = np.unique(distinct % V**m, return_counts=True)
            self.tables[m] = _Table(keys, counts, V)
        self.discounts = []
        for m in range(1, n + 1):
            if self._fixed_discounts is not None:
                d = self._fixed_discounts[m - 1]
            else:
                c = self.tables[m].counts
                n1, n2 = np.sum(c == 1), np.sum(c == 2)
                d = n1 / (n1 + 2 * n2) if n1 + n2 > 0 else 0.5
                d = float(min(max(d, 0.05), 0.95))
            self.discounts.append(d)
        self._fitted = True
        return self

    def _probs(self, grams):
        """p(x_t | history) from the key of the m-gram ending at t, per order (-1: too short)."""
        V = self.vocab_size
        p = np.full(len(grams[1]), 1.0 / V)
        for m in range(1, self.order + 1):
            table, D, gram = self.tables[m], self.discounts[m - 1], grams[m]
            a = table.count(gram)
            total, types = table.context(np.where(gram >= 0, gram // V, -1))
            seen = (gram >= 0) & (total > 0)
            safe = np.where(seen, total, 1.0)
            p = np.where(seen, (np.maximum(a - D, 0.0) + D * types * p) / safe, p)
        return p


class AddK(_NGramBase):
    r"""Add-$k$ smoothed n-gram model: $p(w \mid h) = (c(h w) + k) / (c(h) + k V)$.

    At the first positions, where fewer than $n - 1$ symbols precede, the shorter history is used.
    """

    def __init__(self, order: int, vocab_size: int, k: float = 1.0):
        super().__init__(order, vocab_size)
        if not k > 0:
            raise ValueError(f"k must be > 0, got {k!r}")
        self.k = float(k)

    def fit(self, tokens):
        tokens = _check_tokens(tokens, self.vocab_size)
        if len(tokens) < self.order:
            raise ValueError(f"tokens must hold at least order={self.order} symbols")
        self.tables = {}
        for m in range(1, self.order + 1):
            keys, counts = np.unique(ngram_keys(tokens, m, self.vocab_size), return_counts=True)
            self.tables[m] = _Table(keys, counts, self.vocab_size)
        self._fitted = True
        return self

    def _probs(self, grams):
        V, k = self.vocab_size, self.k
        p = np.zeros(len(grams[1]))
        for m in range(1, self.order + 1):
            gram = grams[m]
            total, _ = self.tables[m].context(np.where(gram >= 0, gram // V, -1))
            pm = (self.tables[m].count(gram) + k) / (total + k * V)
            # the longest history available wins
            p = np.where(gram >= 0, pm, p)
        return p
