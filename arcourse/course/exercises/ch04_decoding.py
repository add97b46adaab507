"""Chapter 04, decoding: the graded exercises.

The cases sit on the boundaries where the classic mistakes show: probabilities exact in binary
(0.5, 0.25, ...), so that a cumulative sum lands exactly on p and an off-by-one cannot hide; ties
exactly at the cut-off, where the stated tie rule decides; rows of a batch far apart, where one
threshold for the whole batch differs from one per row; logits large enough that a softmax
underflows. Each case's label says what it tests, and the failure message repeats it. Every
``wrong`` answer below agrees with the reference on some cases and is told apart by others.
"""

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import decoding
from arcourse.course.grading import Case, device_array, register

BINARY = np.array([0.5, 0.25, 0.125, 0.0625, 0.03125, 0.03125], np.float32)


def _dev(x):
    """``x`` as a device array, float32 or int32, converted in NumPy: ``jnp.asarray`` of a NumPy
    array or a list compiles a small program per shape, ``jax.device_put`` does not."""
    x = np.asarray(x)
    return device_array(x, np.float32 if x.dtype.kind == "f" else np.int32)


# ---- top-k -----------------------------------------------------------------------------------
def _top_k_cases(rng):
    z = rng.normal(size=(3, 10)).astype(np.float32)
    ties = np.array([[1.0, 3.0, 2.0, 2.0, 0.0]], np.float32)
    first = np.array([[1.0, 3.0, 2.0, 3.0, 0.0]], np.float32)
    large = np.array([[1000.0, 500.0, 0.0, -500.0, 250.0]], np.float32)
    apart = np.array([[9.0, 8.0, 7.0, 6.0], [-6.0, -7.0, -8.0, -9.0]], np.float32)
    return [
        Case((_dev(z), 1), label="k=1 keeps only the arg max"),
        Case((_dev(z), 4), label="k=4 keeps exactly the 4 largest of each row"),
        Case((_dev(ties), 2), label="a tie at the 2nd largest value: every tied token "
             "is kept (3 tokens)"),
        Case((_dev(first), 1), label="a tie for the largest: both are kept"),
        Case((_dev(z), 10), label="k = V keeps everything"),
        Case((_dev(z), 25), label="k > V keeps everything"),
        Case((_dev(large), 2), label="large logits (a softmax underflows to 0 for all "
             "but one): k=2 keeps 1000 and 500"),
        Case((_dev(apart), 2), label="two rows far apart: each row keeps its own 2 "
             "largest"),
        Case((_dev(z[0]), 3), label="a single row of shape (V,), k=3"),
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


def _top_k_whole_batch(logits, k):  # one k-th value for every row together
    flat = jnp.sort(logits.reshape(-1), descending=True)
    return jnp.where(logits >= flat[min(k, flat.size) - 1], logits, -jnp.inf)


def _top_k_on_probs(logits, k):  # compares probabilities: they underflow to 0 and tie
    probs = jax.nn.softmax(logits, axis=-1)
    kth = jnp.sort(probs, axis=-1, descending=True)[..., min(k, logits.shape[-1]) - 1]
    return jnp.where(probs >= kth[..., None], logits, -jnp.inf)


register(
    "decoding.top_k",
    title="Top-k filtering",
    points=2,
    reference=decoding.top_k_filter,
    cases=_top_k_cases,
    wrong={"off by one: compares with the (k+1)-th largest": _top_k_plus_one,
           "exactly k tokens: breaks ties by index": _top_k_by_index,
           "sets removed logits to 0 instead of -inf": _top_k_zero,
           "one k-th value for the whole batch, not one per row": _top_k_whole_batch,
           "compares softmax probabilities, which underflow to 0 for large logits":
               _top_k_on_probs},
    hint="per row (the last axis), find the k-th largest LOGIT (k counts from 1; k >= V keeps "
         "all) and keep every logit at least that large, so ties with it stay; set the others "
         "to -inf: a logit of 0 still has probability e^0 / Z > 0.",
)


# ---- top-p -----------------------------------------------------------------------------------
def _top_p_cases(rng):
    p = _dev(BINARY)
    shuffled = _dev(BINARY[[3, 0, 5, 2, 1, 4]])  # the tied 0.03125 at ids 2 and 5
    rand = _dev(rng.dirichlet(np.ones(9), size=3).astype(np.float32))
    return [
        Case((p, 0.75), label="0.5 + 0.25 reaches p = 0.75 exactly: tokens 0 and 1, not 2"),
        Case((p, 0.6), label="the token that crosses p = 0.6 (token 1) must be kept"),
        Case((p, 0.5), label="the most likely token alone reaches p = 0.5"),
        Case((p, 0.3), label="p below the largest probability: still keep one token"),
        Case((shuffled, 0.9), label="unsorted vocabulary, p = 0.9"),
        Case((p, 0.95), label="a tie at the cut-off: tokens 4 and 5 both have 0.03125; mass "
             "0.9375 < 0.95 before token 4 (kept), 0.96875 before token 5 (dropped)"),
        Case((shuffled, 0.95), label="a tie at the cut-off in an unsorted vocabulary: ids 2 and "
             "5 both have 0.03125; the lower id (2) comes first and is kept, 5 is dropped"),
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


def _top_p_higher_id_first(probs, p):  # an ascending sort reversed: ties go to the higher id
    order = jnp.argsort(probs, axis=-1)[..., ::-1]
    sorted_p = jnp.take_along_axis(probs, order, -1)
    keep = (jnp.cumsum(sorted_p, -1) - sorted_p) < p
    return jnp.take_along_axis(keep, jnp.argsort(order, -1), -1)


def _top_p_keep_tied(probs, p):  # keeps every token as likely as the last one kept
    order = jnp.argsort(probs, axis=-1, descending=True)
    sorted_p = jnp.take_along_axis(probs, order, -1)
    kept = (jnp.cumsum(sorted_p, -1) - sorted_p) < p
    smallest = jnp.min(jnp.where(kept, sorted_p, jnp.inf), axis=-1, keepdims=True)
    return probs >= smallest


register(
    "decoding.top_p",
    title="The nucleus (top-p)",
    points=3,
    reference=decoding.top_p_mask,
    cases=_top_p_cases,
    wrong={"inclusive cumsum <= p (drops the crossing token)":
               lambda probs, p: _top_p_inclusive(probs, p, jnp.less_equal),
           "inclusive cumsum < p": lambda probs, p: _top_p_inclusive(probs, p, jnp.less),
           "does not sort by probability": _top_p_unsorted,
           "breaks ties by the higher token id (a reversed ascending sort)":
               _top_p_higher_id_first,
           "keeps every token tied with the last one kept (a threshold on probability)":
               _top_p_keep_tied},
    hint="order each row by probability, largest first and equal probabilities by token id "
         "(lower first: a stable sort of -probs does it); keep the j-th token of that order when "
         "the mass strictly BEFORE it (an exclusive cumulative sum) is < p, then put the mask "
         "back in token order. The token that reaches p is kept, and so is the first.",
)


# ---- min-p -----------------------------------------------------------------------------------
def _min_p_cases(rng):
    p = _dev(BINARY)
    rand = _dev(rng.dirichlet(np.full(7, 0.5), size=2).astype(np.float32))
    apart = _dev([[0.875, 0.0625, 0.0625, 0.0], [0.25, 0.25, 0.25, 0.25]])
    return [
        Case((p, 0.25), label="0.125 = 0.25 * 0.5 sits exactly on the threshold: kept"),
        Case((p, 0.0625), label="0.03125 = 0.0625 * 0.5 exactly: kept"),
        Case((p, 0.3), label="threshold 0.15: tokens 0 and 1"),
        Case((_dev([0.2, 0.2, 0.2, 0.2, 0.2]), 0.9), label="a flat distribution"),
        Case((_dev([0.375, 0.375, 0.25]), 1.0),
             label="min_p = 1 keeps the most likely token and every token tied with it"),
        Case((apart, 0.5), label="two rows far apart: row 0's threshold is 0.4375, row 1's "
             "0.125 (each row uses its own largest probability)"),
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
               lambda probs, m: probs >= m,
           "one threshold for the whole batch (the largest probability of all rows)":
               lambda probs, m: probs >= m * probs.max()},
    hint="each row has its own threshold: min_p times that row's largest probability (a max over "
         "the last axis, kept as a size-1 axis so it broadcasts); a token exactly on it stays.",
)


# ---- repetition penalty ----------------------------------------------------------------------
def _penalty_cases(rng):
    z = _dev([[2.0, -2.0, 1.0, -1.0, 0.5]])
    rand_rows = rng.normal(size=(2, 8)).astype(np.float32) * 2
    rand = _dev(rand_rows)
    two = _dev([[1.0, -1.0, 2.0, -2.0, 3.0, -3.0]] * 2)
    return [
        Case((z, _dev([[0, 1, 4]]), 2.0), label="positive logits divided, negative ones "
             "multiplied"),
        Case((z, _dev([[0, 0, 0, 1, 1]]), 2.0),
             label="tokens seen several times are penalised once"),
        Case((two, _dev([[0, 1], [4, 5]]), 2.0),
             label="two rows with different histories: each row penalises only its own tokens"),
        Case((rand, _dev(rng.integers(0, 8, size=(2, 6))), 1.3),
             label="a batch of 2, random history"),
        Case((_dev(rand_rows[0]), _dev([7, 2, 2]), 1.5), label="a single row: logits (V,), "
             "history (L,)"),
        Case((rand, _dev([[3], [5]]), 1.0), label="penalty 1 changes nothing"),
    ]


def _penalty_divide_all(logits, history, penalty):
    seen = decoding.token_presence(history, logits.shape[-1])
    return jnp.where(seen, logits / penalty, logits)


def _penalty_per_occurrence(logits, history, penalty):
    counts = jax.nn.one_hot(history, logits.shape[-1]).sum(-2)
    factor = penalty**counts
    return jnp.where(logits > 0, logits / factor, logits * factor)


def _penalty_whole_batch(logits, history, penalty):  # every row's history penalises every row
    seen = jnp.isin(jnp.arange(logits.shape[-1]), history)
    return jnp.where(seen, jnp.where(logits > 0, logits / penalty, logits * penalty), logits)


register(
    "decoding.repetition_penalty",
    title="The repetition penalty",
    points=2,
    reference=decoding.repetition_penalty,
    cases=_penalty_cases,
    wrong={"divides every seen logit, as CTRL's formula does (raises the negative ones)":
               _penalty_divide_all,
           "penalises once per occurrence": _penalty_per_occurrence,
           "one set of seen tokens for the whole batch, not one per row": _penalty_whole_batch},
    hint="dividing a negative logit by theta > 1 makes it LARGER (more likely): multiply the "
         "negative ones. A token counts once, however often it was seen, and row b of the batch "
         "is penalised only for the tokens of history row b.",
)


# ---- one beam-search step --------------------------------------------------------------------
def _beam_cases(rng):
    def lp(shape):
        z = rng.normal(size=shape).astype(np.float32) * 2.0  # log-softmax in NumPy (float64)
        z = z.astype(np.float64) - z.max(-1, keepdims=True)
        return _dev(z - np.log(np.exp(z).sum(-1, keepdims=True)))

    tie = (_dev([-1.0, -1.0]), _dev([[-2.0, -0.5], [-0.5, -3.0]]))
    return [
        Case((_dev(np.log([0.7, 0.3])), _dev(np.log([[0.6, 0.4], [0.9, 0.1]])),
              2), label="both survivors extend beam 0: 0.42 and 0.28 beat 0.27"),
        Case((_dev([-1.0, -3.0, -3.5]), lp((3, 5)), 3),
             label="3 beams, 5 tokens, beams with different scores"),
        Case((_dev([-0.2]), lp((1, 6)), 4), label="one beam (the first step), width 4"),
        Case((_dev([-2.0, -2.5, -2.7, -4.0]), lp((4, 7)), 4), label="4 beams, 7 tokens"),
        Case((*tie, 1), label="a tie: (beam 0, token 1) and (beam 1, token 0) both score -1.5; "
             "the lower flat index b*V + v (= 1, beam 0) wins"),
        Case((*tie, 3), label="the same tie, width 3: order (0, 1), (1, 0), (0, 0)"),
        Case((_dev([-0.5, -np.inf, -np.inf]), lp((3, 4)), 3),
             label="dead beams (score -inf) next to a live one"),
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


def _beam_token_major(beam_lp, token_lp, width):  # flattens (V, W): ties go to the lower token
    W = token_lp.shape[0]
    scores, flat = jax.lax.top_k((beam_lp[:, None] + token_lp).T.reshape(-1), width)
    return scores, (flat % W).astype(jnp.int32), (flat // W).astype(jnp.int32)


register(
    "decoding.beam_step",
    title="One step of beam search",
    points=3,
    reference=decoding.beam_step,
    cases=_beam_cases,
    wrong={"keeps the best extension of each beam": _beam_per_beam,
           "ranks by the new token's log-probability only": _beam_no_history,
           "flattens token-major (ties go to the lower token id, not the lower beam)":
               _beam_token_major},
    hint="score every (beam, token) pair by beam score + log p(token | beam), flatten the W x V "
         "candidates beam-major (candidate (b, v) at index b*V + v) and keep the width best of "
         "all of them together, equal scores by the lower index (jax.lax.top_k does both); the "
         "parent and the token are the quotient and the remainder of that index by V.",
)
