"""Chapter 04, decoding: the graded exercises.

The cases sit on the boundaries where the classic mistakes show: probabilities exact in binary
(0.5, 0.25, ...), so that a cumulative sum lands exactly on p and an off-by-one cannot hide. Each
case's label says what it tests, and the failure message repeats it.
"""

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import decoding
from arcourse.course.grading import Case, register

BINARY = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], np.float32)


# ---- top-k -----------------------------------------------------------------------------------
def _top_k_cases(rng):
    z = rng.normal(size=(3, 10)).astype(np.float32)
    ties = np.array([[1.0, 3.0, 2.0, 2.0, 0.0]], np.float32)
    first = np.array([[1.0, 3.0, 2.0, 3.0, 0.0]], np.float32)
    return [
        Case((jnp.asarray(z), 1), label="k=1 keeps only the arg max"),
        Case((jnp.asarray(z), 4), label="k=4 keeps exactly the 4 largest of each row"),
        Case((jnp.asarray(ties), 2), label="a tie at the 2nd largest value: every tied token "
             "is kept (3 tokens)"),
        Case((jnp.asarray(first), 1), label="a tie for the largest: both are kept"),
        Case((jnp.asarray(z), 10), label="k = V keeps everything"),
        Case((jnp.asarray(z), 25), label="k > V keeps everything"),
    ]


def _top_k_plus_one(logits, k):
    desc = jnp.sort(logits, axis=-1, descending=True)
    kth = desc[..., min(k, logits.shape[-1] - 1)][..., None]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def _top_k_by_index(logits, k):
    k = min(k, logits.shape[-1])
    _, idx = jax.lax.top_k(logits, k)
    keep = jnp.any(jax.nn.one_hot(idx, logits.shape[-1], dtype=bool), axis=-2)
    return jnp.where(keep, logits, -jnp.inf)


def _top_k_zero(logits, k):
    return jnp.where(decoding.top_k_mask(logits, k), logits, 0.0)


register(
    "decoding.top_k",
    title="Top-k filtering",
    points=2,
    reference=decoding.top_k_filter,
    cases=_top_k_cases,
    wrong={"off by one: compares with the (k+1)-th largest": _top_k_plus_one,
           "exactly k tokens: breaks ties by index": _top_k_by_index,
           "sets removed logits to 0 instead of -inf": _top_k_zero},
    hint="keep every logit >= the k-th largest (sort descending, take index k-1) and set the "
         "others to -inf: a logit of 0 still has probability e^0 / Z > 0.",
)


# ---- top-p -----------------------------------------------------------------------------------
def _top_p_cases(rng):
    p = jnp.asarray(BINARY)
    shuffled = jnp.asarray(BINARY[[3, 0, 5, 2, 1, 4]])
    rand = jnp.asarray(rng.dirichlet(np.ones(9), size=3).astype(np.float32))
    return [
        Case((p, 0.75), label="0.5 + 0.25 reaches p = 0.75 exactly: tokens 0 and 1, not 2"),
        Case((p, 0.6), label="the token that crosses p = 0.6 (token 1) must be kept"),
        Case((p, 0.5), label="the most likely token alone reaches p = 0.5"),
        Case((p, 0.3), label="p below the largest probability: still keep one token"),
        Case((shuffled, 0.9), label="unsorted vocabulary, p = 0.9"),
        Case((p, 1.0), label="p = 1 keeps everything"),
        Case((rand, 0.8), label="a batch of 3 random distributions, p = 0.8"),
    ]


def _top_p_inclusive(probs, p, keep):  # compares the mass up to and including each token
    order = jnp.argsort(probs, axis=-1, descending=True)
    csum = jnp.cumsum(jnp.take_along_axis(probs, order, -1), -1)
    return jnp.take_along_axis(keep(csum, p), jnp.argsort(order, -1), -1)


def _top_p_unsorted(probs, p):  # forgets to sort: a prefix of the vocabulary
    csum = jnp.cumsum(probs, -1)
    return (csum - probs) < p


register(
    "decoding.top_p",
    title="The nucleus (top-p)",
    points=3,
    reference=decoding.top_p_mask,
    cases=_top_p_cases,
    wrong={"inclusive cumsum <= p (drops the crossing token)":
               lambda probs, p: _top_p_inclusive(probs, p, jnp.less_equal),
           "inclusive cumsum < p": lambda probs, p: _top_p_inclusive(probs, p, jnp.less),
           "does not sort by probability": _top_p_unsorted},
    hint="sort descending, and keep token j when the mass strictly BEFORE it (an exclusive "
         "cumulative sum) is < p: then the token that reaches p is kept, and so is the first.",
)


# ---- min-p -----------------------------------------------------------------------------------
def _min_p_cases(rng):
    p = jnp.asarray(BINARY)
    rand = jnp.asarray(rng.dirichlet(np.full(7, 0.5), size=2).astype(np.float32))
    return [
        Case((p, 0.25), label="0.125 = 0.25 * 0.5 sits exactly on the threshold: kept"),
        Case((p, 0.0625), label="0.03125 = 0.0625 * 0.5 exactly: kept"),
        Case((p, 0.3), label="threshold 0.15: tokens 0 and 1"),
        Case((jnp.asarray([0.2, 0.2, 0.2, 0.2, 0.2]), 0.9), label="a flat distribution"),
        Case((rand, 0.1), label="a batch of 2 random distributions, min_p = 0.1"),
    ]


register(
    "decoding.min_p",
    title="Min-p filtering",
    points=2,
    reference=decoding.min_p_mask,
    cases=_min_p_cases,
    wrong={"strict > (drops the token on the threshold)":
               lambda probs, m: probs > m * probs.max(-1, keepdims=True),
           "absolute threshold, not scaled by the largest probability":
               lambda probs, m: probs >= m},
    hint="keep p_i >= min_p * max_j p_j: the threshold scales with the most likely token, and "
         "only tokens strictly below it go.",
)


# ---- repetition penalty ----------------------------------------------------------------------
def _penalty_cases(rng):
    z = jnp.asarray([[2.0, -2.0, 1.0, -1.0, 0.5]])
    rand = jnp.asarray(rng.normal(size=(2, 8)).astype(np.float32) * 2)
    return [
        Case((z, jnp.asarray([[0, 1, 4]]), 2.0), label="positive logits divided, negative ones "
             "multiplied"),
        Case((z, jnp.asarray([[0, 0, 0, 1, 1]]), 2.0),
             label="tokens seen several times are penalised once"),
        Case((rand, jnp.asarray(rng.integers(0, 8, size=(2, 6))), 1.3),
             label="a batch of 2, random history"),
        Case((rand, jnp.asarray([[3], [5]]), 1.0), label="penalty 1 changes nothing"),
    ]


def _penalty_divide_all(logits, history, penalty):
    seen = decoding.token_presence(history, logits.shape[-1])
    return jnp.where(seen, logits / penalty, logits)


def _penalty_per_occurrence(logits, history, penalty):
    counts = jax.nn.one_hot(history, logits.shape[-1]).sum(-2)
    factor = penalty**counts
    return jnp.where(logits > 0, logits / factor, logits * factor)


register(
    "decoding.repetition_penalty",
    title="The repetition penalty",
    points=2,
    reference=decoding.repetition_penalty,
    cases=_penalty_cases,
    wrong={"divides every seen logit (raises the negative ones)": _penalty_divide_all,
           "penalises once per occurrence": _penalty_per_occurrence},
    hint="dividing a negative logit by theta > 1 makes it LARGER (more likely): multiply the "
         "negative ones. And a token counts once, however often it was seen.",
)


# ---- one beam-search step --------------------------------------------------------------------
def _beam_cases(rng):
    def lp(shape):
        return jax.nn.log_softmax(jnp.asarray(rng.normal(size=shape).astype(np.float32) * 2), -1)

    return [
        Case((jnp.log(jnp.asarray([0.7, 0.3])), jnp.log(jnp.asarray([[0.6, 0.4], [0.9, 0.1]])),
              2), label="both survivors extend beam 0: 0.42 and 0.28 beat 0.27"),
        Case((jnp.asarray([-1.0, -3.0, -3.5]), lp((3, 5)), 3),
             label="3 beams, 5 tokens, beams with different scores"),
        Case((jnp.asarray([-0.2]), lp((1, 6)), 4), label="one beam (the first step), width 4"),
        Case((jnp.asarray([-2.0, -2.5, -2.7, -4.0]), lp((4, 7)), 4), label="4 beams, 7 tokens"),
    ]


def _beam_per_beam(beam_lp, token_lp, width):  # each beam keeps its own best extension
    W, V = token_lp.shape
    tok = jnp.argmax(token_lp, -1)
    total = beam_lp + token_lp[jnp.arange(W), tok]
    order = jnp.argsort(-total)[:width]
    return total[order], order.astype(jnp.int32), tok[order].astype(jnp.int32)


def _beam_no_history(beam_lp, token_lp, width):  # ranks by the new token's probability only
    V = token_lp.shape[1]
    _, flat = jax.lax.top_k(token_lp.reshape(-1), width)
    scores = (beam_lp[:, None] + token_lp).reshape(-1)[flat]
    return scores, (flat // V).astype(jnp.int32), (flat % V).astype(jnp.int32)


register(
    "decoding.beam_step",
    title="One step of beam search",
    points=3,
    reference=decoding.beam_step,
    cases=_beam_cases,
    wrong={"keeps the best extension of each beam": _beam_per_beam,
           "ranks by the new token's log-probability only": _beam_no_history},
    hint="score every (beam, token) pair by beam score + log p(token | beam), flatten the W x V "
         "candidates and keep the width best of all of them together; parent = flat // V, "
         "token = flat % V.",
)
