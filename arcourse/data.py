r"""Offline data sets: nothing here touches the network.

* :class:`MarkovSource` — a seeded order-$k$ Markov chain over a small alphabet whose entropy
  rate is computed exactly, so a chapter can show the gap between a model and the best possible.
* :func:`char_corpus` — about 465K characters of the Python language reference, the text of
  ``pydoc_data.topics`` as shipped with CPython 3.11.7. The text differs between Python versions,
  so a gzipped snapshot of that exact text ships inside ``arcourse``: every learner, on every
  Python, gets the same characters and the same numbers.
* :func:`digits` — ``sklearn.datasets.load_digits`` (8x8 images with 17 grey levels, shipped with
  scikit-learn) with a fixed train / test split.
* :func:`random_windows` — a jit-able sampler of (input, shifted target) windows for training.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "MarkovSource",
    "CharCorpus",
    "char_corpus",
    "Digits",
    "digits",
    "random_windows",
    "CORPUS_SHA256",
]


# --------------------------------------------------------------------------------------------
# The synthetic Markov source
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class MarkovSource:
    r"""A stationary order-$k$ Markov chain over the alphabet $\{0, \dots, V-1\}$.

    $p(x_t \mid x_{<t}) = T[x_{t-k} \dots x_{t-1}, x_t]$, where the context $c$ is read as a
    base-$V$ number with the oldest symbol most significant. The first $k$ symbols are drawn from
    the stationary distribution $\pi$ over contexts, so every window of the chain has the same law.

    The entropy rate is exact: $H = \sum_c \pi(c)\, H(T[c])$ nats per symbol.
    """

    order: int
    vocab_size: int
    transitions: np.ndarray  # (V**k, V), rows sum to one

    def __post_init__(self):
        if not isinstance(self.order, int | np.integer) or self.order < 1:
            raise ValueError(f"order must be an integer >= 1, got {self.order!r}")
        if not isinstance(self.vocab_size, int | np.integer) or self.vocab_size < 2:
            raise ValueError(f"vocab_size must be an integer >= 2, got {self.vocab_size!r}")
        t = np.asarray(self.transitions, dtype=np.float64)
        want = (self.vocab_size**self.order, self.vocab_size)
        if t.shape != want:
            raise ValueError(f"transitions must have shape {want}, got {t.shape}")
        if np.any(t < 0) or not np.allclose(t.sum(1), 1.0):
            raise ValueError("transitions must be non-negative with rows summing to one")
        object.__setattr__(self, "transitions", t)

    @classmethod
    def random(cls, order: int = 2, vocab_size: int = 4, concentration: float = 0.5, seed: int = 0):
        """A source whose rows are drawn from a symmetric Dirichlet(``concentration``).

        Smaller concentrations give peakier, more predictable rows (a lower entropy rate).
        """
        if concentration <= 0:
            raise ValueError(f"concentration must be > 0, got {concentration!r}")
        rng = np.random.default_rng(seed)
        t = rng.dirichlet(np.full(vocab_size, concentration), size=vocab_size**order)
        return cls(order=order, vocab_size=vocab_size, transitions=t)

    @property
    def num_contexts(self) -> int:
        return self.vocab_size**self.order

    @cached_property
    def stationary(self) -> np.ndarray:
        r"""Stationary distribution $\pi$ over contexts: $\pi = \pi P$ for the context chain."""
        V, C = self.vocab_size, self.num_contexts
        P = np.zeros((C, C))
        for c in range(C):
            for x in range(V):
                P[c, (c * V + x) % C] += self.transitions[c, x]
        # Solve pi (P - I) = 0 with sum(pi) = 1 as a least-squares system: exact up to rounding.
        A = np.vstack([P.T - np.eye(C), np.ones((1, C))])
        b = np.zeros(C + 1)
        b[-1] = 1.0
        pi, *_ = np.linalg.lstsq(A, b, rcond=None)
        pi = np.clip(pi, 0.0, None)
        return pi / pi.sum()

    def entropy_rate(self) -> float:
        r"""$H = -\sum_c \pi(c) \sum_x T[c,x] \ln T[c,x]$ in nats per symbol (exact)."""
        t = self.transitions
        row_h = -np.sum(np.where(t > 0, t * np.log(np.where(t > 0, t, 1.0)), 0.0), axis=1)
        return float(self.stationary @ row_h)

    def context_ids(self, seq) -> np.ndarray:
        """Context index of every position t >= k of ``seq``: shape (len(seq) - k,)."""
        from arcourse.counting import context_ids

        return context_ids(self._check_seq(seq), self.order, self.vocab_size)

    def conditional_log_probs(self, seq) -> np.ndarray:
        r"""$\ln p(x_t \mid x_{t-k:t})$ for $t = k, \dots, T-1$ under the true source."""
        seq = self._check_seq(seq)
        with np.errstate(divide="ignore"):
            return np.log(self.transitions[self.context_ids(seq), seq[self.order :]])

    def log_prob(self, seq) -> float:
        r"""Exact $\ln p(x_{1:T})$: the stationary law of the first $k$ symbols, then the chain."""
        seq = self._check_seq(seq)
        first = 0
        for j in range(self.order):
            first = first * self.vocab_size + int(seq[j])
        with np.errstate(divide="ignore"):
            return float(np.log(self.stationary[first]) + self.conditional_log_probs(seq).sum())

    def next_symbol_probs(self, prefix) -> np.ndarray:
        r"""$p(x_t = \cdot \mid x_{<t} = \text{prefix})$ under the stationary chain, shape (V,).

        Past the first $k$ symbols this is a row of the transition table; before that it is the
        conditional of the stationary law of the first $k$ symbols (marginalised over the rest).
        """
        prefix = np.asarray(prefix, dtype=np.int64).reshape(-1)
        k, V = self.order, self.vocab_size
        if prefix.size and (prefix.min() < 0 or prefix.max() >= V):
            raise ValueError(f"prefix symbols must lie in [0, {V})")
        t = len(prefix)
        if t >= k:
            c = 0
            for x in prefix[t - k :]:
                c = c * V + int(x)
            return self.transitions[c].copy()
        joint = self.stationary.reshape((V,) * k)  # law of the first k symbols
        marg = joint.sum(axis=tuple(range(t + 1, k))) if t + 1 < k else joint
        row = marg[tuple(prefix)]
        return row / row.sum()

    def sample(self, seed, length: int) -> np.ndarray:
        """Draw one sequence of ``length`` symbols (int32) by ancestral sampling. ``seed`` (an
        integer or a ``numpy.random.Generator``) comes first, as every sampler's key does."""
        if not isinstance(length, int | np.integer) or length < self.order:
            raise ValueError(f"length must be an integer >= order={self.order}, got {length!r}")
        rng = np.random.default_rng(seed)
        V, C, k = self.vocab_size, self.num_contexts, self.order
        c0 = rng.choice(C, p=self.stationary)
        first = [(c0 // V ** (k - 1 - j)) % V for j in range(k)]
        # Inverse-CDF sampling inside one compiled scan: fast even for millions of symbols.
        cdf = jnp.asarray(np.cumsum(self.transitions, axis=1), jnp.float32)
        u = jnp.asarray(rng.random(length - k), jnp.float32)

        def step(c, ui):
            x = jnp.minimum(jnp.sum(cdf[c] < ui), V - 1)
            return (c * V + x) % C, x

        _, xs = jax.lax.scan(step, jnp.int32(c0), u)
        return np.concatenate([np.asarray(first, np.int32), np.asarray(xs, np.int32)])

    def _check_seq(self, seq) -> np.ndarray:
        seq = np.asarray(seq)
        if seq.ndim != 1 or len(seq) < self.order:
            raise ValueError(
                f"seq must be a 1-D sequence of at least order={self.order} symbols, "
                f"got shape {seq.shape}"
            )
        if seq.size and (seq.min() < 0 or seq.max() >= self.vocab_size):
            raise ValueError(f"seq symbols must lie in [0, {self.vocab_size}), got {seq.min()}..{seq.max()}")
        return seq.astype(np.int64)

    def all_sequences(self, length: int) -> np.ndarray:
        """Every sequence of ``length`` symbols, shape (V**length, length): for enumeration proofs."""
        return np.array(list(itertools.product(range(self.vocab_size), repeat=length)), np.int32)


# --------------------------------------------------------------------------------------------
# The character corpus
# --------------------------------------------------------------------------------------------
CORPUS_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"
_CORPUS_FILE = "pydoc_topics_py3.11.7.txt.gz"
_ASCII_FOR = {"‘": "'", "’": "'", "“": '"', "”": '"', "–": "-", "—": "-", "…": "...", "°": "o",
              "ß": "ss"}


def _raw_corpus() -> str:
    raw = resources.files("arcourse").joinpath("_data", _CORPUS_FILE).read_bytes()
    text = gzip.decompress(raw).decode("utf-8")
    if hashlib.sha256(text.encode("utf-8")).hexdigest() != CORPUS_SHA256:
        raise RuntimeError(f"the corpus snapshot {_CORPUS_FILE} is corrupted (checksum mismatch)")
    return text


@dataclass(frozen=True, eq=False)
class CharCorpus:
    """A character corpus with a fixed contiguous split: the first 90% trains, the rest validates."""

    text: str
    chars: str
    train: np.ndarray = field(repr=False)
    valid: np.ndarray = field(repr=False)

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, s: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.chars)}
        missing = sorted(set(s) - set(index))
        if missing:
            raise ValueError(f"characters not in the vocabulary: {missing!r}")
        return np.array([index[c] for c in s], dtype=np.int32)

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        return "".join(self.chars[int(i)] for i in ids)


def char_corpus(valid_fraction: float = 0.1) -> CharCorpus:
    """The Python language reference as plain ASCII (printable characters and newlines).

    The few typographic characters (curly quotes, dashes, ...) are mapped to ASCII.
    """
    if not 0 < valid_fraction < 1:
        raise ValueError(f"valid_fraction must lie in (0, 1), got {valid_fraction!r}")
    text = "".join(_ASCII_FOR.get(c, c) for c in _raw_corpus())
    text = "".join(c if (c == "\n" or " " <= c <= "~") else "?" for c in text)
    chars = "".join(sorted(set(text)))
    ids = np.frombuffer(text.encode("ascii"), dtype=np.uint8)
    lut = np.zeros(128, np.int32)
    lut[np.frombuffer(chars.encode("ascii"), np.uint8)] = np.arange(len(chars))
    ids = lut[ids]
    cut = int(round(len(ids) * (1 - valid_fraction)))
    return CharCorpus(text=text, chars=chars, train=ids[:cut], valid=ids[cut:])


# --------------------------------------------------------------------------------------------
# The digits
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class Digits:
    """8x8 digit images, integer grey levels 0..16, with labels 0..9."""

    x_train: np.ndarray = field(repr=False)  # (1500, 8, 8) int32
    y_train: np.ndarray = field(repr=False)  # (1500,) int32
    x_test: np.ndarray = field(repr=False)  # (297, 8, 8) int32
    y_test: np.ndarray = field(repr=False)  # (297,) int32
    levels: int = 17


def _digits_table() -> np.ndarray:
    """The 1797 rows of scikit-learn's digits (64 grey levels, then the label), as
    ``sklearn.datasets.load_digits`` reads them: from the file scikit-learn ships, found without
    importing scikit-learn (that import alone takes about a second); through ``load_digits`` if
    the file is not where it was."""
    import gzip
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("sklearn")
    if spec is not None and spec.origin is not None:
        path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
        if path.is_file():
            with gzip.open(path, "rt") as f:
                return np.loadtxt(f, delimiter=",")
    from sklearn.datasets import load_digits

    d = load_digits()
    return np.concatenate([d.data, d.target[:, None]], axis=1)


def digits(num_train: int = 1500, seed: int = 0) -> Digits:
    """``sklearn.datasets.load_digits`` split by a fixed permutation into train and test."""
    table = _digits_table()
    if not 0 < num_train < len(table):
        raise ValueError(f"num_train must lie in (0, {len(table)}), got {num_train!r}")
    x = table[:, :-1].reshape(-1, 8, 8).astype(np.int32)
    y = table[:, -1].astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, te = perm[:num_train], perm[num_train:]
    return Digits(x_train=x[tr], y_train=y[tr], x_test=x[te], y_test=y[te])


# --------------------------------------------------------------------------------------------
# Batching
# --------------------------------------------------------------------------------------------
def random_windows(key: jax.Array, tokens: jax.Array, batch_size: int, length: int):
    """Random (inputs, targets) windows from a 1-D token array, targets shifted by one.

    ``inputs[b] = tokens[s_b : s_b + length]`` and ``targets[b] = tokens[s_b + 1 : s_b + length + 1]``.
    Traceable under ``jit``: sizes are static, the starts are random.
    """
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    if tokens.shape[0] < length + 1:
        raise ValueError(f"tokens must hold at least length+1={length + 1} symbols, got {tokens.shape[0]}")
    starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - length)
    idx = starts[:, None] + jnp.arange(length + 1)[None, :]
    win = tokens[idx]
    return win[:, :-1], win[:, 1:]


# --------------------------------------------------------------------------------------------
# Synthetic audio (chapter 07, WaveNet)
# --------------------------------------------------------------------------------------------
__all__ += ["AUDIO_SAMPLE_RATE", "NOTE_NAMES", "NOTE_FREQUENCIES", "synth_note", "synth_melody",
            "AudioClips", "audio_clips"]

AUDIO_SAMPLE_RATE = 4000
# A C-major pentatonic scale over an octave and a half: any melody drawn from it sounds consonant.
NOTE_NAMES = ("C4", "D4", "E4", "G4", "A4", "C5", "D5", "E5")
NOTE_FREQUENCIES = (261.63, 293.66, 329.63, 392.00, 440.00, 523.25, 587.33, 659.26)
_HARMONICS = (1.0, 0.5, 0.25)  # amplitudes of the fundamental and the 2nd and 3rd harmonics


def synth_note(note: int, num_samples: int, *, sample_rate: int = AUDIO_SAMPLE_RATE,
               velocity: float = 0.6, detune: float = 0.0, phase: float = 0.0,
               attack: float = 0.01, decay: float = 0.25, noise: float = 0.0,
               rng: np.random.Generator | None = None) -> np.ndarray:
    r"""One plucked note of the scale, float32 (num_samples,) in $[-1, 1]$.

    $$s(t) = v\, e(t) \sum_{h=1}^{3} a_h \sin(2\pi h f t + h\phi) \big/ \textstyle\sum_h a_h
    + \sigma \varepsilon_t,$$

    with $f$ = ``NOTE_FREQUENCIES[note]`` $\cdot (1 + \text{detune})$, harmonic amplitudes
    $a = (1, 0.5, 0.25)$ (the third harmonic of the highest note, 1978 Hz, stays below the
    Nyquist frequency of 2 kHz), an envelope $e(t)$ rising linearly over ``attack`` seconds and
    decaying as $e^{-t/\text{decay}}$, and white noise $\varepsilon_t \sim \mathcal N(0, 1)$ of
    standard deviation $\sigma$ = ``noise`` (drawn from ``rng``).
    """
    if isinstance(note, bool) or not isinstance(note, int | np.integer) \
            or not 0 <= note < len(NOTE_FREQUENCIES):
        raise ValueError(f"note must be an integer in [0, {len(NOTE_FREQUENCIES)}), got {note!r}")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer) \
            or num_samples < 1:
        raise ValueError(f"num_samples must be an integer >= 1, got {num_samples!r}")
    if not 0 < velocity <= 1:
        raise ValueError(f"velocity must lie in (0, 1], got {velocity!r}")
    if attack <= 0 or decay <= 0 or noise < 0:
        raise ValueError(f"attack and decay must be > 0 and noise >= 0, got {attack!r}, "
                         f"{decay!r}, {noise!r}")
    t = np.arange(num_samples) / sample_rate
    f = NOTE_FREQUENCIES[note] * (1.0 + detune)
    tone = sum(a * np.sin(2 * np.pi * (h + 1) * f * t + (h + 1) * phase)
               for h, a in enumerate(_HARMONICS)) / sum(_HARMONICS)
    envelope = np.minimum(t / attack, 1.0) * np.exp(-t / decay)
    s = velocity * envelope * tone
    if noise:
        s = s + noise * (rng if rng is not None else np.random.default_rng(0)).normal(size=t.shape)
    return np.clip(s, -1.0, 1.0).astype(np.float32)


def synth_melody(notes, *, note_samples: int = 1000, seed: int = 0,
                 sample_rate: int = AUDIO_SAMPLE_RATE, noise: float = 0.004) -> np.ndarray:
    """A short melody: the ``notes`` (scale degrees) played one after the other, each for
    ``note_samples`` samples, with random velocities and phases; float32 (len(notes) * note_samples,)."""
    rng = np.random.default_rng(seed)
    return np.concatenate([
        synth_note(int(n), note_samples, sample_rate=sample_rate,
                   velocity=float(rng.uniform(0.4, 0.8)), phase=float(rng.uniform(0, 2 * np.pi)),
                   noise=noise, rng=rng)
        for n in notes])


@dataclass(frozen=True, eq=False)
class AudioClips:
    """Labelled note clips: ``train`` / ``test`` float32 (N, T) in [-1, 1], ``*_notes`` int32 (N,)."""

    train: np.ndarray = field(repr=False)
    train_notes: np.ndarray = field(repr=False)
    test: np.ndarray = field(repr=False)
    test_notes: np.ndarray = field(repr=False)
    sample_rate: int = AUDIO_SAMPLE_RATE
    note_names: tuple = NOTE_NAMES

    @property
    def num_notes(self) -> int:
        return len(self.note_names)


def audio_clips(num_train: int = 192, num_test: int = 48, *, num_samples: int = 2048,
                noise: float = 0.004, seed: int = 0) -> AudioClips:
    r"""A seeded data set of single notes at 4 kHz, each labelled with its note (for conditioning).

    Every clip is :func:`synth_note` of a random note of the scale with a random velocity in
    $[0.4, 0.8]$, detune in $\pm 0.5\%$, phase, decay time in $[0.15, 0.4]$ s and noise of
    standard deviation ``noise``; ``num_samples`` samples (0.512 s by default). The held-out clips
    come from the same generator after the training ones, so the split is fixed by ``seed``.
    """
    for name, v in (("num_train", num_train), ("num_test", num_test),
                    ("num_samples", num_samples)):
        if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    rng = np.random.default_rng(seed)
    n = num_train + num_test
    notes = rng.integers(0, len(NOTE_FREQUENCIES), size=n).astype(np.int32)
    waves = np.stack([
        synth_note(int(k), num_samples, velocity=float(rng.uniform(0.4, 0.8)),
                   detune=float(rng.uniform(-0.005, 0.005)),
                   phase=float(rng.uniform(0, 2 * np.pi)), decay=float(rng.uniform(0.15, 0.4)),
                   noise=noise, rng=rng)
        for k in notes])
    return AudioClips(train=waves[:num_train], train_notes=notes[:num_train],
                      test=waves[num_train:], test_notes=notes[num_train:])
