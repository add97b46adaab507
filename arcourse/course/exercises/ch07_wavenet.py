"""Chapter 07 (WaveNet): mu-law encoding, a dilated causal convolution, the receptive field, one
queue update of fast generation.

Each grader compares with the reference on fixed and random cases; when the answer differs, it
also tries the classic mistakes of that exercise and names the one the answer matches.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from arcourse import wavenet
from arcourse.course.grading import Case, CheckFailure, assert_matches, device_array, register
from arcourse.course.grading import normal_array as _f32


# --------------------------------------------------------------------------------------------
# wavenet.mu_law_encode
# --------------------------------------------------------------------------------------------
def mu_law_encode(x):
    r"""Audio in [-1, 1] to 256 integer levels (mu = 255), int32, same shape; x clipped first."""
    return wavenet.mu_law_encode(x, 255)


def _compress(x, mu=255.0):
    return jnp.sign(x) * jnp.log1p(mu * jnp.abs(x)) / jnp.log1p(mu)


def _encode_cases(rng):
    return [
        Case((device_array([-1.0, 0.0, 1.0]),), label="the boundaries -1, 0, 1"),
        Case((device_array([1e-6, -1e-6, 0.5, -0.5, 0.01, -0.01]),), label="small and medium values"),
        Case((device_array(rng.uniform(-1, 1, size=200)),), label="200 random values"),
        Case((device_array(rng.uniform(-1, 1, size=(4, 8))),), label="a (4, 8) array"),
        Case((device_array([-1e3, -1.5, 1.5, 1e3]),), label="beyond [-1, 1]: clip first"),
    ]


def _as_levels(v):
    return jnp.clip(v, -10_000, 10_000).astype(jnp.int32)


ENCODE_MISTAKES = {
    "floor instead of rounding to the nearest level: 0 lands on 127, not 128":
        lambda x: _as_levels(jnp.floor((_compress(jnp.clip(x, -1, 1)) + 1) * 127.5)),
    "no companding: a uniform 8-bit quantiser of x, not of F(x)":
        lambda x: _as_levels(jnp.floor((jnp.clip(x, -1, 1) + 1) * 127.5 + 0.5)),
    "mu = 256 in the compression instead of 255":
        lambda x: _as_levels(jnp.floor((_compress(jnp.clip(x, -1, 1), 256.0) + 1) * 127.5 + 0.5)),
    "scaled by 128 instead of 255/2: the levels run 0..256":
        lambda x: _as_levels(jnp.floor((_compress(jnp.clip(x, -1, 1)) + 1) * 128 + 0.5)),
    "no clipping to [-1, 1] first: values beyond it give levels outside 0..255":
        lambda x: _as_levels(jnp.floor((_compress(x) + 1) * 127.5 + 0.5)),
}

register(
    "wavenet.mu_law_encode",
    title="mu-law encoding",
    points=2,
    reference=mu_law_encode,
    cases=_encode_cases,
    rtol=0, atol=0,
    wrong={**ENCODE_MISTAKES,
           "returns the compressed float F(x), not an integer level":
               lambda x: _compress(jnp.clip(x, -1, 1)),
           "log instead of log1p, no sign: NaN for negative x":
               lambda x: _as_levels(jnp.floor((jnp.log(255 * x) / jnp.log(256.0) + 1) * 127.5
                                              + 0.5))},
    hint="clip x to [-1, 1]; F = sign(x) * log(1 + 255|x|) / log(256); then map F from [-1, 1] to "
         "[0, 255] and round to the nearest integer (floor of value + 0.5); return int32",
)


# --------------------------------------------------------------------------------------------
# wavenet.causal_conv
# --------------------------------------------------------------------------------------------
def causal_conv(x, w, dilation):
    r"""$y_t = \sum_{i=0}^{k-1} x_{t-(k-1-i)d} W_i$ for x (T, C_in), w (k, C_in, C_out): (T, C_out)."""
    return wavenet.causal_conv(x, w, dilation)


def _conv_cases(rng):
    cases = []
    for T, k, d, ci, co in [(6, 2, 1, 1, 1), (16, 2, 4, 3, 2), (20, 3, 2, 2, 4), (5, 2, 8, 2, 3),
                            (33, 2, 16, 4, 4), (12, 4, 3, 3, 1)]:
        cases.append(Case((_f32(rng, T, ci), _f32(rng, k, ci, co), d),
                          label=f"T={T}, k={k}, dilation={d}"))
    return cases


def _taps(x, w, d, offsets):
    """sum_i x_{t + offsets[i]} W_i with zeros outside 0..T-1."""
    T = x.shape[0]
    y = jnp.zeros((T, w.shape[2]), jnp.float32)
    for i, o in enumerate(offsets):
        idx = jnp.arange(T) + o
        xs = jnp.where(((idx >= 0) & (idx < T))[:, None], x[jnp.clip(idx, 0, T - 1)], 0.0)
        y = y + xs @ w[i]
    return y


CONV_MISTAKES = {
    "'SAME' padding: the zeros are split between both ends, so y_t reads the future x_{t+...}":
        lambda x, w, d: wavenet.same_conv(x, w, d),
    "padded on the right instead of the left: y_t reads x_t, x_{t+d}, ... (the future)":
        lambda x, w, d: _taps(x, w, d, [i * d for i in range(w.shape[0])]),
    "kernel flipped: W_0 reads x_t and W_{k-1} the oldest input":
        lambda x, w, d: _taps(x, w, d, [-i * d for i in range(w.shape[0])]),
    "the dilation is ignored: the taps are 1 apart, not d":
        lambda x, w, d: _taps(x, w, d, [-(w.shape[0] - 1 - i) for i in range(w.shape[0])]),
    "shifted by one: y_t ends at x_{t-1}, so the output cannot see x_t (that is the 'mask A' "
    "of a first layer; this exercise includes x_t)":
        lambda x, w, d: _taps(x, w, d, [-(w.shape[0] - 1 - i) * d - 1 for i in range(w.shape[0])]),
}

register(
    "wavenet.causal_conv",
    title="A dilated causal convolution",
    points=3,
    reference=causal_conv,
    cases=_conv_cases,
    rtol=1e-4, atol=1e-4,
    wrong=CONV_MISTAKES,
    hint="pad x with (k-1)*dilation zeros at the START of the time axis only (jnp.pad); then tap i "
         "is the slice of length T starting at i*dilation of the padded input, times w[i]",
)


# --------------------------------------------------------------------------------------------
# wavenet.receptive_field
# --------------------------------------------------------------------------------------------
def receptive_field(dilations, kernel_size):
    r"""$R = (k-1)\sum_\ell d_\ell + 1$ for a stack of causal convolutions; a Python int."""
    return wavenet.receptive_field(dilations, kernel_size)


def _rf_cases(rng):
    return [Case(((1,), 2), label="one layer, d=1, k=2"),
            Case((tuple(2**i for i in range(10)), 2), label="WaveNet: 1, 2, ..., 512, k=2"),
            Case((tuple(2**i for i in range(10)) * 2, 2), label="two stacks of 1..512, k=2"),
            Case(((1, 2, 4), 3), label="1, 2, 4 with k=3"),
            Case(((1, 3), 4), label="1, 3 with k=4"),
            Case(((5,), 1), label="k=1: a 1x1 convolution sees only x_t")]


RF_MISTAKES = {
    "off by one: (k-1) * sum(d) forgets the current input x_t itself":
        lambda ds, k: (k - 1) * sum(ds),
    "off by one the other way: (k-1) * sum(d) + 2": lambda ds, k: (k - 1) * sum(ds) + 2,
    "k * sum(d) + 1: a kernel of size k reaches k-1 steps back, not k":
        lambda ds, k: k * sum(ds) + 1,
    "sum(d) + 1: the kernel size is ignored (right only for k = 2)": lambda ds, k: sum(ds) + 1,
    "(k-1) * max(d) + 1: only the largest dilation counted, but every layer adds its reach":
        lambda ds, k: (k - 1) * max(ds) + 1,
    "the dilations are ignored: (k-1) * layers + 1": lambda ds, k: (k - 1) * len(ds) + 1,
}

register(
    "wavenet.receptive_field",
    title="The receptive field",
    points=1,
    reference=receptive_field,
    cases=_rf_cases,
    rtol=0, atol=0,
    wrong=RF_MISTAKES,
    hint="a causal convolution of kernel size k and dilation d reaches (k-1)*d steps further "
         "back; add the reaches of all layers, and count the current input too",
)


# --------------------------------------------------------------------------------------------
# wavenet.queue_step
# --------------------------------------------------------------------------------------------
def queue_step(queue, pos, x):
    r"""Read $x_{t-d}$ and store $x_t$: queue (B, d, C), pos int32 scalar $t$, x (B, C)."""
    return wavenet.queue_step(queue, pos, x)


def _queue_mistake(read_offset=0, write_first=False, write=True):
    def fn(queue, pos, x):
        d = queue.shape[1]
        if write_first and write:
            queue = queue.at[:, pos % d].set(x)
        past = queue[:, (pos + read_offset) % d]
        if write and not write_first:
            queue = queue.at[:, pos % d].set(x)
        return past, queue
    return fn


QUEUE_MISTAKES = {
    "writes x_t before reading: the layer gets x_t twice instead of x_{t-d}":
        _queue_mistake(write_first=True),
    "reads the slot after the current one: x_{t-d+1}, one step too recent":
        _queue_mistake(read_offset=1),
    "reads the slot before the current one: x_{t-d-1}, one step too old":
        _queue_mistake(read_offset=-1),
    "never stores x_t: the queue stays empty and the past reads zeros":
        _queue_mistake(write=False),
}


def _queue_test(fn, ex):
    """Run the queue for 3d + 2 steps (under jit, pos traced); each step must return x_{t-d}."""
    rng = np.random.default_rng(0)
    checked = 0
    for B, d, C in [(1, 1, 1), (2, 3, 4), (3, 8, 2)]:
        T = 3 * d + 2
        xs = np.asarray(rng.normal(size=(T, B, C)), np.float32)  # NumPy: slicing it compiles nothing
        step = jax.jit(fn)
        queue = jax.device_put(np.zeros((B, d, C), np.float32))
        for t in range(T):
            out = step(queue, np.int32(t), xs[t])
            if not isinstance(out, tuple | list) or len(out) != 2:
                raise CheckFailure("queue_step must return a pair (x_past (B, C), new queue "
                                   f"(B, d, C)); got {type(out).__name__}")
            past, queue = out
            where = f"B={B}, d={d}, C={C}, step t={t}"
            if np.shape(queue) != (B, d, C):
                raise CheckFailure(f"{where}: the new queue must keep the shape {(B, d, C)}, "
                                   f"got {np.shape(queue)}")
            want = xs[t - d] if t >= d else np.zeros((B, C), np.float32)
            try:
                assert_matches(past, want, rtol=1e-6, atol=1e-6,
                               where=f"{where}: the returned x_(t-d)")
            except CheckFailure as failure:
                what = _which_queue_mistake(xs, t, d, past)
                raise CheckFailure(str(failure) + (f"\n   your answer matches a classic mistake: "
                                                   f"{what}" if what else "")) from None
            checked += 1
    return f"{checked} steps of 3 queues"


def _which_queue_mistake(xs, t, d, past):
    candidates = {
        "writes x_t before reading: the layer gets x_t twice instead of x_{t-d}": t,
        "reads one step too recent: x_{t-d+1}": t - d + 1,
        "reads one step too old: x_{t-d-1}": t - d - 1,
    }
    for what, s in candidates.items():
        if 0 <= s <= t and np.allclose(np.asarray(past), np.asarray(xs[s]), atol=1e-6):
            return what
    if t >= d and np.allclose(np.asarray(past), 0.0):
        return "never stores x_t: the queue stays empty and the past reads zeros"
    return ""


register(
    "wavenet.queue_step",
    title="One queue update of fast generation",
    points=3,
    reference=queue_step,
    test=_queue_test,
    wrong=QUEUE_MISTAKES,
    hint="the input of time s lives in slot s % d: at time t that slot still holds x_(t-d). "
         "Read it first (a traced index works with jax.lax.dynamic_index_in_dim or plain "
         "indexing), then overwrite it with x (queue.at[:, slot].set(x))",
)

