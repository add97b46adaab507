r"""Autoregressive flows: MADE, MAF and IAF (chapter 08).

An autoregressive model $p(x) = \prod_i p(x_i \mid x_{<i})$ can be computed by one network whose
weights are *masked* so that output $i$ sees only inputs $j$ earlier in a chosen order.

* **MADE** (Germain et al., 2015). Every unit gets a *degree*: input $i$ has degree $m(i)$, its
  position in the order (a permutation of $1..D$); hidden unit $k$ has a degree in
  $\{1, \dots, D-1\}$. A hidden weight from unit $j$ to unit $k$ is kept when $m(k) \ge m(j)$, an
  output weight into output $d$ when $m(d) > m(k)$ (strict): output $d$ then depends on exactly
  the inputs of degree $< m(d)$. :func:`made_degrees`, :func:`made_masks`, :class:`MADE`
  (several masks: orderings and connectivity resampling), :func:`made_nll` for discrete data.
* **MAF** (Papamakarios et al., 2017). An affine autoregressive bijection between data $x$ and
  noise $u \sim \mathcal N(0, I)$: $x_i = u_i\, e^{\alpha_i} + \mu_i$ with $(\mu_i, \alpha_i)$ a
  MADE of $x_{<i}$. Density: one pass, $u = (x - \mu(x)) e^{-\alpha(x)}$,
  $\log p(x) = \log \mathcal N(u; 0, I) - \sum_i \alpha_i(x)$. Sampling: $D$ passes.
* **IAF** (Kingma et al., 2016). The same layer with the MADE reading the noise:
  $x_i = u_i e^{\alpha_i(u_{<i})} + \mu_i(u_{<i})$. Sampling: one pass; density: $D$ passes.

:class:`AffineAutoregressive` is one layer of either kind, :class:`AutoregressiveFlow` a stack of
them, each layer's MADE in a different order (a permutation between layers). Each layer maps both
ways, ``to_noise(x) -> (u, log|det du/dx|)`` and ``to_data(u) -> (x, log|det dx/du|)``, one of the
two in a single pass and the other in $D$ passes inside one ``lax.fori_loop``.
For the digits: :func:`dequantize`, the logit transform :func:`logit_transform` and
:func:`dequantized_bits_per_dim`, which turns a continuous density into a bound on the discrete
one, in the bits/dim of chapter 05.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse._checks import check_choice, check_int, check_positive_float

__all__ = [
    "LOG_2PI",
    "made_degrees",
    "made_masks",
    "MADE",
    "made_nll",
    "made_ensemble_nll",
    "standard_normal_log_prob",
    "affine_to_noise",
    "affine_to_data",
    "maf_log_density",
    "maf_sample",
    "iaf_sample",
    "iaf_invert",
    "AffineAutoregressive",
    "AutoregressiveFlow",
    "flow_log_prob",
    "flow_sample",
    "flow_to_data",
    "dequantize",
    "logit_transform",
    "dequantized_bits_per_dim",
    "digits_log_prob",
    "importance_weighted_bits_per_dim",
    "toy_2d",
    "mixture_log_prob",
    "grid_log_prob",
    "time_density_and_sampling",
]

LOG_2PI = math.log(2.0 * math.pi)
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu}


class Buffer(nnx.Variable):
    """A constant of the architecture kept with the model (masks, degrees): never trained."""


# --------------------------------------------------------------------------------------------
# MADE: degrees and masks
# --------------------------------------------------------------------------------------------
def _check_degrees_input(input_degrees, dim: int | None = None) -> np.ndarray:
    d = np.asarray(input_degrees)
    if d.ndim != 1 or not np.issubdtype(d.dtype, np.integer):
        raise ValueError(f"input_degrees must be a 1-D integer array, got {d.dtype}{list(d.shape)}")
    n = len(d)
    if dim is not None and n != dim:
        raise ValueError(f"input_degrees must have length dim={dim}, got {n}")
    if not np.array_equal(np.sort(d), np.arange(1, n + 1)):
        raise ValueError(f"input_degrees must be a permutation of 1..{n}, got {d.tolist()}")
    return d.astype(np.int32)


def made_degrees(input_degrees, hidden_sizes, *, rng: np.random.Generator | None = None):
    r"""The degrees of every layer of a MADE: ``[m^0 (D,), m^1 (H_1,), ..., m^L (H_L,)]``, int32.

    $m^0$ = ``input_degrees``, a permutation of $1..D$ (input $i$ is the $m^0(i)$-th variable of the
    order). Hidden degrees lie in $\{\min m^{l-1}, \dots, D-1\}$: without ``rng`` they cycle
    through that range (every degree used, as evenly as possible); with ``rng`` they are drawn
    uniformly from it (*connectivity resampling*, Germain et al. 2015, sec. 4). A hidden unit of
    degree $k$ may see inputs of degree $\le k$, and it feeds outputs of degree $> k$; degree $D$
    would feed no output, degree 0 would see no input, so neither is used. For $D = 1$ no
    output can depend on anything and the hidden degrees are all 1.
    """
    m0 = _check_degrees_input(input_degrees)
    dim = len(m0)
    degrees = [m0]
    for i, h in enumerate(hidden_sizes):
        h = check_int(f"hidden_sizes[{i}]", h)
        lo = min(int(degrees[-1].min()), max(dim - 1, 1))
        hi = max(dim - 1, 1)
        if rng is None:
            m = lo + np.arange(h) % (hi - lo + 1)
        else:
            m = rng.integers(lo, hi + 1, size=h)
        degrees.append(m.astype(np.int32))
    return degrees


def made_masks(degrees):
    r"""The MADE masks from the degrees ``[m^0 (D,), m^1 (H_1,), ..., m^L (H_L,)]``.

    Returns ``L + 1`` bool arrays, laid out like the weights of ``h @ W`` (inputs on axis 0):
    hidden masks ``M^l[j, k] = m^l(k) >= m^{l-1}(j)``, shape ``(n_{l-1}, n_l)``, and the output
    mask ``M^{L+1}[k, d] = m^0(d) > m^L(k)`` (strict), shape ``(H_L, D)``: output $d$ predicts
    the input of degree $m^0(d)$, so it must not see that input itself. With no hidden layer
    (``degrees = [m^0]``) the single mask is ``m^0(d) > m^0(j)``, shape ``(D, D)``.
    """
    degrees = [np.asarray(m) for m in degrees]
    if not degrees:
        raise ValueError("degrees must hold at least the input degrees")
    masks = [degrees[l][None, :] >= degrees[l - 1][:, None] for l in range(1, len(degrees))]
    masks.append(degrees[0][None, :] > degrees[-1][:, None])
    return masks


def _dense_init(key, n_in, n_out, scale=1.0):
    return scale * jax.random.normal(key, (n_in, n_out)) / math.sqrt(n_in)


class MADE(nnx.Module):
    r"""A masked autoencoder: ``x (..., D) -> out (..., D, P)``, output ``[d]`` a function of the
    inputs of degree $< m^0(d)$ only.

    $h^l = g\big(h^{l-1} (W^l \odot M^l) + b^l\big)$, $h^0 = x$, and the output
    $h^L (W^{L+1} \odot M^{L+1}) + b^{L+1}$ with each output mask column repeated ``P`` times
    (``P = params_per_dim``: 1 for a Bernoulli logit, 2 for a shift and log-scale, ``L`` logits
    of a categorical).

    Args:
      dim: $D$. hidden_sizes: widths of the hidden layers (at least one).
      params_per_dim: $P$.
      input_degrees: ``(D,)`` or ``(K, D)`` permutations of $1..D$ (the order(s)); default the
        natural order $1..D$ (or random orders with ``random_orders``).
      num_masks: $K$ mask sets (connectivity resampling: each draws its hidden degrees; with
        ``K = 1`` they cycle deterministically). Select one with ``mask_index`` in ``__call__``.
      random_orders: draw a random order for each of the $K$ masks (order-agnostic training).
      activation: ``"relu"``, ``"tanh"`` or ``"gelu"``.
      zero_init_output: start with zero output weights (a flow layer then starts as identity).
      seed: the NumPy seed of the degrees and orders.
    """

    def __init__(self, dim: int, hidden_sizes, *, params_per_dim: int = 1, input_degrees=None,
                 num_masks: int = 1, random_orders: bool = False, activation: str = "relu",
                 zero_init_output: bool = False, seed: int = 0, rngs: nnx.Rngs):
        dim = check_int("dim", dim)
        hidden_sizes = tuple(check_int(f"hidden_sizes[{i}]", h) for i, h in enumerate(hidden_sizes))
        if not hidden_sizes:
            raise ValueError("hidden_sizes must list at least one hidden layer")
        self.dim, self.hidden_sizes = dim, hidden_sizes
        self.params_per_dim = check_int("params_per_dim", params_per_dim)
        self.num_masks = check_int("num_masks", num_masks)
        self.activation = check_choice("activation", activation, tuple(ACTIVATIONS))
        rng = np.random.default_rng(seed)
        if input_degrees is None:
            orders = [rng.permutation(dim) + 1 if random_orders else np.arange(1, dim + 1)
                      for _ in range(self.num_masks)]
        else:
            given = np.asarray(input_degrees)
            given = given[None] if given.ndim == 1 else given
            if given.ndim != 2 or given.shape[0] not in (1, self.num_masks):
                raise ValueError(f"input_degrees must have shape (D,) or (num_masks={num_masks}, "
                                 f"D), got {given.shape}")
            orders = [_check_degrees_input(given[min(k, len(given) - 1)], dim)
                      for k in range(self.num_masks)]
        sets = []
        for k in range(self.num_masks):
            deg = made_degrees(orders[k], hidden_sizes, rng=rng if self.num_masks > 1 else None)
            sets.append((deg, made_masks(deg)))
        P = self.params_per_dim
        self.input_degrees = Buffer(jnp.asarray(np.stack([s[0][0] for s in sets])))
        masks = []
        for l in range(len(hidden_sizes) + 1):
            m = np.stack([s[1][l] for s in sets]).astype(np.float32)
            if l == len(hidden_sizes):
                m = np.repeat(m, P, axis=2)  # output column d * P + p belongs to variable d
            masks.append(Buffer(jnp.asarray(m)))
        self.masks = nnx.List(masks)
        sizes = (dim, *hidden_sizes, dim * P)
        weights, biases = [], []
        for l in range(len(sizes) - 1):
            last = l == len(sizes) - 2
            w = _dense_init(rngs.params(), sizes[l], sizes[l + 1])
            weights.append(nnx.Param(jnp.zeros_like(w) if (last and zero_init_output) else w))
            biases.append(nnx.Param(jnp.zeros((sizes[l + 1],))))
        self.weights, self.biases = nnx.List(weights), nnx.List(biases)

    def __call__(self, x: jax.Array, mask_index=0) -> jax.Array:
        x = jnp.asarray(x, jnp.float32)
        if x.shape[-1] != self.dim:
            raise ValueError(f"x must have last axis dim={self.dim}, got shape {x.shape}")
        g = ACTIVATIONS[self.activation]
        h = x
        n = len(self.weights)
        for l in range(n):
            w = self.weights[l][...] * self.masks[l][...][mask_index]
            h = h @ w + self.biases[l][...]
            if l < n - 1:
                h = g(h)
        return h.reshape(*x.shape[:-1], self.dim, self.params_per_dim)


def made_nll(model: MADE, images: jax.Array, levels: int, mask_index=0) -> jax.Array:
    r"""Mean NLL in nats per dimension of integer data under a categorical MADE.

    ``images`` int ``(B, ...)`` with values in ``0..levels-1`` and ``prod(...) = D``; the model has
    ``params_per_dim = levels`` (the logits of $p(x_d \mid x_{<d})$ in its order). The inputs are
    scaled to $x / (L - 1) - 1/2$.
    """
    x = jnp.asarray(images).reshape(images.shape[0], -1)
    logits = model(x / (levels - 1) - 0.5, mask_index)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, x[..., None], axis=-1))


def made_ensemble_nll(model: MADE, images: jax.Array, levels: int) -> jax.Array:
    r"""NLL in nats per dimension of the ensemble $p(x) = \frac1K \sum_k p_k(x)$ over the MADE's
    $K$ masks (each $p_k$ a full autoregressive model in its own order and connectivity)."""
    x = jnp.asarray(images).reshape(images.shape[0], -1)

    def per_image(k):
        logp = jax.nn.log_softmax(model(x / (levels - 1) - 0.5, k), axis=-1)
        return jnp.take_along_axis(logp, x[..., None], axis=-1)[..., 0].sum(-1)

    lp = jnp.stack([per_image(k) for k in range(model.num_masks)])  # (K, B)
    ens = jax.scipy.special.logsumexp(lp, axis=0) - math.log(model.num_masks)
    return -jnp.mean(ens) / x.shape[1]


# --------------------------------------------------------------------------------------------
# The affine autoregressive layer: MAF and IAF
# --------------------------------------------------------------------------------------------
def standard_normal_log_prob(u: jax.Array) -> jax.Array:
    r"""$\log \mathcal N(u; 0, I) = -\frac12 \sum_i (u_i^2 + \log 2\pi)$ over the last axis."""
    u = jnp.asarray(u)
    return -0.5 * jnp.sum(u * u + LOG_2PI, axis=-1)


def affine_to_noise(x, mu, log_scale):
    r"""$u = (x - \mu)\, e^{-\alpha}$ and $\log|\det \partial u / \partial x| = -\sum_i \alpha_i$.

    All of shape ``(..., D)``; returns ``(u (..., D), log_det (...))``. The Jacobian is triangular
    (in the MADE's order) when $\mu, \alpha$ depend on earlier variables only, so its
    determinant is the product of the diagonal $e^{-\alpha_i}$.
    """
    u = (x - mu) * jnp.exp(-log_scale)
    return u, -jnp.sum(log_scale, axis=-1)


def affine_to_data(u, mu, log_scale):
    r"""$x = u\, e^{\alpha} + \mu$ and $\log|\det \partial x / \partial u| = \sum_i \alpha_i$."""
    return u * jnp.exp(log_scale) + mu, jnp.sum(log_scale, axis=-1)


def maf_log_density(x, mu, log_scale):
    r"""The log-density of one MAF layer on a standard normal base, ``(B, D) -> (B,)``.

    $u = (x - \mu) e^{-\alpha}$, $\log p(x) = \sum_i \big[-\tfrac12 u_i^2 - \tfrac12\log 2\pi
    - \alpha_i\big]$, where $\mu, \alpha$ are the MADE's outputs at $x$.
    """
    u, log_det = affine_to_noise(x, mu, log_scale)
    return standard_normal_log_prob(u) + log_det


def maf_sample(shift_log_scale: Callable, u: jax.Array):
    r"""Invert a MAF layer: $x$ from the noise $u$ ``(B, D)``, in $D$ passes of the MADE.

    ``shift_log_scale(x) -> (mu, log_scale)`` is autoregressive. Start from $x = 0$ and repeat
    $x \leftarrow u\, e^{\alpha(x)} + \mu(x)$ $D$ times: after pass $k$ the variables of degree
    $\le k$ are exact (their $\mu, \alpha$ read only earlier, already exact, variables), so after
    $D$ passes all of $x$ is. One ``lax.fori_loop``. Returns
    ``(x, log|det dx/du| = sum alpha)``, the log-scales of the last pass (which are exact).
    """
    u = jnp.asarray(u, jnp.float32)

    def body(_, carry):
        x, _ = carry
        mu, a = shift_log_scale(x)
        return affine_to_data(u, mu, a)

    init = (jnp.zeros_like(u), jnp.zeros(u.shape[:-1], u.dtype))
    return jax.lax.fori_loop(0, u.shape[-1], body, init)


def iaf_sample(shift_log_scale: Callable, u: jax.Array):
    r"""One IAF pass: $x = u\, e^{\alpha(u)} + \mu(u)$ and its log-density $\log q(x) =
    \log \mathcal N(u; 0, I) - \sum_i \alpha_i(u)$; ``u (B, D) -> (x (B, D), log_q (B,))``."""
    mu, a = shift_log_scale(u)
    x, log_det = affine_to_data(u, mu, a)
    return x, standard_normal_log_prob(u) - log_det


def iaf_invert(shift_log_scale: Callable, x: jax.Array):
    r"""The noise of an IAF layer from the data $x$ ``(B, D)``, in $D$ passes (its slow direction).

    Repeat $u \leftarrow (x - \mu(u))\, e^{-\alpha(u)}$ $D$ times from $u = 0$. Returns
    ``(u, log|det du/dx| = -sum alpha(u))``.
    """
    x = jnp.asarray(x, jnp.float32)

    def body(_, carry):
        u, _ = carry
        mu, a = shift_log_scale(u)
        return affine_to_noise(x, mu, a)

    init = (jnp.zeros_like(x), jnp.zeros(x.shape[:-1], x.dtype))
    return jax.lax.fori_loop(0, x.shape[-1], body, init)


class AffineAutoregressive(nnx.Module):
    r"""One affine autoregressive layer between data $x$ and noise $u$, both ``(B, D)``.

    ``kind="maf"``: $u = (x - \mu(x)) e^{-\alpha(x)}$ (density in one pass, sampling in $D$);
    ``kind="iaf"``: $x = u\, e^{\alpha(u)} + \mu(u)$ (sampling in one pass, density in $D$).
    $\mu, \alpha$ come from a :class:`MADE` with ``params_per_dim=2`` and zero-initialised
    outputs (the layer starts as the identity). The log-scale is soft-clipped to
    $\alpha = c \tanh(\tilde\alpha / c)$ with $c$ = ``max_log_scale``, which keeps early training
    from exploding and changes nothing near 0.
    """

    def __init__(self, dim: int, hidden_sizes, *, kind: str = "maf", input_degrees=None,
                 activation: str = "relu", max_log_scale: float = 4.0, rngs: nnx.Rngs):
        self.kind = check_choice("kind", kind, ("maf", "iaf"))
        self.max_log_scale = check_positive_float("max_log_scale", max_log_scale)
        self.made = MADE(dim, hidden_sizes, params_per_dim=2, input_degrees=input_degrees,
                         activation=activation, zero_init_output=True, rngs=rngs)
        self.dim = dim

    def shift_log_scale(self, y: jax.Array):
        """``(mu, log_scale)``, each ``(B, D)``: the MADE of ``y`` (x for MAF, u for IAF)."""
        out = self.made(y)
        c = self.max_log_scale
        return out[..., 0], c * jnp.tanh(out[..., 1] / c)

    def to_noise(self, x: jax.Array):
        """``(u, log|det du/dx|)``: one pass for MAF, $D$ passes for IAF."""
        if self.kind == "maf":
            mu, a = self.shift_log_scale(x)
            return affine_to_noise(x, mu, a)
        return iaf_invert(self.shift_log_scale, x)

    def to_data(self, u: jax.Array):
        """``(x, log|det dx/du|)``: $D$ passes for MAF, one pass for IAF."""
        if self.kind == "maf":
            return maf_sample(self.shift_log_scale, u)
        mu, a = self.shift_log_scale(u)
        return affine_to_data(u, mu, a)


class AutoregressiveFlow(nnx.Module):
    r"""A stack of :class:`AffineAutoregressive` layers on a standard normal base.

    $x = f_1 \circ \dots \circ f_K(u)$, $\log p(x) = \log \mathcal N(u; 0, I) + \sum_k
    \log|\det \partial u_k / \partial u_{k-1}|$ along the way from $x$ to $u$. Layer $k$'s MADE
    uses its own order: ``orders="reverse"`` alternates natural and reversed, ``"random"`` draws
    a permutation per layer. Re-ordering the next MADE is the same as permuting the variables
    between layers (with log-determinant 0), without moving any data.
    """

    def __init__(self, dim: int, num_layers: int, hidden_sizes, *, kind: str = "maf",
                 orders: str = "reverse", activation: str = "relu", max_log_scale: float = 4.0,
                 seed: int = 0, rngs: nnx.Rngs):
        self.dim = check_int("dim", dim)
        num_layers = check_int("num_layers", num_layers)
        check_choice("orders", orders, ("reverse", "random"))
        self.kind = check_choice("kind", kind, ("maf", "iaf"))
        rng = np.random.default_rng(seed)
        layers = []
        for k in range(num_layers):
            if orders == "reverse":
                deg = np.arange(1, dim + 1) if k % 2 == 0 else np.arange(dim, 0, -1)
            else:
                deg = rng.permutation(dim) + 1
            layers.append(AffineAutoregressive(dim, hidden_sizes, kind=kind, input_degrees=deg,
                                               activation=activation, max_log_scale=max_log_scale,
                                               rngs=rngs))
        self.layers = nnx.List(layers)

    def to_noise(self, x: jax.Array):
        """``(u, sum of log|det|)``: data ``(B, D)`` through every layer to the base."""
        x = jnp.asarray(x, jnp.float32)
        total = jnp.zeros(x.shape[:-1])
        for layer in self.layers:
            x, ld = layer.to_noise(x)
            total = total + ld
        return x, total

    def to_data(self, u: jax.Array):
        """``(x, sum of log|det dx/du|)``: base noise ``(B, D)`` through the layers in reverse."""
        u = jnp.asarray(u, jnp.float32)
        total = jnp.zeros(u.shape[:-1])
        for layer in reversed(self.layers):
            u, ld = layer.to_data(u)
            total = total + ld
        return u, total

    def log_prob(self, x: jax.Array) -> jax.Array:
        r"""$\log p(x)$ in nats, ``(B, D) -> (B,)``."""
        u, log_det = self.to_noise(x)
        return standard_normal_log_prob(u) + log_det

    def sample(self, key: jax.Array, num: int) -> jax.Array:
        """``num`` draws ``(num, D)``: $u \\sim \\mathcal N(0, I)$ pushed through ``to_data``."""
        u = jax.random.normal(key, (num, self.dim))
        return self.to_data(u)[0]


@nnx.jit
def flow_log_prob(model: AutoregressiveFlow, x: jax.Array) -> jax.Array:
    """``model.log_prob(x)``, compiled."""
    return model.log_prob(x)


@nnx.jit
def flow_to_data(model: AutoregressiveFlow, u: jax.Array) -> jax.Array:
    """``model.to_data(u)[0]``, compiled: push base points (a grid, say) through the flow."""
    return model.to_data(u)[0]


def flow_sample(key: jax.Array, model: AutoregressiveFlow, num: int) -> jax.Array:
    """``num`` samples ``(num, D)`` of the flow, compiled (the key first, as ``jax.random``)."""
    num = check_int("num", num)
    return flow_to_data(model, jax.random.normal(key, (num, model.dim)))


# --------------------------------------------------------------------------------------------
# Discrete data: dequantisation
# --------------------------------------------------------------------------------------------
def dequantize(key: jax.Array, images: jax.Array, levels: int) -> jax.Array:
    r"""$z = (x + v) / L$ with $v \sim U[0, 1)^D$: integer ``(B, ...)`` in ``0..L-1`` to float
    ``(B, D)`` in $[0, 1)$, flattened."""
    x = jnp.asarray(images).reshape(images.shape[0], -1).astype(jnp.float32)
    return (x + jax.random.uniform(key, x.shape)) / levels


def logit_transform(z: jax.Array, lam: float = 0.05):
    r"""$y = \mathrm{logit}(s)$, $s = \lambda + (1 - 2\lambda) z$: $[0,1]^D \to \mathbb R^D$.

    Returns ``(y (B, D), log|det dy/dz| (B,))`` with
    $\log|\det| = \sum_i [\log(1-2\lambda) - \log s_i - \log(1 - s_i)]$. The flow models $y$,
    which is unbounded like its Gaussian base; $\lambda$ keeps $y$ finite at $z = 0$ and $1$.
    """
    s = lam + (1 - 2 * lam) * z
    y = jnp.log(s) - jnp.log1p(-s)
    log_det = jnp.sum(math.log(1 - 2 * lam) - jnp.log(s) - jnp.log1p(-s), axis=-1)
    return y, log_det


def digits_log_prob(model: AutoregressiveFlow, z: jax.Array, lam: float = 0.05) -> jax.Array:
    r"""$\log p(z)$ on $[0,1]^D$: the flow's density of $y = $ :func:`logit_transform` $(z)$ plus
    the transform's log-determinant. ``(B, D) -> (B,)``."""
    y, ld = logit_transform(z, lam)
    return model.log_prob(y) + ld


def dequantized_bits_per_dim(log_p_z: jax.Array, dim: int, levels: int) -> jax.Array:
    r"""Bits/dim of the *discrete* data from a continuous log-density of $z = (x + v)/L$.

    $P(x) = \int_{[0,1)^D} p_y(x + v)\,dv$ and $p_y(x + v) = p_z(z)\,L^{-D}$, so by Jensen
    $-\log_2 P(x) \le -\mathbb E_v \log_2 p_z(z) + D \log_2 L$. Per dimension, averaged over the
    batch ``log_p_z (B,)`` (nats): $\big(-\overline{\log p_z}/D + \ln L\big)/\ln 2$, a scalar.
    """
    return (-jnp.mean(log_p_z) / dim + math.log(levels)) / math.log(2.0)


def importance_weighted_bits_per_dim(key: jax.Array, model: AutoregressiveFlow, images, levels: int,
                                     num_samples: int, lam: float = 0.05) -> jax.Array:
    r"""A tighter bound: $-\log_2 \frac1S \sum_s p_y(x + v_s)$, $v_s \sim U[0,1)^D$, per dimension.

    With uniform dequantisation, $\frac1S\sum_s p_y(x + v_s)$ is an unbiased estimate of $P(x)$,
    so its log is a lower bound on $\log P(x)$ that tightens as $S$ grows ($S = 1$ is
    :func:`dequantized_bits_per_dim`).
    """
    num_samples = check_int("num_samples", num_samples)
    x = jnp.asarray(images)
    dim = int(np.prod(x.shape[1:]))

    def one(k):
        return digits_log_prob(model, dequantize(k, x, levels), lam) - dim * math.log(levels)

    lp = jax.lax.map(one, jax.random.split(key, num_samples))  # (S, B): log p_y
    est = jax.scipy.special.logsumexp(lp, axis=0) - math.log(num_samples)
    return -jnp.mean(est) / dim / math.log(2.0)


# --------------------------------------------------------------------------------------------
# 2-D densities
# --------------------------------------------------------------------------------------------
MIXTURE_RADIUS, MIXTURE_STD, MIXTURE_COMPONENTS = 2.0, 0.3, 8


def _mixture_means() -> np.ndarray:
    t = 2 * np.pi * np.arange(MIXTURE_COMPONENTS) / MIXTURE_COMPONENTS
    return MIXTURE_RADIUS * np.stack([np.cos(t), np.sin(t)], 1)


def toy_2d(name: str, num: int, seed: int = 0) -> np.ndarray:
    """``num`` points ``float32 (num, 2)`` of ``"moons"``, ``"rings"`` or ``"mixture"``.

    moons: ``sklearn.datasets.make_moons(noise=0.08)`` centred and scaled by 1.5; rings:
    ``make_circles(factor=0.5, noise=0.06)`` scaled by 2 (radii 2 and 1); mixture: 8 Gaussians of
    standard deviation 0.3 on a circle of radius 2, with the exact density
    :func:`mixture_log_prob`.
    """
    from sklearn.datasets import make_circles, make_moons

    check_choice("name", name, ("moons", "rings", "mixture"))
    num = check_int("num", num)
    if name == "moons":
        x, _ = make_moons(num, noise=0.08, random_state=seed)
        x = 1.5 * (x - np.array([0.5, 0.25]))
    elif name == "rings":
        x, _ = make_circles(num, factor=0.5, noise=0.06, random_state=seed)
        x = 2.0 * x
    else:
        rng = np.random.default_rng(seed)
        c = rng.integers(0, MIXTURE_COMPONENTS, num)
        x = _mixture_means()[c] + MIXTURE_STD * rng.normal(size=(num, 2))
    return x.astype(np.float32)


def mixture_log_prob(x) -> jax.Array:
    r"""The exact log-density of the ``"mixture"`` data: $\log \frac18 \sum_c
    \mathcal N(x; \mu_c, 0.3^2 I)$, ``(B, 2) -> (B,)``."""
    x = jnp.asarray(x)
    d = (x[:, None, :] - jnp.asarray(_mixture_means())[None]) / MIXTURE_STD
    comp = -0.5 * jnp.sum(d * d, -1) - LOG_2PI - 2 * math.log(MIXTURE_STD)
    return jax.scipy.special.logsumexp(comp, axis=1) - math.log(MIXTURE_COMPONENTS)


def grid_log_prob(log_prob: Callable, lim: float = 4.0, num: int = 200):
    """``log_prob`` on a ``num x num`` grid over ``[-lim, lim]^2``.

    Returns ``(xs (num,), log p (num, num) with rows over y and columns over x, cell area)``;
    ``exp(log p).sum() * area`` is the mass inside the square.
    """
    xs = np.linspace(-lim, lim, num, dtype=np.float32)
    gx, gy = np.meshgrid(xs, xs)
    pts = jnp.asarray(np.stack([gx.ravel(), gy.ravel()], 1))
    lp = np.asarray(log_prob(pts)).reshape(num, num)
    return xs, lp, float((xs[1] - xs[0]) ** 2)


# --------------------------------------------------------------------------------------------
# Timing: density against sampling
# --------------------------------------------------------------------------------------------
def time_density_and_sampling(kind: str, dim: int, *, hidden: int = 256, num_layers: int = 1,
                              batch: int = 256, repeats: int = 5, seed: int = 0) -> dict:
    """Seconds per call of the compiled density and the compiled sampler of a fresh flow.

    Both functions are compiled (and run once) before timing; the time is the median of
    ``repeats`` calls on a batch of ``batch`` points. Returns
    ``{"density": s, "sampling": s, "ratio": sampling / density}``.
    """
    model = AutoregressiveFlow(dim, num_layers, (hidden,), kind=kind, rngs=nnx.Rngs(seed))
    # Non-zero output weights: an identity flow would let XLA's work look smaller than it is.
    for layer in model.layers:
        w = layer.made.weights[-1]
        w[...] = 0.01 * jax.random.normal(jax.random.key(seed), w[...].shape)
    graph, state = nnx.split(model)
    density = jax.jit(lambda s, x: nnx.merge(graph, s).log_prob(x))
    sampling = jax.jit(lambda s, u: nnx.merge(graph, s).to_data(u)[0])
    x = jax.random.normal(jax.random.key(seed + 1), (batch, dim))
    out = {}
    for name, fn in (("density", density), ("sampling", sampling)):
        fn(state, x).block_until_ready()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(state, x).block_until_ready()
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    out["ratio"] = out["sampling"] / out["density"]
    return out
