r"""Count-based autoregressive models: the maximum-likelihood answer, in closed form.

An order-$k$ model has one categorical distribution per context $c = x_{t-k:t}$. Maximising the
log-likelihood $\sum_t \ln \theta_{c_t, x_t}$ subject to $\sum_x \theta_{c,x} = 1$ gives the
normalised counts $\hat\theta_{c,x} = N(c,x) / N(c)$. Additive ("add-$\alpha$") smoothing
$\theta_{c,x} = (N(c,x) + \alpha) / (N(c) + \alpha V)$ keeps unseen pairs possible.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from arcourse._checks import check_int

__all__ = ["context_ids", "count_transitions", "smoothed_conditional", "NGramCounts",
           "kl_divergence_rate"]


def context_ids(seq, order: int, vocab_size: int) -> np.ndarray:
    """Context of every position t >= order, as a base-V number (oldest symbol most significant)."""
    seq = np.asarray(seq, dtype=np.int64)
    ids = np.zeros(len(seq) - order, dtype=np.int64)
    for j in range(order):
        ids = ids * vocab_size + seq[j : len(seq) - order + j]
    return ids


def count_transitions(seq, order: int, vocab_size: int) -> np.ndarray:
    r"""$N(c, x)$: how often symbol $x$ follows context $c$ in ``seq``; shape (V**order, V).

    The contexts are the ``order`` symbols just before each position $t \ge$ ``order``.
    """
    seq = np.asarray(seq)
    if seq.ndim != 1:
        raise ValueError(f"seq must be 1-D, got shape {seq.shape}")
    if not isinstance(order, int | np.integer) or order < 0:
        raise ValueError(f"order must be an integer >= 0, got {order!r}")
    if seq.size and (seq.min() < 0 or seq.max() >= vocab_size):
        raise ValueError(f"seq symbols must lie in [0, vocab_size={vocab_size})")
    if len(seq) <= order:
        return np.zeros((vocab_size**order, vocab_size))
    flat = context_ids(seq, order, vocab_size) * vocab_size + seq[order:]
    counts = np.bincount(flat, minlength=vocab_size ** (order + 1))
    return counts.reshape(vocab_size**order, vocab_size).astype(np.float64)


def smoothed_conditional(counts, alpha: float) -> np.ndarray:
    r"""$\theta_{c,x} = (N(c,x) + \alpha) / (N(c) + \alpha V)$ for counts of shape (C, V).

    ``alpha = 0`` is the maximum-likelihood estimate; a context never seen then gets the uniform
    distribution (its row is 0/0).
    """
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"counts must have shape (contexts, V), got {counts.shape}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    V = counts.shape[1]
    num = counts + alpha
    den = num.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0 / V)
    return probs


def kl_divergence_rate(source, log_theta) -> float:
    r"""$D(p \,\|\, q) = \sum_c \pi(c) \sum_x A[c,x] \ln (A[c,x] / \theta_{c,x})$, nats per symbol.

    The KL divergence rate from a Markov ``source`` (a :class:`arcourse.data.MarkovSource`, with
    transition table $A$ and stationary law $\pi$ over contexts) to a tabular model of the same
    order with log-probabilities ``log_theta`` of shape (V**order, V). The model's cross-entropy
    rate, what its held-out NLL estimates, is the source's entropy rate plus this. Exact: no
    sampling. Terms with $A[c,x] = 0$ contribute 0.
    """
    A = np.asarray(source.transitions, dtype=np.float64)
    log_theta = np.asarray(log_theta, dtype=np.float64)
    if log_theta.shape != A.shape:
        raise ValueError(f"log_theta must have the shape of the source's table {A.shape}, got "
                         f"{log_theta.shape} (a model of another order?)")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(A > 0, A * (np.log(np.where(A > 0, A, 1.0)) - log_theta), 0.0)
    return float(source.stationary @ terms.sum(axis=1))


@dataclass(eq=False)
class NGramCounts:
    r"""An order-$k$ count model with add-$\alpha$ smoothing (an $(k{+}1)$-gram model).

    The first $k$ symbols of a sequence are scored by lower-order models fitted on the same data
    (order 0, 1, ..., k-1), so the model is a proper distribution over sequences of any length.
    """

    order: int
    vocab_size: int
    alpha: float = 0.5
    tables: list = field(default_factory=list, repr=False)  # log-probs for orders 0..k

    def fit(self, seq) -> NGramCounts:
        self.tables = [np.log(smoothed_conditional(count_transitions(seq, j, self.vocab_size),
                                                   self.alpha))
                       for j in range(self.order + 1)]
        return self

    @property
    def log_probs(self) -> np.ndarray:
        """The order-k conditional table $\\ln\\theta_{c,x}$, shape (V**order, V)."""
        if not self.tables:
            raise RuntimeError("call fit(seq) first")
        return self.tables[-1]

    def conditional_log_probs(self, seq) -> np.ndarray:
        r"""$\ln p(x_t \mid x_{t-k:t})$ for t = k..T-1 (the positions with a full context)."""
        seq = np.asarray(seq)
        return self.log_probs[context_ids(seq, self.order, self.vocab_size), seq[self.order :]]

    def log_prob(self, seq) -> float:
        r"""$\ln p(x_{1:T}) = \sum_t \ln p(x_t \mid x_{\max(1,t-k):t})$ (the chain rule)."""
        seq = np.asarray(seq, dtype=np.int64)
        if not self.tables:
            raise RuntimeError("call fit(seq) first")
        total = 0.0
        for t in range(min(self.order, len(seq))):
            c = 0
            for x in seq[:t]:
                c = c * self.vocab_size + int(x)
            total += self.tables[t][c, seq[t]]
        if len(seq) > self.order:
            total += self.conditional_log_probs(seq).sum()
        return float(total)

    def next_symbol_probs(self, prefix) -> np.ndarray:
        """$p(\\cdot \\mid$ the last (up to) k symbols of ``prefix``$)$, shape (V,)."""
        prefix = np.asarray(prefix, dtype=np.int64).reshape(-1)
        j = min(self.order, len(prefix))
        c = 0
        for x in prefix[len(prefix) - j :]:
            c = c * self.vocab_size + int(x)
        return np.exp(self.tables[j][c])

    def sample(self, seed, length: int, prefix=()) -> np.ndarray:
        """Ancestral sampling of ``length`` symbols after ``prefix``: each from its conditional
        given those before it. ``seed`` comes first, as the key of every sampler of the course
        does: an integer or a ``numpy.random.Generator``. Returns int32[length]."""
        length = check_int("length", length)
        rng = np.random.default_rng(seed)
        seq = list(np.asarray(prefix, dtype=np.int64))
        cdfs = np.cumsum(np.exp(self.log_probs), axis=1)
        for _ in range(length):
            if len(seq) < self.order:
                p = self.next_symbol_probs(seq)
                seq.append(int(rng.choice(self.vocab_size, p=p)))
            else:
                c = 0
                for x in seq[len(seq) - self.order :]:
                    c = c * self.vocab_size + int(x)
                seq.append(int(min(np.searchsorted(cdfs[c], rng.random(), side="right"),
                                   self.vocab_size - 1)))
        return np.asarray(seq[len(prefix) :], dtype=np.int32)
