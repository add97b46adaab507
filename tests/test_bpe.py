"""Byte-level BPE (chapter 13): exact round trip on any string, the fast encoder equals the
definition, the incremental merge loop equals the naive one."""

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from arcourse import bpe, data


@pytest.fixture(scope="module")
def tokenizer():
    corpus = data.char_corpus()
    return bpe.train_bpe(corpus.text[:60_000], 256 + 300)


def naive_train(text, vocab_size, pattern=bpe.GPT2_SPLIT, min_count=2):
    """The merge loop with every pair recounted from scratch: slow and obviously right."""
    words = Counter(bpe.split_words(text, pattern))
    seqs = {w: list(w.encode("utf-8")) for w in words}
    merges = []
    while len(merges) < vocab_size - 256:
        counts = Counter()
        for w, f in words.items():
            for p in zip(seqs[w], seqs[w][1:]):
                counts[p] += f
        if not counts:
            break
        pair = min(counts, key=lambda p: (-counts[p], p))
        if counts[pair] < min_count:
            break
        merges.append(pair)
        seqs = {w: bpe.merge_pair(s, pair, 255 + len(merges)) for w, s in seqs.items()}
    return merges


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_on_any_unicode_string(tokenizer, s):
    ids = tokenizer.encode(s)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert tokenizer.decode(ids) == s
    assert len(ids) <= len(s.encode("utf-8"))  # a merge only ever shortens


@settings(max_examples=100, deadline=None)
@given(st.text())
def test_split_words_partition_the_text(s):
    assert "".join(bpe.split_words(s)) == s


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab cé\n_1'"), max_size=60))
def test_fast_encoder_equals_applying_the_merges_in_order(tokenizer, s):
    small = tokenizer.truncated(120)
    expected = []
    for w in bpe.split_words(s):
        expected += bpe.encode_with_merges(list(w.encode("utf-8")), small.merges)
    assert small.encode(s).tolist() == expected


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from("aab bc\nd"), max_size=80), st.integers(0, 12))
def test_incremental_training_equals_naive_training(text, num_merges):
    for pattern in (bpe.GPT2_SPLIT, None):
        got = bpe.train_bpe(text, 256 + num_merges, pattern=pattern, min_count=1).merges
        assert got == naive_train(text, 256 + num_merges, pattern, min_count=1)


def test_incremental_training_equals_naive_on_the_corpus():
    text = data.char_corpus().text[:8000]
    assert bpe.train_bpe(text, 256 + 60).merges == naive_train(text, 256 + 60)


def test_truncated_is_training_to_the_smaller_size(tokenizer):
    text = data.char_corpus().text[:60_000]
    assert tokenizer.truncated(50).merges == bpe.train_bpe(text, 256 + 50).merges
    assert tokenizer.truncated(0).encode("abc").tolist() == [97, 98, 99]


def test_unseen_characters_fall_back_to_bytes(tokenizer):
    s = "naïve café — 日本語 🙂"
    ids = tokenizer.encode(s)
    assert tokenizer.decode(ids) == s
    assert any(i < 256 for i in ids)  # bytes the corpus never showed stay single bytes


def test_merge_pair_is_left_to_right_and_non_overlapping():
    assert bpe.merge_pair([1, 1, 1], (1, 1), 9) == [9, 1]
    assert bpe.merge_pair([1, 1, 1, 1], (1, 1), 9) == [9, 9]
    assert bpe.merge_pair([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]
    assert bpe.merge_pair([], (1, 2), 9) == []
    assert bpe.most_frequent_pair([3, 4, 1, 2]) == (1, 2)  # a tie goes to the smallest pair
    assert bpe.most_frequent_pair([5]) is None


def test_tokens_per_char_fall_with_the_vocabulary(tokenizer):
    text = data.char_corpus().text[-20_000:]
    rates = [tokenizer.truncated(k).tokens_per_char(text) for k in (0, 50, 150, 300)]
    assert rates[0] == 1.0 and all(a > b for a, b in zip(rates, rates[1:]))


def test_errors_are_clear():
    with pytest.raises(ValueError, match="vocab_size"):
        bpe.train_bpe("abc", 100)
    with pytest.raises(ValueError, match="does not exist"):
        bpe.BPE([(300, 1)])
    with pytest.raises(ValueError, match="ids must lie"):
        bpe.BPE([]).decode([256])
    with pytest.raises(ValueError, match="text must be a str"):
        bpe.split_words(b"abc")
