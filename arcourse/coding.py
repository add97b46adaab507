r"""Arithmetic coding (chapter 13): an autoregressive model is a compressor, and its loss is a size.

A model that gives every next symbol a distribution $p(\cdot \mid x_{<t})$ assigns the sequence
the probability $p(x_{1:N}) = \prod_t p(x_t \mid x_{<t})$. Arithmetic coding (Rissanen 1976;
Witten, Neal & Cleary 1987) turns it into a code of about

$$L = -\log_2 p(x_{1:N}) + 2 \text{ bits}$$

by narrowing an interval: symbol $x_t$ with cumulative frequencies $C_t(x) = \sum_{y < x} f_t(y)$
and total $F_t = \sum_y f_t(y)$ maps $[\ell, h]$ (integers, range $r = h - \ell + 1$) to

$$\ell' = \ell + \lfloor r\, C_t(x_t) / F_t \rfloor, \qquad
  h' = \ell + \lfloor r\, C_t(x_t + 1) / F_t \rfloor - 1,$$

and shifts out the leading bits as soon as $\ell'$ and $h'$ agree on them (:func:`narrow` is the
update; :func:`encode` and :func:`decode` the whole coder, with the usual care for an interval
that straddles the middle). Everything is integer arithmetic, so the decoder, which runs the same
model on the symbols it has decoded so far, repeats the encoder's every step exactly.

The model's float probabilities become integer frequencies by :func:`quantise`,
$f(x) = 1 + \lfloor p(x) (F - V) \rfloor$: every symbol keeps a frequency $\ge 1$ (it stays
encodable, however unlikely the model thought it), and the cost of the rounding is tiny when
$F \gg V$. :func:`code_length` is the ideal length $-\sum_t \log_2 p(x_t \mid x_{<t})$.

A **predictor** gives the distributions: ``all_probs(symbols)`` -> (N, V), row $t$ being
$p(\cdot \mid x_{<t})$ for the whole sequence at once (what the encoder uses: teacher forcing),
and ``next_probs(prefix)`` -> (V,), the same row computed from the prefix alone (what the decoder
uses). The two must agree *bit for bit*; the adapters below make sure they do:
:class:`MarkovPredictor` (the true source of chapter 01), :class:`CountPredictor` (chapter 01's
count model), :class:`KneserNeyPredictor` and :class:`NeuralPredictor` (a GPT or an LSTM read
in windows). :func:`compress` and :func:`decompress` put it all together.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from arcourse._checks import check_int

__all__ = [
    "PRECISION",
    "DEFAULT_TOTAL",
    "quantise",
    "narrow",
    "code_length",
    "encode",
    "decode",
    "Predictor",
    "MarkovPredictor",
    "CountPredictor",
    "KneserNeyPredictor",
    "NeuralPredictor",
    "compress",
    "decompress",
]

PRECISION = 32  # bits of the coder's interval
DEFAULT_TOTAL = 1 << 24  # the frequency total a distribution is quantised to (<= 2**(PRECISION-2))
_HEADER = 4  # bytes: the number of symbols, stored in front of the code by compress()


# --------------------------------------------------------------------------------------------
# The pieces: quantisation, the interval update, the ideal length
# --------------------------------------------------------------------------------------------
def quantise(probs, total: int = DEFAULT_TOTAL) -> np.ndarray:
    r"""Integer frequencies $f(x) = 1 + \lfloor p(x)\,(F - V) \rfloor$ from probabilities.

    ``probs`` (..., V), non-negative (they need not sum to exactly one) -> int64 (..., V), every
    entry $\ge 1$, each row summing to at most ``total`` $= F$ (exactly $F$ when a row sums to 1,
    up to the rounding down of each entry).
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim < 1 or p.shape[-1] < 1:
        raise ValueError(f"probs must have a last axis of V >= 1 symbols, got shape {p.shape}")
    V = p.shape[-1]
    total = check_int("total", total, V + 1, 1 << (PRECISION - 2))
    if not np.all(np.isfinite(p)) or np.any(p < 0):
        raise ValueError("probs must be finite and non-negative")
    if np.any(p.sum(-1) > 1 + 1e-6):
        raise ValueError("each row of probs must sum to at most 1")
    return 1 + np.floor(p * (total - V)).astype(np.int64)


def narrow(low: int, high: int, cum_low: int, cum_high: int, total: int) -> tuple[int, int]:
    r"""The interval update for one symbol, in integers: $[\ell, h] \to [\ell', h']$ with
    $r = h - \ell + 1$, $\ell' = \ell + \lfloor r\,C_{lo} / F \rfloor$ and
    $h' = \ell + \lfloor r\,C_{hi} / F \rfloor - 1$, where $[C_{lo}, C_{hi})$ is the symbol's slice
    of the cumulative frequencies and $F$ the total. Both ends are inclusive."""
    r = high - low + 1
    return low + r * cum_low // total, low + r * cum_high // total - 1


def code_length(probs, symbols) -> float:
    r"""The ideal code length in bits, $-\sum_t \log_2 p_t(x_t)$: ``probs`` (N, V), ``symbols`` (N,)."""
    p = np.asarray(probs, dtype=np.float64)
    x = np.asarray(symbols)
    if p.ndim != 2 or x.shape != p.shape[:1]:
        raise ValueError(f"probs must be (N, V) with symbols (N,); got {p.shape} and {x.shape}")
    with np.errstate(divide="ignore"):
        return float(-np.sum(np.log2(p[np.arange(len(x)), x])))


# --------------------------------------------------------------------------------------------
# The coder
# --------------------------------------------------------------------------------------------
def _cumulative(freqs: np.ndarray) -> np.ndarray:
    f = np.asarray(freqs, dtype=np.int64)
    if np.any(f < 1):
        raise ValueError("every frequency must be >= 1 (a symbol of frequency 0 cannot be coded)")
    cum = np.zeros(f.shape[:-1] + (f.shape[-1] + 1,), np.int64)
    np.cumsum(f, axis=-1, out=cum[..., 1:])
    if np.any(cum[..., -1] > 1 << (PRECISION - 2)):
        raise ValueError(f"a frequency total exceeds 2**{PRECISION - 2}")
    return cum


def encode(symbols, freqs) -> bytes:
    """Arithmetic-code ``symbols`` (N,) with frequency table ``freqs[t]`` (N, V) at step t.

    The code is the shortest bit string (padded with zeros to whole bytes) that identifies the
    final interval; :func:`decode` with the same tables gives back the symbols.
    """
    x = np.asarray(symbols, dtype=np.int64)
    f = np.asarray(freqs)
    if f.ndim != 2 or x.shape != f.shape[:1]:
        raise ValueError(f"freqs must be (N, V) with symbols (N,); got {f.shape} and {x.shape}")
    if x.size and (x.min() < 0 or x.max() >= f.shape[1]):
        raise ValueError(f"symbols must lie in [0, {f.shape[1]})")
    cum = _cumulative(f)
    rows = np.arange(len(x))
    lo_l, hi_l, tot_l = cum[rows, x].tolist(), cum[rows, x + 1].tolist(), cum[:, -1].tolist()

    half, quarter = 1 << (PRECISION - 1), 1 << (PRECISION - 2)
    low, high, pending = 0, (1 << PRECISION) - 1, 0
    bits: list[int] = []
    emit = bits.append
    for c_lo, c_hi, total in zip(lo_l, hi_l, tot_l):
        r = high - low + 1
        high = low + r * c_hi // total - 1
        low = low + r * c_lo // total
        while True:
            if high < half:
                emit(0)
                bits.extend([1] * pending)
                pending = 0
            elif low >= half:
                emit(1)
                bits.extend([0] * pending)
                pending = 0
                low -= half
                high -= half
            elif low >= quarter and high < half + quarter:
                pending += 1  # the interval straddles the middle: decide the bit later
                low -= quarter
                high -= quarter
            else:
                break
            low = 2 * low
            high = 2 * high + 1
    # Two more bits (plus the pending ones) pick a point inside the final interval.
    pending += 1
    if low < quarter:
        bits.append(0)
        bits.extend([1] * pending)
    else:
        bits.append(1)
        bits.extend([0] * pending)
    return np.packbits(np.asarray(bits, np.uint8)).tobytes()


def decode(data: bytes, num_symbols: int, next_freqs: Callable[[list[int]], np.ndarray]) -> np.ndarray:
    """Decode ``num_symbols`` symbols; ``next_freqs(decoded_so_far)`` gives step t's table (V,).

    It must return exactly the table the encoder used at that step. Returns int64 (num_symbols,).
    """
    num_symbols = check_int("num_symbols", num_symbols, 0)
    bits = np.unpackbits(np.frombuffer(bytes(data), np.uint8)).tolist()
    nbits = len(bits)
    half, quarter = 1 << (PRECISION - 1), 1 << (PRECISION - 2)
    low, high = 0, (1 << PRECISION) - 1
    value, pos = 0, 0
    for _ in range(PRECISION):
        value = 2 * value + (bits[pos] if pos < nbits else 0)
        pos += 1
    out: list[int] = []
    for _ in range(num_symbols):
        cum = _cumulative(next_freqs(out))
        if cum.ndim != 1:
            raise ValueError(f"next_freqs must return one table (V,), got shape {cum.shape[:-1]}+(V,)")
        total = int(cum[-1])
        r = high - low + 1
        target = ((value - low + 1) * total - 1) // r
        s = int(np.searchsorted(cum, target, side="right")) - 1
        out.append(s)
        high = low + r * int(cum[s + 1]) // total - 1
        low = low + r * int(cum[s]) // total
        while True:
            if high < half:
                pass
            elif low >= half:
                low -= half
                high -= half
                value -= half
            elif low >= quarter and high < half + quarter:
                low -= quarter
                high -= quarter
                value -= quarter
            else:
                break
            low = 2 * low
            high = 2 * high + 1
            value = 2 * value + (bits[pos] if pos < nbits else 0)
            pos += 1
    return np.asarray(out, np.int64)


# --------------------------------------------------------------------------------------------
# Predictors: a model's next-symbol distributions, for the encoder and for the decoder
# --------------------------------------------------------------------------------------------
class Predictor:
    """The interface :func:`compress` needs. Subclasses set ``vocab_size`` and implement both."""

    vocab_size: int

    def all_probs(self, symbols) -> np.ndarray:
        """Row t: $p(\\cdot \\mid x_{<t})$ for t = 0..N-1, shape (N, V)."""
        raise NotImplementedError

    def next_probs(self, prefix) -> np.ndarray:
        """$p(\\cdot \\mid \\text{prefix})$, shape (V,): bit for bit row ``len(prefix)`` of all_probs.

        ``prefix`` may be a list that grows by one symbol per call (the decoder's): read only the
        part of it the model needs."""
        raise NotImplementedError

    def _check(self, symbols, name="symbols") -> np.ndarray:
        x = np.asarray(symbols)
        if x.ndim != 1 or (x.size and not np.issubdtype(x.dtype, np.integer)):
            raise ValueError(f"{name} must be a 1-D sequence of integer symbols, got {x.dtype}{x.shape}")
        x = x.astype(np.int64)
        if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise ValueError(f"{name} must lie in [0, {self.vocab_size})")
        return x

    def _tail(self, prefix, k: int) -> tuple[np.ndarray, int]:
        """The last (up to) ``k`` symbols of ``prefix`` and its length, without copying it all."""
        t = len(prefix)
        return self._check(prefix[max(0, t - k):], "prefix"), t


def _base_v(rows: np.ndarray, V: int) -> np.ndarray:
    """Each row of symbols (..., k) read as one base-V number, oldest symbol most significant."""
    key = np.zeros(rows.shape[:-1], np.int64)
    for j in range(rows.shape[-1]):
        key = key * V + rows[..., j]
    return key


class MarkovPredictor(Predictor):
    """The true distributions of a :class:`arcourse.data.MarkovSource`: the best any model can do."""

    def __init__(self, source):
        self.source = source
        self.vocab_size = int(source.vocab_size)
        k = source.order
        # p(x_t | x_<t) for t < k under the stationary law, as tables over the first t symbols
        self._first = [np.stack([source.next_symbol_probs(np.asarray(c, np.int64))
                                 for c in np.ndindex(*(self.vocab_size,) * t)]) if t else
                       source.next_symbol_probs(np.zeros(0, np.int64))[None]
                       for t in range(k)]

    def _row(self, x: np.ndarray, t: int) -> np.ndarray:
        """Row t, from ``x`` ending just before position t (at least its last k symbols)."""
        k, V = self.source.order, self.vocab_size
        if t < k:
            return self._first[t][_base_v(x[len(x) - t:], V) if t else 0]
        return self.source.transitions[_base_v(x[len(x) - k:], V)]

    def all_probs(self, symbols) -> np.ndarray:
        x = self._check(symbols)
        k, V = self.source.order, self.vocab_size
        head = [self._row(x[:t], t) for t in range(min(k, len(x)))]
        if len(x) <= k:
            return np.asarray(head).reshape(len(x), V)
        windows = np.lib.stride_tricks.sliding_window_view(x[:-1], k)  # x[t-k:t] for t = k..N-1
        return np.concatenate([np.asarray(head), self.source.transitions[_base_v(windows, V)]])

    def next_probs(self, prefix) -> np.ndarray:
        x, t = self._tail(prefix, self.source.order)
        return self._row(x, t)


class CountPredictor(Predictor):
    r"""Chapter 01's count model (:class:`arcourse.counting.NGramCounts`): $p(x_t \mid x_{t-k:t})$
    from its smoothed table, the first $k$ symbols from its lower-order tables."""

    def __init__(self, model):
        if not getattr(model, "tables", None):
            raise ValueError("fit the count model first")
        self.model = model
        self.vocab_size = int(model.vocab_size)
        self._probs = [np.exp(t) for t in model.tables]  # once, so every row is the same floats

    def _row(self, x: np.ndarray, t: int) -> np.ndarray:
        """Row t, from ``x`` ending just before position t (at least its last k symbols)."""
        j = min(self.model.order, t)
        return self._probs[j][_base_v(x[len(x) - j:], self.vocab_size) if j else 0]

    def all_probs(self, symbols) -> np.ndarray:
        x = self._check(symbols)
        k, V = self.model.order, self.vocab_size
        head = [self._row(x[:t], t) for t in range(min(k, len(x)))]
        if len(x) <= k:
            return np.asarray(head).reshape(len(x), V)
        rows = self._probs[k][_base_v(np.lib.stride_tricks.sliding_window_view(x[:-1], k), V)
                              if k else np.zeros(len(x) - k, np.int64)]
        return np.concatenate([np.asarray(head).reshape(-1, V), rows])

    def next_probs(self, prefix) -> np.ndarray:
        x, t = self._tail(prefix, self.model.order)
        return self._row(x, t)


class KneserNeyPredictor(Predictor):
    """A fitted :class:`arcourse.kneser_ney.KneserNey` (or ``AddK``) model; ``context`` are the
    symbols before the coded text (e.g. the end of the training text), known to both sides."""

    def __init__(self, model, context=None, chunk: int = 2048):
        model._require_fit()
        self.model = model
        self.vocab_size = int(model.vocab_size)
        self.chunk = check_int("chunk", chunk)
        ctx = self._check(np.zeros(0, np.int64) if context is None else context, "context")
        self.context = ctx[len(ctx) - min(len(ctx), model.order - 1):]

    def _grams(self, histories: np.ndarray, lengths: np.ndarray) -> dict:
        """The keys of the m-gram (last m-1 history symbols, then every v), -1 where too short.

        ``histories`` (n, order-1) right-aligned, ``lengths`` (n,) how many of them are real.
        The same construction as ``KneserNey.next_distribution``, for n histories at once.
        """
        V, n = self.vocab_size, self.model.order
        v = np.arange(V, dtype=np.int64)
        grams = {}
        for m in range(1, n + 1):
            h = _base_v(histories[:, histories.shape[1] - (m - 1):], V) if m > 1 else \
                np.zeros(len(histories), np.int64)
            key = h[:, None] * V + v[None, :]
            grams[m] = np.where((lengths >= m - 1)[:, None], key, -1).reshape(-1)
        return grams

    def all_probs(self, symbols) -> np.ndarray:
        x = self._check(symbols)
        k, V = self.model.order - 1, self.vocab_size
        full = np.concatenate([np.zeros(k, np.int64), self.context, x])
        start = k + len(self.context)  # index in ``full`` of x_0
        out = np.empty((len(x), V))
        for a in range(0, len(x), self.chunk):
            b = min(a + self.chunk, len(x))
            t = np.arange(start + a, start + b)
            hist = full[t[:, None] - k + np.arange(k)[None, :]] if k else np.zeros((b - a, 0), np.int64)
            lengths = np.minimum(t - k, k)  # symbols of context + x before position t
            out[a:b] = self.model._probs(self._grams(hist, lengths)).reshape(b - a, V)
        return out

    def next_probs(self, prefix) -> np.ndarray:
        k = self.model.order - 1
        x, _ = self._tail(prefix, k)
        h = np.concatenate([self.context, x])[len(self.context) + len(x) - k:] if k else \
            np.zeros(0, np.int64)
        hist = np.concatenate([np.zeros(k - len(h), np.int64), h])[None]
        return self.model._probs(self._grams(hist, np.array([len(h)])))


class NeuralPredictor(Predictor):
    r"""A neural language model ``model(tokens (B, T)) -> logits (B, T, V)`` (a GPT, a CharRNN),
    read the way chapter 06 validates it: the text is cut into windows of ``window`` symbols and
    symbol $t \ge 1$ is predicted from its window's symbols up to $t - 1$ (the window holding
    $x_{t-1}$ starts at $\lfloor (t-1)/T \rfloor T$). Symbol 0 has no context: uniform.

    The encoder and the decoder both call one compiled function on a (1, ``window``) buffer, the
    positions not yet known filled with zeros; causality makes the rows before them independent
    of that filling, so both sides get the same floats.
    """

    def __init__(self, model, window: int, vocab_size: int | None = None):
        import jax
        from flax import nnx

        self.window = check_int("window", window)
        self.vocab_size = int(vocab_size if vocab_size is not None else model.cfg.vocab_size)
        graph, state = nnx.split(model)

        @jax.jit
        def probs(state, tokens):
            return jax.nn.softmax(nnx.merge(graph, state)(tokens).astype(jax.numpy.float32), -1)

        self._state, self._fn = state, probs
        self._last: tuple | None = None  # (window index, known length, probs) for the decoder

    def _window_probs(self, buf: np.ndarray) -> np.ndarray:
        return np.asarray(self._fn(self._state, buf[None].astype(np.int32)))[0]  # (T, V) float32

    def all_probs(self, symbols) -> np.ndarray:
        x = self._check(symbols)
        T, V = self.window, self.vocab_size
        out = np.empty((len(x), V), np.float32)
        if len(x):
            out[0] = 1.0 / V
        for w in range(0, len(x) - 1, T):  # the window x[w:w+T] predicts x[w+1:w+T+1]
            seg = x[w : w + T]
            buf = np.zeros(T, np.int64)
            buf[: len(seg)] = seg
            n = min(T, len(x) - 1 - w)
            out[w + 1 : w + 1 + n] = self._window_probs(buf)[:n]
        return out

    def next_probs(self, prefix) -> np.ndarray:
        T, V, t = self.window, self.vocab_size, len(prefix)
        if t == 0:
            return np.full(V, 1.0 / V, np.float32)
        w = (t - 1) // T * T
        buf = np.zeros(T, np.int64)
        buf[: t - w] = self._check(prefix[w:t], "prefix")
        return self._window_probs(buf)[t - 1 - w]


# --------------------------------------------------------------------------------------------
# Compress / decompress with a predictor
# --------------------------------------------------------------------------------------------
def compress(predictor: Predictor, symbols, total: int = DEFAULT_TOTAL,
             probs: np.ndarray | None = None) -> bytes:
    """A 4-byte length header, then the arithmetic code of ``symbols`` under ``predictor``.

    ``probs`` (optional): ``predictor.all_probs(symbols)`` if already computed.
    """
    x = predictor._check(symbols)
    if len(x) >= 1 << (8 * _HEADER):
        raise ValueError("too many symbols for the 4-byte header")
    p = predictor.all_probs(x) if probs is None else probs
    return len(x).to_bytes(_HEADER, "big") + encode(x, quantise(p, total))


def decompress(predictor: Predictor, data: bytes, total: int = DEFAULT_TOTAL,
               limit: int | None = None) -> np.ndarray:
    """The symbols of :func:`compress`'s output (only the first ``limit`` of them if given)."""
    n = int.from_bytes(bytes(data[:_HEADER]), "big")
    if limit is not None:
        n = min(n, check_int("limit", limit, 0))
    return decode(data[_HEADER:], n, lambda prefix: quantise(predictor.next_probs(prefix), total))


def sizes(symbols: Sequence[int], probs: np.ndarray, data: bytes) -> dict:
    """The ideal code length and the real size of ``data``, in bits, and their ratio."""
    ideal = code_length(probs, symbols)
    real = 8 * len(data)
    return {"ideal_bits": ideal, "compressed_bits": real,
            "overhead": real / ideal - 1 if ideal > 0 else math.inf}
