r"""Byte-level byte-pair encoding (chapter 13): the tokenizer of GPT-2, written out.

Byte-pair encoding (Gage 1994; Sennrich, Haddow & Birch 2016) starts from a base vocabulary and
repeatedly *merges* the most frequent adjacent pair of tokens into a new token:

$$(a, b)^\star = \arg\max_{(a, b)} \; \#\{t : x_t = a,\ x_{t+1} = b\}, \qquad
  \text{every } a\,b \text{ in the text} \to \text{the new token } 256 + k \text{ at merge } k.$$

The base vocabulary here is the 256 byte values, as in GPT-2 (Radford et al. 2019): a string is
first written as its UTF-8 bytes, so *any* string can be encoded, characters never seen in
training included (they stay as their bytes), and decoding, the concatenation of each token's
bytes, gives back exactly the input. A token never spans two *words*: the text is first split
by a regular expression (:data:`GPT2_SPLIT`, GPT-2's pattern written for Python's ``re``), the
pairs are counted inside the words, each distinct word once with its frequency.

* :func:`pair_counts`, :func:`most_frequent_pair`, :func:`merge_pair` — one merge step;
* :func:`encode_with_merges` — encoding by definition: apply the merges in the order learned;
* :func:`train_bpe` — the merge loop, with the pair counts updated incrementally (only the words
  that hold the merged pair are touched), returning a :class:`BPE`;
* :class:`BPE` — ``encode(text) -> int32 ids`` and ``decode(ids) -> text``; ``truncated(k)`` is
  the tokenizer with only the first ``k`` merges, exactly what training to ``256 + k`` tokens
  gives, so one training run yields every smaller vocabulary.
"""

from __future__ import annotations

import heapq
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import numpy as np

from arcourse._checks import check_int

__all__ = [
    "GPT2_SPLIT",
    "NUM_BYTES",
    "split_words",
    "pair_counts",
    "most_frequent_pair",
    "merge_pair",
    "encode_with_merges",
    "train_bpe",
    "BPE",
]

NUM_BYTES = 256
# GPT-2's pre-tokenizer, r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",
# for Python's ``re`` (no \p{..} classes): [^\W\d_] are the letters, \d the digits. The
# alternatives cover every character, so the words always concatenate back to the text.
GPT2_SPLIT = r"'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"


def split_words(text: str, pattern: str | None = GPT2_SPLIT) -> list[str]:
    """The words a text is split into before BPE; ``"".join(words) == text``. ``None``: no split."""
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if pattern is None:
        return [text] if text else []
    words = re.findall(pattern, text)
    if sum(map(len, words)) != len(text):  # cannot happen with GPT2_SPLIT; guards custom patterns
        raise ValueError("the split pattern does not cover every character of the text")
    return words


def _check_ids(ids, name="ids") -> list[int]:
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{name} must be a 1-D sequence of integers, got {ids.dtype}{ids.shape}")
        return ids.tolist()
    ids = list(ids)
    if not all(isinstance(i, int | np.integer) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"{name} must be a sequence of integers")
    return [int(i) for i in ids]


def pair_counts(ids: Sequence[int]) -> Counter:
    r"""$N(a, b)$: how often token ``a`` is directly followed by ``b`` in ``ids`` (overlaps count)."""
    ids = _check_ids(ids)
    return Counter(zip(ids, ids[1:]))


def most_frequent_pair(ids: Sequence[int]) -> tuple[int, int] | None:
    """The most frequent adjacent pair; ties go to the smallest pair ``(a, b)``; ``None`` if < 2 ids."""
    counts = pair_counts(ids)
    if not counts:
        return None
    return min(counts, key=lambda p: (-counts[p], p))


def merge_pair(ids: Sequence[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of ``pair`` in ``ids`` by ``new_id``, scanning left to right.

    Occurrences do not overlap: in ``a a a`` the pair ``(a, a)`` is replaced once, at the left,
    giving ``new a``. Returns a new list; ``ids`` is unchanged.
    """
    ids = _check_ids(ids)
    a, b = pair
    out, i, n = [], 0, len(ids)
    while i < n:
        if i + 1 < n and ids[i] == a and ids[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def encode_with_merges(ids: Sequence[int], merges: Sequence[tuple[int, int]],
                       first_id: int = NUM_BYTES) -> list[int]:
    """Encoding by definition: apply merge ``k`` (creating token ``first_id + k``) everywhere, in
    the order the merges were learned. :meth:`BPE.encode` gives the same tokens, faster."""
    ids = _check_ids(ids)
    for k, pair in enumerate(merges):
        ids = merge_pair(ids, pair, first_id + k)
    return ids


def _merge_ranked(ids: list[int], ranks: dict) -> list[int]:
    """Repeatedly merge the present pair of lowest rank (what GPT-2's encoder does)."""
    while len(ids) > 1:
        best = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 62))
        rank = ranks.get(best)
        if rank is None:
            break
        ids = merge_pair(ids, best, NUM_BYTES + rank)
    return ids


def train_bpe(text: str, vocab_size: int, *, pattern: str | None = GPT2_SPLIT,
              min_count: int = 2) -> BPE:
    r"""Learn ``vocab_size - 256`` merges from ``text`` (fewer if no pair occurs ``min_count`` times).

    Each distinct word (UTF-8 bytes) is kept once with its frequency $f_w$; the pair counts
    $N(a,b) = \sum_w f_w \, n_w(a,b)$ live in a dictionary with, for every pair, the set of words
    that contain it, and a heap gives the most frequent pair (ties: the smallest pair). After a
    merge only the words holding the merged pair are re-counted, so a merge costs time in
    proportion to those words, not to the whole text.
    """
    vocab_size = check_int("vocab_size", vocab_size, NUM_BYTES)
    min_count = check_int("min_count", min_count, 1)
    freq = Counter(split_words(text, pattern))
    words = [list(w.encode("utf-8")) for w in freq]
    counts = list(freq.values())

    pairs: defaultdict = defaultdict(int)
    where: defaultdict = defaultdict(set)
    for i, (w, f) in enumerate(zip(words, counts)):
        for p in zip(w, w[1:]):
            pairs[p] += f
            where[p].add(i)
    heap = [(-c, p) for p, c in pairs.items()]
    heapq.heapify(heap)

    merges: list[tuple[int, int]] = []
    while len(merges) < vocab_size - NUM_BYTES and heap:
        neg, pair = heapq.heappop(heap)
        if pairs.get(pair, 0) != -neg:  # a stale entry: the count has changed since it was pushed
            continue
        if -neg < min_count:
            break
        new_id = NUM_BYTES + len(merges)
        merges.append(pair)
        changed = set()
        for i in where.pop(pair):
            w, f = words[i], counts[i]
            for p in zip(w, w[1:]):
                pairs[p] -= f
                changed.add(p)
            w = merge_pair(w, pair, new_id)
            words[i] = w
            for p in zip(w, w[1:]):
                pairs[p] += f
                where[p].add(i)
                changed.add(p)
        for p in changed:
            c = pairs[p]
            if c > 0:
                heapq.heappush(heap, (-c, p))
            else:
                del pairs[p]
                where.pop(p, None)
    return BPE(merges, pattern=pattern)


class BPE:
    """A byte-level BPE tokenizer: ``merges[k] = (a, b)`` created token ``256 + k``.

    ``encode(text)`` -> int32 ids (1-D); ``decode(ids)`` -> text, with
    ``decode(encode(s)) == s`` for every string ``s``.
    """

    def __init__(self, merges: Iterable[tuple[int, int]], *, pattern: str | None = GPT2_SPLIT):
        merges = [(int(a), int(b)) for a, b in merges]
        vocab = [bytes([i]) for i in range(NUM_BYTES)]
        for k, (a, b) in enumerate(merges):
            if not (0 <= a < NUM_BYTES + k and 0 <= b < NUM_BYTES + k):
                raise ValueError(f"merge {k} = {(a, b)} uses a token that does not exist yet")
            vocab.append(vocab[a] + vocab[b])
        self.merges = merges
        self.pattern = pattern
        self.vocab = vocab  # token id -> its bytes
        self._ranks = {p: k for k, p in enumerate(merges)}
        self._cache: dict[str, list[int]] = {}

    def __repr__(self) -> str:
        return f"BPE(vocab_size={self.vocab_size}, merges={len(self.merges)})"

    @property
    def vocab_size(self) -> int:
        return NUM_BYTES + len(self.merges)

    def truncated(self, num_merges: int) -> BPE:
        """The tokenizer with the first ``num_merges`` merges: the one trained to that size."""
        num_merges = check_int("num_merges", num_merges, 0, len(self.merges))
        return BPE(self.merges[:num_merges], pattern=self.pattern)

    def encode_word(self, word: str) -> list[int]:
        """The tokens of one word (cached: a text repeats its words)."""
        ids = self._cache.get(word)
        if ids is None:
            ids = _merge_ranked(list(word.encode("utf-8")), self._ranks)
            self._cache[word] = ids
        return ids

    def encode(self, text: str) -> np.ndarray:
        """``text`` -> token ids, int32 of shape (num_tokens,)."""
        out: list[int] = []
        for w in split_words(text, self.pattern):
            out.extend(self.encode_word(w))
        return np.asarray(out, dtype=np.int32)

    def decode_bytes(self, ids) -> bytes:
        """The concatenated bytes of the tokens."""
        ids = _check_ids(ids)
        if ids and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"ids must lie in [0, {self.vocab_size})")
        return b"".join(self.vocab[i] for i in ids)

    def decode(self, ids) -> str:
        """Token ids -> text. Bytes that are not valid UTF-8 (possible only for id sequences that
        no text encodes to) become U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_str(self, i: int) -> str:
        """A readable form of one token (spaces shown as the middle dot, newlines as the arrow)."""
        s = self.vocab[int(i)].decode("utf-8", errors="backslashreplace")
        return s.replace(" ", "·").replace("\n", "↵")

    def tokens_per_char(self, text: str) -> float:
        """How many tokens a character costs on ``text``: ``len(encode(text)) / len(text)``."""
        if not text:
            raise ValueError("text must not be empty")
        return len(self.encode(text)) / len(text)
