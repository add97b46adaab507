"""Chapter 13 (tokens and bits): one BPE merge, encoding with a merge list, quantising a
distribution to integer frequencies, the arithmetic coder's interval update, the ideal code length.

Each grader compares with the reference on fixed and random cases; when the answer differs, it
also tries the classic mistakes of that exercise and names the one the answer matches.
"""

from __future__ import annotations

import numpy as np

from arcourse import bpe, coding
from arcourse.course.grading import Case, CheckFailure, assert_matches, describe_call, register


def _as_int_list(x):
    if x is None:
        raise CheckFailure("your function returned None: did you forget `return`?")
    try:
        arr = np.asarray(x)
    except Exception:  # noqa: BLE001
        raise CheckFailure(f"expected a list of integers, got {type(x).__name__}") from None
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise CheckFailure(f"expected a flat list of integers, got {arr.dtype} of shape {arr.shape}")
    return [int(v) for v in arr]


def _short(xs, n=24):
    xs = list(xs)
    return str(xs) if len(xs) <= n else str(xs[:n])[:-1] + f", ... ({len(xs)} in all)]"


def _list_compare(got, expected, where):
    g = _as_int_list(got)
    if g != expected:
        first = next((i for i, (a, b) in enumerate(zip(g, expected)) if a != b),
                     min(len(g), len(expected)))
        raise CheckFailure(f"{where}: expected {_short(expected)}, got {_short(g)} "
                           f"(lengths {len(expected)} and {len(g)}; first difference at index "
                           f"{first})")


def _array_compare(rtol=1e-6, atol=1e-9):
    def compare(got, expected, where):
        assert_matches(got, expected, rtol=rtol, atol=atol, where=where)
    return compare


def _diagnosing_test(compare, mistakes: dict):
    """A ``test`` comparing with the reference case by case and naming the mistake matched."""

    def test(fn, ex):
        cases = ex.make_cases()
        for i, case in enumerate(cases):
            label = case.label or f"case {i + 1}"
            expected = ex.reference(*case.args, **case.kwargs)
            got = fn(*case.args, **case.kwargs)
            try:
                compare(got, expected, f"{label} (input: {describe_call(case)})")
            except CheckFailure as failure:
                for what, mistake in mistakes.items():
                    try:
                        compare(got, mistake(*case.args, **case.kwargs), "")
                    except (CheckFailure, ValueError, TypeError, IndexError):
                        continue
                    raise CheckFailure(f"{failure}\n   your answer matches a classic mistake: "
                                       f"{what}") from None
                raise
        return f"{len(cases)} cases"

    return test


# --------------------------------------------------------------------------------------------
# tokens.merge: one merge step
# --------------------------------------------------------------------------------------------
def _merge_right_to_left(ids, pair, new_id):
    return bpe.merge_pair(list(ids)[::-1], pair[::-1], new_id)[::-1]


def _merge_overlapping(ids, pair, new_id):
    ids = list(ids)
    out = []
    for i, x in enumerate(ids):
        if i + 1 < len(ids) and (x, ids[i + 1]) == tuple(pair):
            out.append(new_id)  # ... and the next position is examined again
        elif i > 0 and (ids[i - 1], x) == tuple(pair):
            continue
        else:
            out.append(x)
    return out


def _merge_first_only(ids, pair, new_id):
    ids = list(ids)
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == tuple(pair):
            return ids[:i] + [new_id] + ids[i + 2:]
    return ids


def _merge_drops_last(ids, pair, new_id):
    ids, out, i = list(ids), [], 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == tuple(pair):
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


MERGE_MISTAKES = {
    "scanning from the right: in 'a a a' the pair (a, a) must be merged at the LEFT, giving "
    "'X a'": _merge_right_to_left,
    "overlapping matches: in 'a a a' only one (a, a) can be merged, the tokens are used once":
        _merge_overlapping,
    "only the first occurrence is replaced; a merge replaces every one": _merge_first_only,
    "the last token is dropped when it is not part of a match (the loop stops one early)":
        _merge_drops_last,
}


def _merge_cases(rng):
    cases = [
        Case(([1, 2, 3, 1, 2], (1, 2), 256), label="two occurrences"),
        Case(([97, 97, 97], (97, 97), 256), label="a a a: overlapping candidates"),
        Case(([97, 97, 97, 97], (97, 97), 300), label="a a a a"),
        Case(([5, 6, 7], (6, 7), 256), label="the pair at the end"),
        Case(([5, 6, 7], (7, 5), 256), label="no occurrence"),
        Case(([], (1, 2), 256), label="empty"),
        Case(([4], (4, 4), 256), label="one token"),
    ]
    for n in (20, 200):
        ids = rng.integers(0, 3, n).tolist()
        cases.append(Case((ids, (int(ids[0]), int(ids[1])), 259), label=f"random, {n} tokens"))
    return cases


register(
    "tokens.merge",
    title="One BPE merge step",
    points=2,
    reference=bpe.merge_pair,
    cases=_merge_cases,
    test=_diagnosing_test(_list_compare, MERGE_MISTAKES),
    wrong=MERGE_MISTAKES,
    hint="walk through the list with an index; where the pair starts, emit new_id and jump two "
         "places, otherwise copy one token and move one place; do not forget the last token",
)


# --------------------------------------------------------------------------------------------
# tokens.encode: apply a merge list
# --------------------------------------------------------------------------------------------
def _encode_reversed(ids, merges):
    ids = list(ids)
    for k in reversed(range(len(merges))):
        ids = bpe.merge_pair(ids, merges[k], 256 + k)
    return ids


def _encode_first_only(ids, merges):
    ids = list(ids)
    for k, pair in enumerate(merges):
        ids = _merge_first_only(ids, pair, 256 + k)
    return ids


def _encode_off_by_one(ids, merges):
    return bpe.encode_with_merges(ids, merges, first_id=257)


def _encode_one_pass(ids, merges):
    """Merges applied while walking the text once, each position taking the first merge listed
    that matches there: the order of the merges is not respected."""
    ids, out, i = list(ids), [], 0
    ranks = {tuple(p): k for k, p in enumerate(merges)}
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) in ranks:
            out.append(256 + ranks[(ids[i], ids[i + 1])])
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


ENCODE_MISTAKES = {
    "the merges are applied in reverse order; merge 0 was learned first and must be applied "
    "first": _encode_reversed,
    "each merge replaces only its first occurrence": _encode_first_only,
    "off by one in the new ids: merge k creates token 256 + k": _encode_off_by_one,
    "one left-to-right pass: a merge must be applied to the whole sequence, in the order of the "
    "list, before the next one": _encode_one_pass,
}


def _encode_cases(rng):
    def trained(text, n):
        return bpe.train_bpe(text, 256 + n, pattern=None, min_count=1).merges

    cases = []
    for text, n in [("aaabdaaabac", 3), ("abababab", 3), ("the cat sat on the mat", 6),
                    ("mississippi", 4), ("naïve café", 3)]:
        cases.append(Case((list(text.encode("utf-8")), trained(text, n)),
                          label=f"{text!r}, {n} merges"))
    cases.append(Case((list(b"hello"), []), label="no merges"))
    cases.append(Case(([], [(104, 101)]), label="empty input"))
    words = ["low", "lower", "newest", "widest", "lowest", "new"]
    text = " ".join(rng.choice(words, 40).tolist())
    merges = trained(text, 12)
    cases.append(Case((list(b"the lowest newer slower"), merges),
                      label="12 merges learned on other text, applied to new text"))
    return cases


register(
    "tokens.encode",
    title="Encoding with a merge list",
    points=2,
    reference=bpe.encode_with_merges,
    cases=_encode_cases,
    test=_diagnosing_test(_list_compare, ENCODE_MISTAKES),
    wrong=ENCODE_MISTAKES,
    hint="loop over the merges in the order given; merge k replaces its pair everywhere by the "
         "id 256 + k (use bpe.merge_pair or your own merge) before merge k + 1 is applied",
)


# --------------------------------------------------------------------------------------------
# tokens.quantise: probabilities -> integer frequencies
# --------------------------------------------------------------------------------------------
def _quantise_no_floor_guarantee(probs, total):
    return np.floor(np.asarray(probs, np.float64) * total).astype(np.int64)


def _quantise_plus_one_full_total(probs, total):
    return 1 + np.floor(np.asarray(probs, np.float64) * total).astype(np.int64)


def _quantise_round(probs, total):
    p = np.asarray(probs, np.float64)
    return 1 + np.round(p * (total - p.shape[-1])).astype(np.int64)


QUANTISE_MISTAKES = {
    "floor(p * total) without the +1: an unlikely symbol gets frequency 0 and can never be "
    "coded": _quantise_no_floor_guarantee,
    "1 + floor(p * total): the V extra counts make the total exceed `total`; scale by "
    "total - V": _quantise_plus_one_full_total,
    "rounding to nearest instead of rounding down (floor)": _quantise_round,
}


def _quantise_cases(rng):
    def dirichlet(v, n, a):
        return rng.dirichlet(np.full(v, a), size=n)

    peaked = np.full(6, 1e-12)
    peaked[2] = 1 - 5e-12
    return [
        Case((np.array([0.5, 0.25, 0.25]), 16), label="3 symbols, total 16"),
        Case((np.array([1.0, 0.0, 0.0, 0.0]), 1 << 16), label="one certain symbol"),
        Case((np.full(10, 0.1), 1000), label="uniform over 10"),
        Case((peaked, 1 << 24), label="very peaked"),
        Case((dirichlet(5, 4, 1.0), 1 << 12), label="4 rows of 5, total 2**12"),
        Case((dirichlet(96, 8, 0.1), 1 << 24), label="8 rows of 96, total 2**24"),
        Case((dirichlet(2, 3, 0.5), 7), label="2 symbols, total 7"),
    ]


register(
    "tokens.quantise",
    title="Quantising a distribution to integer frequencies",
    points=2,
    reference=coding.quantise,
    cases=_quantise_cases,
    test=_diagnosing_test(_array_compare(rtol=0, atol=0), QUANTISE_MISTAKES),
    wrong=QUANTISE_MISTAKES,
    hint="reserve one count for every symbol first (V in all), share the rest, total - V, in "
         "proportion to p rounding down, and return integers",
)


# --------------------------------------------------------------------------------------------
# tokens.narrow: the interval update
# --------------------------------------------------------------------------------------------
def _narrow_no_plus_one(low, high, cum_low, cum_high, total):
    r = high - low
    return low + r * cum_low // total, low + r * cum_high // total - 1


def _narrow_no_minus_one(low, high, cum_low, cum_high, total):
    r = high - low + 1
    return low + r * cum_low // total, low + r * cum_high // total


def _narrow_divide_first(low, high, cum_low, cum_high, total):
    r = high - low + 1
    return low + r // total * cum_low, low + r // total * cum_high - 1


def _narrow_not_offset(low, high, cum_low, cum_high, total):
    r = high - low + 1
    return r * cum_low // total, r * cum_high // total - 1


NARROW_MISTAKES = {
    "the width of [low, high] is one integer short: both ends are inside the interval":
        _narrow_no_plus_one,
    "the new high is the last integer INSIDE the symbol's slice: the -1 is missing":
        _narrow_no_minus_one,
    "dividing before multiplying (r // total * C) throws away precision: multiply first":
        _narrow_divide_first,
    "the new interval must start from low: low + ..., not 0 + ...": _narrow_not_offset,
}


def _narrow_cases(rng):
    top = (1 << 32) - 1
    cases = [
        Case((0, top, 0, 3, 10), label="first symbol, full interval"),
        Case((0, top, 7, 10, 10), label="last symbol"),
        Case((1 << 30, (3 << 30) - 1, 2, 5, 9), label="a middle interval"),
        Case((100, 227, 1, 2, 3), label="a small interval"),
        Case((0, top, 123, 124, 1 << 24), label="frequency 1 of 2**24"),
    ]
    for i in range(4):
        low = int(rng.integers(0, 1 << 31))
        high = low + int(rng.integers(1 << 30, 1 << 31))
        total = int(rng.integers(2, 1 << 24))
        a = int(rng.integers(0, total))
        b = int(rng.integers(a + 1, total + 1))
        cases.append(Case((low, high, a, b, total), label=f"random {i + 1}"))
    return cases


register(
    "tokens.narrow",
    title="The arithmetic coder's interval update",
    points=2,
    reference=coding.narrow,
    cases=_narrow_cases,
    test=_diagnosing_test(_array_compare(rtol=0, atol=0), NARROW_MISTAKES),
    wrong=NARROW_MISTAKES,
    hint="the interval [low, high] holds high - low + 1 integers; the symbol gets the part from "
         "fraction cum_low / total to cum_high / total of them, counted from low, in integer "
         "arithmetic (multiply, then floor-divide)",
)


# --------------------------------------------------------------------------------------------
# tokens.code_length: -sum log2 p
# --------------------------------------------------------------------------------------------
def _len_nats(probs, symbols):
    p = np.asarray(probs, np.float64)
    return float(-np.sum(np.log(p[np.arange(len(symbols)), symbols])))


def _len_mean(probs, symbols):
    return coding.code_length(probs, symbols) / len(symbols)


def _len_entropy(probs, symbols):
    p = np.asarray(probs, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(-np.nansum(p * np.log2(p)))


def _len_shifted(probs, symbols):
    p = np.asarray(probs, np.float64)
    x = np.asarray(symbols)
    return float(-np.sum(np.log2(p[np.arange(len(x) - 1), x[1:]])))


LENGTH_MISTAKES = {
    "natural logarithm: that is nats, the length in bits uses log2": _len_nats,
    "the mean over symbols: the code length of the sequence is the SUM": _len_mean,
    "the entropy of each row: the length counts the probability of the symbol that occurred, "
    "not the average over all symbols": _len_entropy,
    "off by one: row t is the distribution of symbol t itself, not of symbol t + 1":
        _len_shifted,
}


def _length_cases(rng):
    def case(n, v, a, label):
        p = rng.dirichlet(np.full(v, a), size=n)
        x = np.array([rng.choice(v, p=row) for row in p])
        return Case((p, x), label=label)

    tiny = np.array([[1e-300, 1 - 1e-300], [0.5, 0.5]])
    return [
        Case((np.array([[0.5, 0.5]]), np.array([1])), label="one fair coin: 1 bit"),
        Case((np.full((8, 4), 0.25), np.arange(8) % 4), label="8 uniform symbols of 4: 16 bits"),
        Case((tiny, np.array([0, 1])), label="a probability of 1e-300"),
        case(20, 3, 1.0, "20 symbols of 3"),
        case(300, 96, 0.2, "300 symbols of 96"),
    ]


register(
    "tokens.code_length",
    title="The ideal code length",
    points=1,
    reference=coding.code_length,
    cases=_length_cases,
    test=_diagnosing_test(_array_compare(rtol=1e-9, atol=1e-9), LENGTH_MISTAKES),
    wrong=LENGTH_MISTAKES,
    hint="pick, in row t, the probability of the symbol that occurred at t; the length is the "
         "sum over t of minus its base-2 logarithm",
)

