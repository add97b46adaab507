r"""Selective state spaces (Mamba), chapter 11: one linear recurrence, computed three ways.

**A state space model** (SSM) maps an input signal $u$ to an output $y$ through a hidden state
$h \in \mathbb{R}^N$: $h'(t) = A h(t) + B u(t)$, $y(t) = C h(t)$. With a diagonal $A$ (S4D, Mamba)
every state coordinate evolves on its own. Sampled with step $\Delta$ under a *zero-order hold*
(the input constant between samples) it becomes the linear recurrence

$$h_t = \bar A h_{t-1} + \bar B u_t, \quad y_t = C h_t, \qquad
  \bar A = e^{\Delta A}, \quad \bar B = (\Delta A)^{-1}(e^{\Delta A} - 1)\,\Delta B$$

(:func:`discretize_zoh`). When $\bar A, \bar B, C$ do not depend on $t$ (a *time-invariant*
SSM), unrolling gives a causal convolution, $y = K * u$ with $K_k = C \bar A^k \bar B$
(:func:`lti_kernel`, :func:`causal_conv`, checked against :func:`lti_recurrence`).

**Selection** (Gu & Dao 2023): $\Delta_t$, $B_t$ and $C_t$ are computed from the input at every
position, which breaks the convolution but keeps the recurrence. :func:`selective_scan` follows
the semantics of Mamba's reference ``selective_scan_ref``, in the layout (batch, time, channel):
per channel $d$ and state $n$,

$$\Delta_t = \mathrm{softplus}(\delta_t + b_\Delta), \quad
  h_t = e^{\Delta_t A} \odot h_{t-1} + \Delta_t B_t u_t, \quad
  y_t = C_t h_t + D u_t, \quad \text{out}_t = y_t \cdot \mathrm{silu}(z_t),$$

(Mamba discretises $B$ with the first-order $\bar B \approx \Delta B$). Three computations of the
same $h_t$, equal to float32 precision (the tests check it):

* ``method="sequential"``: ``lax.scan`` over time, :func:`selective_step` at each position;
* ``method="parallel"``: ``lax.associative_scan`` with :func:`combine`, the composition of two
  affine maps $h \mapsto a h + b$: $(a_1, b_1) \bullet (a_2, b_2) = (a_2 a_1,\; a_2 b_1 + b_2)$;
* Mamba-2's *state space duality* (SSD, Dao & Gu 2024), for a scalar $A$ per head:
  $Y = (L \circ C B^\top)\,(\Delta X)$ with the decay mask $L_{ts} = \exp(\sum_{k=s+1}^{t}
  \Delta_k A)$ for $s \le t$ (:func:`segsum`, :func:`ssd_quadratic`, attention-like, quadratic in
  the length), and the same matrix computed by blocks (:func:`ssd_chunked`): quadratic inside a
  chunk, a recurrence over chunk states between chunks.

**The Mamba block** (:class:`MambaBlock`): in-projection to $(x, z)$, a causal depthwise
convolution over time, SiLU, the selective SSM, the gate $\mathrm{silu}(z)$, out-projection.
:class:`MambaLM` stacks pre-norm residual blocks and implements the course's decoding interface
(``init_state`` / ``prefill`` / ``step``) with a state of constant size per sequence (each
layer's last ``conv_size - 1`` inputs and its SSM state), whatever the length.
:func:`selective_copy_task` is a task that needs selection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from arcourse._checks import check_choice, check_int
from arcourse.layers import RMSNorm

__all__ = [
    "discretize_zoh",
    "lti_recurrence",
    "lti_kernel",
    "causal_conv",
    "selective_step",
    "combine",
    "selective_scan",
    "segsum",
    "ssd_quadratic",
    "ssd_chunked",
    "ssd_as_selective",
    "MambaConfig",
    "MambaBlock",
    "MambaLM",
    "LayerState",
    "state_bytes",
    "selective_copy_task",
]

METHODS = ("sequential", "parallel")


def _f32(x):
    return jnp.asarray(x, jnp.float32)


# --------------------------------------------------------------------------------------------
# 1. From continuous to discrete; the time-invariant SSM as a recurrence and as a convolution
# --------------------------------------------------------------------------------------------
def discretize_zoh(A, B, delta):
    r"""Zero-order hold for a diagonal $A$: $\bar A = e^{\Delta A}$,
    $\bar B = \frac{e^{\Delta A} - 1}{A} B$ (which tends to $\Delta B$ as $A \to 0$).

    ``A`` (..., N) the diagonal of $A$ (negative for a stable system), ``B`` broadcastable to
    ``A``, ``delta`` the step, of shape ``A.shape[:-1]`` (one $\Delta$ per channel; a scalar for
    ``A`` of shape (N,)). Returns ``(A_bar, B_bar)``, both of the broadcast shape, float32.
    """
    A, B, delta = _f32(A), _f32(B), _f32(delta)
    if A.ndim < 1:
        raise ValueError(f"A must have shape (..., N), got {A.shape}")
    if delta.shape != A.shape[:-1]:
        raise ValueError(f"delta must have shape A.shape[:-1] = {A.shape[:-1]}, got {delta.shape}")
    dA = delta[..., None] * A
    safe_A = jnp.where(A == 0, 1.0, A)
    gain = jnp.where(A == 0, delta[..., None], jnp.expm1(dA) / safe_A)
    return jnp.exp(dA), gain * B


def _check_lti(u, A_bar, B_bar, C):
    u, A_bar, B_bar, C = _f32(u), _f32(A_bar), _f32(B_bar), _f32(C)
    if u.ndim != 2:
        raise ValueError(f"u must have shape (L, D), got {u.shape}")
    if A_bar.ndim != 2 or A_bar.shape[0] != u.shape[1]:
        raise ValueError(f"A_bar must have shape (D={u.shape[1]}, N), got {A_bar.shape}")
    if B_bar.shape != A_bar.shape or C.shape != A_bar.shape:
        raise ValueError(f"B_bar and C must have the shape of A_bar {A_bar.shape}, got "
                         f"{B_bar.shape} and {C.shape}")
    return u, A_bar, B_bar, C


def lti_recurrence(u, A_bar, B_bar, C):
    r"""A time-invariant SSM run as a recurrence: $h_t = \bar A h_{t-1} + \bar B u_t$,
    $y_t = \sum_n C_n h_{t,n}$, from $h_{-1} = 0$, each channel on its own.

    ``u`` (L, D), ``A_bar``, ``B_bar``, ``C`` (D, N) -> ``y`` (L, D).
    """
    u, A_bar, B_bar, C = _check_lti(u, A_bar, B_bar, C)

    def body(h, u_t):
        h = A_bar * h + B_bar * u_t[:, None]
        return h, jnp.sum(h * C, -1)

    _, y = jax.lax.scan(body, jnp.zeros_like(A_bar), u)
    return y


def lti_kernel(A_bar, B_bar, C, length: int):
    r"""The convolution kernel of a time-invariant SSM: $K_k = \sum_n C_n \bar A_n^k \bar B_n$.

    ``A_bar``, ``B_bar``, ``C`` (D, N) -> ``K`` (length, D).
    """
    length = check_int("length", length)
    A_bar, B_bar, C = _f32(A_bar), _f32(B_bar), _f32(C)
    powers = A_bar[None] ** jnp.arange(length, dtype=jnp.float32)[:, None, None]  # (L, D, N)
    return jnp.sum(C * powers * B_bar, -1)


def causal_conv(u, K):
    r"""Causal convolution per channel, by FFT: $y_t = \sum_{k=0}^{t} K_k\, u_{t-k}$.

    ``u`` (L, D), ``K`` (L, D) -> ``y`` (L, D). Zero-padding to $2L$ makes the FFT's circular
    convolution a linear one: $O(L \log L)$ instead of $O(L^2)$.
    """
    u, K = _f32(u), _f32(K)
    if u.ndim != 2 or K.shape != u.shape:
        raise ValueError(f"u and K must both have shape (L, D), got {u.shape} and {K.shape}")
    n = 2 * u.shape[0]
    y = jnp.fft.irfft(jnp.fft.rfft(u, n, axis=0) * jnp.fft.rfft(K, n, axis=0), n, axis=0)
    return y[: u.shape[0]]


# --------------------------------------------------------------------------------------------
# 2. The selective scan: one step, the combine operator, two scans
# --------------------------------------------------------------------------------------------
def selective_step(h, u, delta, A, B, C):
    r"""One step of the selective SSM (Mamba's discretisation):
    $h' = e^{\Delta A} \odot h + \Delta\, u\, B$, $y = h' C$.

    ``h`` (..., D, N) the state, ``u`` (..., D) the input, ``delta`` (..., D) the (positive) step,
    ``A`` (D, N), ``B`` and ``C`` (..., N) shared by every channel. Returns ``(h', y (..., D))``.
    """
    h_new = jnp.exp(delta[..., None] * A) * h + (delta * u)[..., None] * B[..., None, :]
    return h_new, jnp.einsum("...dn,...n->...d", h_new, C)


def combine(left, right):
    r"""The associative operator of the linear recurrence $h_t = a_t h_{t-1} + b_t$.

    An element $(a, b)$ stands for the map $h \mapsto a h + b$; ``left`` comes first in time, so
    $(a_1, b_1) \bullet (a_2, b_2) = (a_2 a_1,\; a_2 b_1 + b_2)$: apply $(a_1, b_1)$, then
    $(a_2, b_2)$. Elementwise on arrays of any (equal) shape; returns ``(a, b)``.
    """
    a1, b1 = left
    a2, b2 = right
    return a2 * a1, a2 * b1 + b2


def _check_scan_args(u, delta, A, B, C, D, z, delta_bias, h0):
    u, delta, A, B, C = (_f32(v) for v in (u, delta, A, B, C))
    if u.ndim != 3:
        raise ValueError(f"u must have shape (batch, L, D), got {u.shape}")
    b, L, d = u.shape
    if delta.shape != u.shape:
        raise ValueError(f"delta must have the shape of u {u.shape}, got {delta.shape}")
    if A.ndim != 2 or A.shape[0] != d:
        raise ValueError(f"A must have shape (D={d}, N), got {A.shape}")
    n = A.shape[1]
    for name, v in (("B", B), ("C", C)):
        if v.shape != (b, L, n):
            raise ValueError(f"{name} must have shape (batch, L, N) = {(b, L, n)}, got {v.shape}")
    if D is not None and jnp.shape(D) != (d,):
        raise ValueError(f"D must have shape ({d},), got {jnp.shape(D)}")
    if z is not None and jnp.shape(z) != u.shape:
        raise ValueError(f"z must have the shape of u {u.shape}, got {jnp.shape(z)}")
    if delta_bias is not None and jnp.shape(delta_bias) != (d,):
        raise ValueError(f"delta_bias must have shape ({d},), got {jnp.shape(delta_bias)}")
    if h0 is not None and jnp.shape(h0) != (b, d, n):
        raise ValueError(f"h0 must have shape (batch, D, N) = {(b, d, n)}, got {jnp.shape(h0)}")
    return u, delta, A, B, C


def selective_scan(u, delta, A, B, C, D=None, z=None, *, delta_bias=None,
                   delta_softplus: bool = False, h0=None, method: str = "sequential",
                   return_state: bool = False):
    r"""The selective scan of Mamba (its reference ``selective_scan_ref``), batch-first.

    $$\Delta_t = \mathrm{softplus}(\delta_t + b_\Delta)\ (\text{or } \delta_t + b_\Delta),\quad
      h_t = e^{\Delta_t A} \odot h_{t-1} + \Delta_t u_t B_t,\quad
      y_t = C_t h_t + D \odot u_t,\quad \text{out}_t = y_t \odot \mathrm{silu}(z_t).$$

    Shapes: ``u``, ``delta``, ``z`` (batch, L, D); ``A`` (D, N) (negative entries: a decay);
    ``B``, ``C`` (batch, L, N), shared by the D channels; ``D``, ``delta_bias`` (D,); ``h0``
    (batch, D, N) the state before the first position (zero by default). ``D``, ``z``,
    ``delta_bias`` are optional. ``method`` is ``"sequential"`` (``lax.scan``, $O(L)$ steps) or
    ``"parallel"`` (``lax.associative_scan`` with :func:`combine`, $O(\log L)$ depth, $O(L N D)$
    memory). Returns ``out`` (batch, L, D), and the final state (batch, D, N) if
    ``return_state``.
    """
    check_choice("method", method, METHODS)
    u, delta, A, B, C = _check_scan_args(u, delta, A, B, C, D, z, delta_bias, h0)
    if delta_bias is not None:
        delta = delta + _f32(delta_bias)
    if delta_softplus:
        delta = jax.nn.softplus(delta)
    b, L, d = u.shape
    h0 = jnp.zeros((b, d, A.shape[1]), jnp.float32) if h0 is None else _f32(h0)

    if method == "sequential":
        def body(h, xs):
            return selective_step(h, *xs[:2], A, *xs[2:])

        xs = tuple(jnp.swapaxes(v, 0, 1) for v in (u, delta, B, C))
        h_last, y = jax.lax.scan(body, h0, xs, unroll=min(4, L))  # unrolled: faster on a CPU
        y = jnp.swapaxes(y, 0, 1)
    else:
        a = jnp.exp(delta[..., None] * A)  # (b, L, D, N)
        bu = (delta * u)[..., None] * B[:, :, None, :]
        bu = bu.at[:, 0].add(a[:, 0] * h0)  # fold the initial state into the first element
        _, h = jax.lax.associative_scan(combine, (a, bu), axis=1)
        y = jnp.einsum("bldn,bln->bld", h, C)
        h_last = h[:, -1]
    if D is not None:
        y = y + _f32(D) * u
    if z is not None:
        y = y * jax.nn.silu(_f32(z))
    return (y, h_last) if return_state else y


# --------------------------------------------------------------------------------------------
# 3. Mamba-2's state space duality: a scalar A per head, the quadratic and the chunked form
# --------------------------------------------------------------------------------------------
def segsum(x):
    r"""Segment sums: ``x`` (..., T) -> (..., T, T) with
    $S_{ts} = \sum_{k=s+1}^{t} x_k$ for $s \le t$ (so $S_{tt} = 0$) and $-\infty$ for $s > t$.

    $\exp(S)$ is the decay mask of SSD: $\exp(S_{ts}) = \prod_{k=s+1}^{t} e^{x_k}$. Computed as a
    cumulative sum of masked copies (no difference of two large cumulative sums, which would lose
    precision on long sequences).
    """
    x = _f32(x)
    if x.ndim < 1:
        raise ValueError(f"x must have shape (..., T), got {x.shape}")
    T = x.shape[-1]
    strict = jnp.tril(jnp.ones((T, T), bool), -1)
    xx = jnp.where(strict, x[..., :, None] * jnp.ones((T,)), 0.0)  # xx[t, s] = x_t for t > s
    s = jnp.cumsum(xx, axis=-2)
    return jnp.where(jnp.tril(jnp.ones((T, T), bool)), s, -jnp.inf)


def _check_ssd(x, dt, A, B, C):
    x, dt, A, B, C = (_f32(v) for v in (x, dt, A, B, C))
    if x.ndim != 4:
        raise ValueError(f"x must have shape (batch, L, H, P), got {x.shape}")
    b, L, H, _ = x.shape
    if dt.shape != (b, L, H):
        raise ValueError(f"dt must have shape (batch, L, H) = {(b, L, H)}, got {dt.shape}")
    if A.shape != (H,):
        raise ValueError(f"A must have shape (H,) = ({H},), one scalar per head, got {A.shape}")
    if B.ndim != 3 or B.shape[:2] != (b, L) or C.shape != B.shape:
        raise ValueError(f"B and C must have shape (batch, L, N) with batch, L = {b, L}, got "
                         f"{B.shape} and {C.shape}")
    return x, dt, A, B, C


def ssd_quadratic(x, dt, A, B, C):
    r"""SSD's "attention" form for a scalar $A_h$ per head: $Y = (L \circ C B^\top)\,(\Delta X)$.

    $$y_{t} = \sum_{s \le t} \underbrace{e^{\sum_{k=s+1}^{t} \Delta_k A}}_{L_{ts}}
      (C_t \cdot B_s)\, \Delta_s x_s,$$

    the unrolled recurrence $h_t = e^{\Delta_t A} h_{t-1} + \Delta_t x_t B_t^\top$,
    $y_t = h_t C_t$ from $h_{-1} = 0$. ``x`` (batch, L, H, P), ``dt`` (batch, L, H) positive,
    ``A`` (H,) negative, ``B``, ``C`` (batch, L, N) -> ``y`` (batch, L, H, P). $O(L^2)$ work.
    """
    x, dt, A, B, C = _check_ssd(x, dt, A, B, C)
    decay = jnp.exp(segsum(jnp.swapaxes(dt * A, 1, 2)))  # (b, H, L, L)
    scores = jnp.einsum("btn,bsn->bts", C, B)
    return jnp.einsum("bhts,bts,bshp->bthp", decay, scores, x * dt[..., None])


def ssd_chunked(x, dt, A, B, C, chunk_size: int = 64, *, h0=None, return_state: bool = False):
    r"""SSD by blocks of ``chunk_size`` positions (Mamba-2's algorithm, ``ssd_minimal``).

    The matrix $L \circ CB^\top$ of :func:`ssd_quadratic` is cut into blocks. Diagonal blocks are
    computed in the quadratic form (1); every chunk's contribution to the state at its end (2) is
    passed from chunk to chunk by the recurrence between chunk boundaries (3); each position then
    reads the state left by the chunks before it (4). Work $O(L Q)$ for chunks of $Q$ positions.
    A length that is not a multiple of ``chunk_size`` is padded with $\Delta = 0$ (no decay, no
    input). Shapes as in :func:`ssd_quadratic`; ``h0`` (batch, H, P, N) the initial state.
    Returns ``y``, and the final state (batch, H, P, N) if ``return_state``.
    """
    x, dt, A, B, C = _check_ssd(x, dt, A, B, C)
    Q = check_int("chunk_size", chunk_size)
    b, L, H, P = x.shape
    N = B.shape[-1]
    pad = -L % Q
    if pad:
        x, dt, B, C = (jnp.pad(v, [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2))
                       for v in (x, dt, B, C))
    c = (L + pad) // Q
    xs = (x * dt[..., None]).reshape(b, c, Q, H, P)
    a = jnp.transpose((dt * A).reshape(b, c, Q, H), (0, 3, 1, 2))  # (b, H, c, Q)
    Bc, Cc = B.reshape(b, c, Q, N), C.reshape(b, c, Q, N)
    a_cum = jnp.cumsum(a, axis=-1)
    # (1) within each chunk: the quadratic form
    y_diag = jnp.einsum("bcln,bcsn,bhcls,bcshp->bclhp", Cc, Bc, jnp.exp(segsum(a)), xs)
    # (2) the state each chunk leaves at its end, from its own inputs
    to_end = jnp.exp(a_cum[..., -1:] - a_cum)  # (b, H, c, Q)
    states = jnp.einsum("bcln,bhcl,bclhp->bchpn", Bc, to_end, xs)
    # (3) the recurrence between chunk boundaries (with the initial state in front)
    h0 = jnp.zeros((b, H, P, N), jnp.float32) if h0 is None else _f32(h0)
    states = jnp.concatenate([h0[:, None], states], axis=1)  # (b, c + 1, H, P, N)
    chunk_decay = jnp.exp(segsum(jnp.pad(a_cum[..., -1], [(0, 0), (0, 0), (1, 0)])))
    states = jnp.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    states, h_last = states[:, :-1], states[:, -1]
    # (4) what the earlier chunks contribute to each position
    y_off = jnp.einsum("bcln,bchpn,bhcl->bclhp", Cc, states, jnp.exp(a_cum))
    y = (y_diag + y_off).reshape(b, c * Q, H, P)[:, :L]
    return (y, h_last) if return_state else y


def ssd_as_selective(x, dt, A, B, C):
    r"""The SSD problem as a :func:`selective_scan` problem: channel $d = hP + p$ gets the input
    $x_{t,h,p}$, the step $\Delta_{t,h}$ of its head and $A_{d,n} = A_h$ for every state $n$.

    Returns ``(u, delta, A_full, B, C)`` with ``u``, ``delta`` (batch, L, H P), ``A_full``
    (H P, N); then ``selective_scan(u, delta, A_full, B, C)`` reshaped to (batch, L, H, P) equals
    ``ssd_quadratic(x, dt, A, B, C)``.
    """
    x, dt, A, B, C = _check_ssd(x, dt, A, B, C)
    b, L, H, P = x.shape
    u = x.reshape(b, L, H * P)
    delta = jnp.repeat(dt, P, axis=-1)
    A_full = jnp.broadcast_to(jnp.repeat(A, P)[:, None], (H * P, B.shape[-1]))
    return u, delta, A_full, B, C


# --------------------------------------------------------------------------------------------
# 4. The Mamba block and a small Mamba language model
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MambaConfig:
    """The sizes of a :class:`MambaLM`. ``selective=False`` switches selection off: $\\Delta$,
    $B$ and $C$ become learned constants, the same at every position (a time-invariant SSM)."""

    vocab_size: int
    dim: int = 64
    num_layers: int = 2
    state_size: int = 16
    expand: int = 2
    conv_size: int = 4
    dt_rank: int | None = None  # default: ceil(dim / 16), as in Mamba
    selective: bool = True
    scan: str = "sequential"  # "sequential" | "parallel": how the forward pass runs the scan

    def __post_init__(self):
        for name in ("vocab_size", "dim", "num_layers", "state_size", "expand", "conv_size"):
            check_int(name, getattr(self, name))
        if self.dt_rank is not None:
            check_int("dt_rank", self.dt_rank)
        if not isinstance(self.selective, bool):
            raise ValueError(f"selective must be a bool, got {self.selective!r}")
        check_choice("scan", self.scan, METHODS)

    @property
    def inner(self) -> int:
        return self.expand * self.dim

    @property
    def rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.dim / 16)


class LayerState(NamedTuple):
    """One layer's decoding state: the last ``conv_size - 1`` conv inputs (B, K-1, D_in) and the
    SSM state (B, D_in, N)."""

    conv: jax.Array
    ssm: jax.Array


def state_bytes(state) -> int:
    """The bytes of every array of a decoding state (any pytree)."""
    return sum(int(a.size) * a.dtype.itemsize for a in jax.tree.leaves(state))


def _inverse_softplus(y):
    return y + jnp.log(-jnp.expm1(-y))


class MambaBlock(nnx.Module):
    r"""The Mamba mixer: $x, z = W_{in} h$; $x \leftarrow \mathrm{silu}(\mathrm{conv}(x))$;
    $y = \mathrm{SSM}_{\Delta(x), B(x), C(x)}(x) + D x$; $\text{out} = W_{out}(y \odot
    \mathrm{silu}(z))$. ``h`` (B, L, dim) -> (B, L, dim).

    The convolution is depthwise and causal: $x'_t = b + \sum_{k=0}^{K-1} w_k \odot
    x_{t-K+1+k}$ (PyTorch's ``Conv1d(groups=D, padding=K-1)`` truncated to $L$). Selective:
    $(\delta, B, C) = x W_x$ with $\delta$ of rank ``dt_rank`` lifted to $D$ channels by
    $W_\Delta$ and $\Delta = \mathrm{softplus}(\delta W_\Delta + b_\Delta)$. $A = -e^{A_{log}}$
    starts at $-(1, \dots, N)$ in every channel (S4D-real), $b_\Delta$ so that $\Delta$ starts
    log-uniform in $[0.001, 0.1]$, $D = 1$: Mamba's initialisation.
    """

    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, n, k, r = cfg.inner, cfg.state_size, cfg.conv_size, cfg.rank
        self.in_proj = nnx.Linear(cfg.dim, 2 * d, use_bias=False, rngs=rngs)
        bound = 1.0 / math.sqrt(k)
        self.conv_w = nnx.Param(jax.random.uniform(rngs.params(), (k, d), minval=-bound,
                                                   maxval=bound))
        self.conv_b = nnx.Param(jnp.zeros((d,)))
        dt = jnp.exp(jax.random.uniform(rngs.params(), (d,)) * (math.log(0.1) - math.log(1e-3))
                     + math.log(1e-3))
        self.dt_bias = nnx.Param(_inverse_softplus(jnp.maximum(dt, 1e-4)))
        if cfg.selective:
            self.x_proj = nnx.Linear(d, r + 2 * n, use_bias=False, rngs=rngs)
            std = r ** -0.5
            self.dt_proj = nnx.Param(jax.random.uniform(rngs.params(), (r, d), minval=-std,
                                                        maxval=std))
        else:  # the same Delta, B, C at every position
            self.B = nnx.Param(jax.random.normal(rngs.params(), (n,)) / math.sqrt(n))
            self.C = nnx.Param(jax.random.normal(rngs.params(), (n,)) / math.sqrt(n))
        self.A_log = nnx.Param(jnp.log(jnp.tile(jnp.arange(1, n + 1, dtype=jnp.float32), (d, 1))))
        self.D = nnx.Param(jnp.ones((d,)))
        self.out_proj = nnx.Linear(d, cfg.dim, use_bias=False, rngs=rngs)

    def init_state(self, batch_size: int) -> LayerState:
        d = self.cfg.inner
        return LayerState(jnp.zeros((batch_size, self.cfg.conv_size - 1, d)),
                          jnp.zeros((batch_size, d, self.cfg.state_size)))

    def ssm_inputs(self, x):
        r"""$(\delta, B, C)$ from the conv output ``x`` (..., D): $\delta$ (..., D) before the
        bias and softplus, $B$, $C$ (..., N)."""
        n = self.cfg.state_size
        if not self.cfg.selective:
            shape = x.shape[:-1]
            return (jnp.zeros(x.shape), jnp.broadcast_to(self.B[...], shape + (n,)),
                    jnp.broadcast_to(self.C[...], shape + (n,)))
        p = self.x_proj(x)
        r = self.cfg.rank
        return p[..., :r] @ self.dt_proj[...], p[..., r:r + n], p[..., r + n:]

    def __call__(self, h, state: LayerState | None = None, *, method: str | None = None):
        """The whole sequence at once: (B, L, dim) -> ((B, L, dim), the state after it)."""
        b, L, _ = h.shape
        K = self.cfg.conv_size
        state = self.init_state(b) if state is None else state
        x, z = jnp.split(self.in_proj(h), 2, axis=-1)
        xpad = jnp.concatenate([state.conv, x], axis=1)  # (b, K-1+L, D)
        w = self.conv_w[...]
        x = sum(w[k] * xpad[:, k:k + L] for k in range(K)) + self.conv_b[...]
        x = jax.nn.silu(x)
        delta, B, C = self.ssm_inputs(x)
        A = -jnp.exp(self.A_log[...])
        y, ssm = selective_scan(x, delta, A, B, C, self.D[...], z, delta_bias=self.dt_bias[...],
                                delta_softplus=True, h0=state.ssm,
                                method=method or self.cfg.scan, return_state=True)
        return self.out_proj(y), LayerState(xpad[:, L:], ssm)

    def step(self, h, state: LayerState):
        """One position: ``h`` (B, dim) -> ((B, dim), new state); constant work per token."""
        x, z = jnp.split(self.in_proj(h), 2, axis=-1)
        window = jnp.concatenate([state.conv, x[:, None]], axis=1)  # (B, K, D)
        x = jax.nn.silu(jnp.einsum("bkd,kd->bd", window, self.conv_w[...]) + self.conv_b[...])
        delta, B, C = self.ssm_inputs(x)
        delta = jax.nn.softplus(delta + self.dt_bias[...])
        ssm, y = selective_step(state.ssm, x, delta, -jnp.exp(self.A_log[...]), B, C)
        y = (y + self.D[...] * x) * jax.nn.silu(z)
        return self.out_proj(y), LayerState(window[:, 1:], ssm)


class MambaLM(nnx.Module):
    r"""A Mamba language model: embed, ``num_layers`` pre-norm residual Mamba blocks
    ($h \leftarrow h + \mathrm{Mamba}(\mathrm{RMSNorm}(h))$), a final RMSNorm, a linear head.

    It implements the course's decoding interface. The state is one :class:`LayerState` per
    layer, of a size independent of the length: ``max_len`` is accepted and ignored.
    """

    def __init__(self, cfg: MambaConfig, *, rngs: nnx.Rngs):
        if not isinstance(cfg, MambaConfig):
            raise TypeError(f"cfg must be a MambaConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed = nnx.Embed(cfg.vocab_size, cfg.dim, rngs=rngs)
        self.norms = nnx.List([RMSNorm(cfg.dim) for _ in range(cfg.num_layers)])
        self.blocks = nnx.List([MambaBlock(cfg, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.dim)
        self.head = nnx.Linear(cfg.dim, cfg.vocab_size, use_bias=False, rngs=rngs)

    def _check_tokens(self, tokens, ndim, what):
        tokens = jnp.asarray(tokens)
        if tokens.ndim != ndim or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(f"tokens must be an integer array of shape {what}, got "
                             f"{tokens.dtype}{list(tokens.shape)}")
        return tokens

    def from_embeddings(self, h, states=None, *, method: str | None = None):
        """Embeddings (B, L, dim) -> (logits (B, L, V), the state after the last position)."""
        new = []
        for i, (norm, block) in enumerate(zip(self.norms, self.blocks)):
            out, s = block(norm(h), None if states is None else states[i], method=method)
            h = h + out
            new.append(s)
        return self.head(self.norm(h)), tuple(new)

    def __call__(self, tokens, *, method: str | None = None):
        """Teacher forcing: int (B, L) -> logits (B, L, V); position t predicts t+1.
        ``method`` overrides ``cfg.scan`` ("sequential" or "parallel")."""
        tokens = self._check_tokens(tokens, 2, "(batch, time)")
        return self.from_embeddings(self.embed(tokens), method=method)[0]

    # ------------------------------------------------ the decoding interface (arcourse.decoding)
    def init_state(self, batch_size: int, max_len: int | None = None):
        """Zero states for ``batch_size`` sequences: per layer a conv buffer (B, K-1, D_in) and an
        SSM state (B, D_in, N). Constant size: ``max_len`` does not matter."""
        batch_size = check_int("batch_size", batch_size)
        return tuple(block.init_state(batch_size) for block in self.blocks)

    def prefill(self, state, prompt):
        """Read ``prompt`` (B, P) in one parallel pass from ``state``: (logits (B, V), state)."""
        prompt = self._check_tokens(prompt, 2, "(batch, length)")
        logits, state = self.from_embeddings(self.embed(prompt), state)
        return logits[:, -1], state

    def step(self, state, tokens):
        """Read one token per row (B,): (logits (B, V) of the next token, new state)."""
        tokens = self._check_tokens(tokens, 1, "(batch,)")
        h = self.embed(tokens)
        new = []
        for norm, block, s in zip(self.norms, self.blocks, state):
            out, s = block.step(norm(h), s)
            h = h + out
            new.append(s)
        return self.head(self.norm(h)), tuple(new)


# --------------------------------------------------------------------------------------------
# 5. A task that needs selection
# --------------------------------------------------------------------------------------------
def selective_copy_task(key, batch_size: int, length: int, num_tokens: int, vocab_size: int):
    r"""Selective copying (Gu & Dao 2023): ``num_tokens`` data symbols scattered at random
    positions among ``length`` noise symbols, a separator, then the data symbols again, in order.

    Symbols: 0 the noise (blank), 1 the separator, $2 \dots$ ``vocab_size + 1`` the data. A
    sequence is $s = (\text{context}_{1..length}, \text{sep}, d_1, \dots, d_K)$; returns
    ``(inputs, targets, mask)``, each (B, length + K): ``inputs = s[:-1]``, ``targets = s[1:]``,
    ``mask`` true on the $K$ targets $d_1..d_K$. Chance level is $\ln$ ``vocab_size`` nats; a
    model that remembers which symbols appeared and in what order reaches 0. Since the positions
    are random, no fixed (time-invariant) filter can pick them out. Traceable under ``jit``.
    """
    batch_size = check_int("batch_size", batch_size)
    num_tokens = check_int("num_tokens", num_tokens)
    length = check_int("length", length, num_tokens)
    vocab_size = check_int("vocab_size", vocab_size, 2)
    return _selective_copy_task(key, batch_size, length, num_tokens, vocab_size)


@partial(jax.jit, static_argnums=(1, 2, 3, 4))
def _selective_copy_task(key, batch_size, length, num_tokens, vocab_size):
    """:func:`selective_copy_task`, compiled as one program (eagerly, each of its operations
    would compile on its own); inside another ``jit`` it is simply inlined."""
    k_pos, k_sym = jax.random.split(key)
    # num_tokens distinct positions per row, in increasing order
    scores = jax.random.uniform(k_pos, (batch_size, length))
    pos = jnp.sort(jnp.argsort(scores, axis=1)[:, :num_tokens], axis=1)
    sym = jax.random.randint(k_sym, (batch_size, num_tokens), 2, vocab_size + 2, jnp.int32)
    rows = jnp.arange(batch_size)[:, None]
    context = jnp.zeros((batch_size, length), jnp.int32).at[rows, pos].set(sym)
    s = jnp.concatenate([context, jnp.ones((batch_size, 1), jnp.int32), sym], axis=1)
    T = length + num_tokens
    mask = jnp.broadcast_to(jnp.arange(T) >= length, (batch_size, T))
    return s[:, :-1], s[:, 1:], mask
