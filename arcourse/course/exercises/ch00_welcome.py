"""Chapter 00: three warm-up exercises that show how grading works."""

from __future__ import annotations

import numpy as np

from arcourse.course.grading import Case, register


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
        Case((rng.integers(0, 7, 20), 7), label="20 random labels"),
    ],
    wrong={
        "transposed (classes first)": lambda y, n: one_hot(y, n).T,
        "off by one": lambda y, n: one_hot(np.asarray(y) - 1, n),
    },
)

_big = np.array([[1000.0, 999.0, 990.0]])
register(
    "welcome.softmax",
    title="A numerically stable softmax",
    points=1,
    reference=softmax,
    cases=lambda rng: [
        Case((np.array([0.0, 1.0, 2.0]),), label="small logits"),
        Case((rng.normal(size=(4, 6)),), label="a batch of 4 rows"),
        Case((_big,), label="large logits (exp overflows without the max)"),
    ],
    wrong={
        "no max subtraction (overflows to NaN)": lambda z: np.exp(z) / np.exp(z).sum(-1, keepdims=True),
        "normalised over the wrong axis": lambda z: (lambda e: e / e.sum(0, keepdims=True))(
            np.exp(np.asarray(z) - np.max(z))),
    },
    hint="subtract the largest logit of each row before exponentiating: the result is unchanged",
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
        Case((_big,), label="large logits"),
    ],
    wrong={
        "naive log(sum(exp))": lambda z: np.log(np.exp(np.asarray(z)).sum(-1)),
        "forgets to add the max back": lambda z: np.log(
            np.exp(np.asarray(z) - np.max(z, -1, keepdims=True)).sum(-1)),
    },
    hint="m + log(sum(exp(z - m))) with m the largest entry of each row",
)
