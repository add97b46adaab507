r"""Decoding: turning a model's next-token distribution into text.

A model gives logits $z \in \mathbb{R}^V$ for the next token; $p = \mathrm{softmax}(z)$. The
*logit processors* below reshape that distribution before a token is drawn. Each is a pure,
batched function of ``(..., V)`` arrays, traceable under ``jit``; a removed token gets the logit
$-\infty$ (probability zero). Precisely:

* temperature $\tau > 0$: $z \mapsto z / \tau$; $\tau \to 0$ is greedy decoding ($\arg\max$).
* top-k: keep every token whose logit is $\ge$ the $k$-th largest logit. Ties at the boundary are
  all kept, so more than $k$ tokens survive when the $k$-th value is tied.
* top-p (nucleus): sort the tokens by probability (ties: lower token id first) and keep the
  smallest prefix whose total probability reaches $p$, i.e. token $j$ of the sorted order is kept
  iff $\sum_{i<j} p_{(i)} < p$. The token that crosses $p$ is kept, the first token is always kept.
* min-p: remove the tokens whose probability is strictly below $p_{\min} \cdot \max_i p_i$.
* repetition penalty $\theta$ (Keskar et al. 2019): for every *distinct* token already present,
  a positive logit is divided by $\theta$ and a negative one multiplied by $\theta$.

:func:`generate` applies them in the order repetition penalty, temperature, top-k, top-p, min-p
(top-p and min-p see the temperature-scaled distribution), then samples.

**The decoding interface.** Every model that generates token by token (the character RNN of
chapter 03, the GPT of chapter 06, WaveNet, Mamba, the target and draft of speculative decoding)
is an ``nnx.Module`` with three methods:

.. code-block:: python

    state = model.init_state(batch_size, max_len)   # RNN carry, KV cache, WaveNet queues, SSM state
    logits, state = model.prefill(state, prompt)    # prompt int32 (B, P) -> logits (B, V) of token P
    logits, state = model.step(state, tokens)       # tokens int32 (B,)   -> logits (B, V) of the next

The state is a pytree of arrays with the batch on axis 0 (scalars, such as a shared position
counter, are allowed); ``max_len`` bounds the positions it must hold (prompt plus generated
tokens). ``prefill`` may read the prompt in one parallel pass (GPT) or step by step
(:func:`prefill_by_steps`). A model may add ``reorder_state(state, rows)`` if gathering rows of
every batched leaf (:func:`take_rows`) is not how its state follows a beam.

:func:`generate` (sampling, with every processor) and :func:`beam_search` take any such model
and run the whole loop, prompt included, as one compiled ``lax.scan``. The model's parameters
are arguments of that compiled loop, not constants: a retrained model of the same structure
reuses it. Samplers take the PRNG key first among their arrays, as ``jax.random`` does:
``generate(model, prompt, num_tokens, key)``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "apply_temperature",
    "top_k_mask",
    "top_k_filter",
    "top_p_mask",
    "top_p_filter",
    "min_p_mask",
    "min_p_filter",
    "token_presence",
    "apply_repetition_penalty",
    "repetition_penalty",
    "process_logits",
    "Settings",
    "make_settings",
    "filtered_probs",
    "sample_token",
    "Decoder",
    "check_decoder",
    "prefill_by_steps",
    "take_rows",
    "generate",
    "generate_python_loop",
    "beam_step",
    "beam_search",
    "BeamResult",
    "length_penalty_factor",
    "sequence_log_prob",
    "distinct_ngrams",
    "repetition_period",
]

NEG_INF = -jnp.inf
# Up to this vocabulary size, top-k and top-p compare all pairs of tokens (V^2 work, no sort):
# on a CPU that is several times faster than sorting for a character vocabulary. Above it they
# sort. Both give the same sets (a test checks).
PAIRWISE_MAX_V = 512


# --------------------------------------------------------------------------------------------
# Argument checks (only on concrete values: traced settings are checked where they enter)
# --------------------------------------------------------------------------------------------
def _concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)


def _check_logits(logits, name="logits"):
    logits = jnp.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {logits.shape}")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"{name} must be floating point, got {logits.dtype}")
    return logits


def _check_number(name, value, *, low=None, high=None, low_open=False, integer=False):
    if value is None or not _concrete(value):
        return
    v = np.asarray(value)
    if v.ndim != 0:
        raise ValueError(f"{name} must be a scalar, got shape {v.shape}")
    if integer and not (np.issubdtype(v.dtype, np.integer) and not isinstance(value, bool)):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    v = float(v)
    if np.isnan(v):
        raise ValueError(f"{name} must be a number, got NaN")
    if low is not None and (v <= low if low_open else v < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"{name} must be <= {high}, got {value!r}")


# --------------------------------------------------------------------------------------------
# The processors
# --------------------------------------------------------------------------------------------
def apply_temperature(logits, temperature):
    r"""$z / \tau$ for $\tau > 0$: $\tau < 1$ sharpens the distribution, $\tau > 1$ flattens it.

    $\tau = 0$ is not a distribution but its limit, greedy decoding: use :func:`sample_token`
    (or ``generate(..., temperature=0)``), which takes the $\arg\max$ instead.
    """
    logits = _check_logits(logits)
    if _concrete(temperature) and temperature is not None and float(temperature) == 0.0:
        raise ValueError("temperature must be > 0 to scale logits; temperature=0 is greedy "
                         "decoding: use sample_token or generate(..., temperature=0)")
    _check_number("temperature", temperature, low=0.0, low_open=True)
    return logits / temperature


def top_k_mask(logits, k):
    r"""Boolean mask (..., V) of the tokens top-k keeps: $z_i \ge z_{(k)}$, the $k$-th largest.

    Ties at the $k$-th value are all kept. ``k >= V`` keeps everything; ``k`` may be traced.
    """
    logits = _check_logits(logits)
    _check_number("k", k, low=1, integer=True)
    V = logits.shape[-1]
    if V <= PAIRWISE_MAX_V:  # equivalently: fewer than k logits are strictly larger
        above = jnp.sum(logits[..., None, :] > logits[..., :, None], axis=-1)
        return above < k
    desc = jnp.sort(logits, axis=-1, descending=True)
    kth = jnp.take(desc, jnp.clip(jnp.asarray(k) - 1, 0, V - 1), axis=-1)[..., None]
    return logits >= kth


def top_k_filter(logits, k):
    """Top-k: the logits of the tokens outside :func:`top_k_mask` set to $-\\infty$."""
    return jnp.where(top_k_mask(logits, k), logits, NEG_INF)


def top_p_mask(probs, p):
    r"""Boolean mask (..., V) of the nucleus: the smallest most-likely set with mass $\ge p$.

    Sort by probability, descending, ties broken by the lower token id; token $j$ of that order is
    kept iff the mass strictly before it, $\sum_{i<j} p_{(i)}$, is $< p$. So the token whose
    probability makes the total reach (or cross) $p$ is kept, the most likely token is always
    kept, and $p \ge 1$ keeps every token. ``p`` in $(0, 1]$, may be traced.
    """
    probs = _check_logits(probs, "probs")
    _check_number("p", p, low=0.0, low_open=True, high=1.0)
    V = probs.shape[-1]
    if V <= PAIRWISE_MAX_V:  # the mass before token i, without sorting: j precedes i when
        pj, pi = probs[..., None, :], probs[..., :, None]  # p_j > p_i, or equal with j < i
        ids = jnp.arange(V)
        precedes = (pj > pi) | ((pj == pi) & (ids[None, :] < ids[:, None]))
        before = jnp.sum(jnp.where(precedes, pj, 0.0), axis=-1)
        return (before < p) | (jnp.asarray(p) >= 1.0)
    order = jnp.argsort(probs, axis=-1, descending=True, stable=True)
    sorted_p = jnp.take_along_axis(probs, order, axis=-1)
    csum = jnp.cumsum(sorted_p, axis=-1)
    before = jnp.concatenate([jnp.zeros_like(csum[..., :1]), csum[..., :-1]], axis=-1)
    keep_sorted = (before < p) | (jnp.asarray(p) >= 1.0)
    inverse = jnp.argsort(order, axis=-1)
    return jnp.take_along_axis(keep_sorted, inverse, axis=-1)


def top_p_filter(logits, p):
    """Top-p on logits: the tokens outside the nucleus of ``softmax(logits)`` set to $-\\infty$."""
    logits = _check_logits(logits)
    return jnp.where(top_p_mask(jax.nn.softmax(logits, axis=-1), p), logits, NEG_INF)


def min_p_mask(probs, min_p):
    r"""Boolean mask (..., V) of the tokens min-p keeps: $p_i \ge p_{\min} \max_j p_j$.

    Tokens strictly below the scaled threshold go; one exactly on it stays. The most likely
    token always stays. ``min_p`` in $[0, 1]$ ($0$ keeps everything), may be traced.
    """
    probs = _check_logits(probs, "probs")
    _check_number("min_p", min_p, low=0.0, high=1.0)
    return probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)


def min_p_filter(logits, min_p):
    r"""Min-p on logits, computed in log space: keep $z_i - \max_j z_j \ge \ln p_{\min}$."""
    logits = _check_logits(logits)
    _check_number("min_p", min_p, low=0.0, high=1.0)
    log_min_p = jnp.log(jnp.asarray(min_p, logits.dtype))
    keep = logits - jnp.max(logits, axis=-1, keepdims=True) >= log_min_p
    return jnp.where(keep, logits, NEG_INF)


def token_presence(history, vocab_size: int, valid=None):
    """Which tokens occur in ``history`` (int[..., L]): bool[..., V]; ``valid`` masks positions."""
    history = jnp.asarray(history)
    if history.ndim < 1 or not jnp.issubdtype(history.dtype, jnp.integer):
        raise ValueError(f"history must be an integer array (..., L), got {history.dtype}"
                         f"{list(history.shape)}")
    hits = jax.nn.one_hot(history, vocab_size, dtype=jnp.bool_)  # (..., L, V)
    if valid is not None:
        hits = hits & jnp.asarray(valid, bool)[..., None]
    return jnp.any(hits, axis=-2)


def apply_repetition_penalty(logits, presence, penalty):
    r"""$z_i / \theta$ if $z_i > 0$, $z_i \theta$ otherwise, for the tokens with ``presence``."""
    logits = _check_logits(logits)
    _check_number("penalty", penalty, low=0.0, low_open=True)
    penalised = jnp.where(logits > 0, logits / penalty, logits * penalty)
    return jnp.where(presence, penalised, logits)


def repetition_penalty(logits, history, penalty):
    r"""The CTRL repetition penalty (Keskar et al. 2019).

    ``logits`` (..., V), ``history`` int (..., L) the tokens so far, ``penalty`` $\theta > 0$
    ($\theta > 1$ discourages repeats, $1$ does nothing). Every distinct token of the history is
    penalised once, however often it occurs: its logit is divided by $\theta$ when positive and
    multiplied by $\theta$ when negative (so the penalty always lowers it, for $\theta > 1$).
    """
    logits = _check_logits(logits)
    return apply_repetition_penalty(logits, token_presence(history, logits.shape[-1]), penalty)


class Settings(NamedTuple):
    """Decoding settings as arrays (traced: changing a value does not recompile)."""

    temperature: jax.Array  # float32, 0 = greedy
    top_k: jax.Array  # int32, TOP_K_OFF = off
    top_p: jax.Array  # float32, 1 = off
    min_p: jax.Array  # float32, 0 = off
    penalty: jax.Array  # float32, 1 = off


TOP_K_OFF = 2**31 - 1


def _settings(temperature, top_k, top_p, min_p, repetition_penalty) -> Settings:
    if temperature is None:
        raise ValueError("temperature must be a number >= 0 (0 is greedy), got None")
    _check_number("temperature", temperature, low=0.0)
    _check_number("top_k", top_k, low=1, integer=True)
    _check_number("top_p", top_p, low=0.0, low_open=True, high=1.0)
    _check_number("min_p", min_p, low=0.0, high=1.0)
    _check_number("repetition_penalty", repetition_penalty, low=0.0, low_open=True)
    return Settings(
        temperature=jnp.asarray(temperature, jnp.float32),
        top_k=jnp.asarray(TOP_K_OFF if top_k is None else top_k, jnp.int32),
        top_p=jnp.asarray(1.0 if top_p is None else top_p, jnp.float32),
        min_p=jnp.asarray(0.0 if min_p is None else min_p, jnp.float32),
        penalty=jnp.asarray(1.0 if repetition_penalty is None else repetition_penalty,
                            jnp.float32),
    )


def make_settings(temperature=1.0, top_k=None, top_p=None, min_p=None,
                  repetition_penalty=None) -> Settings:
    """The settings :func:`generate` uses, checked and as arrays; other decoders (speculative
    decoding, chapter 12) take them from here so that they check and default alike."""
    return _settings(temperature, top_k, top_p, min_p, repetition_penalty)


def _process(logits, presence, s: Settings):
    """Every processor, in order; disabled ones are the identity (so one compile serves all)."""
    z = apply_repetition_penalty(logits, presence, s.penalty)
    z = z / jnp.where(s.temperature > 0, s.temperature, 1.0)
    z = jnp.where(top_k_mask(z, s.top_k), z, NEG_INF)
    z = jnp.where(top_p_mask(jax.nn.softmax(z, axis=-1), s.top_p), z, NEG_INF)
    return min_p_filter(z, s.min_p)


def process_logits(logits, *, history=None, temperature=1.0, top_k=None, top_p=None, min_p=None,
                   repetition_penalty=None):
    """All processors as :func:`generate` applies them, on logits (..., V). ``temperature=0`` is
    treated as 1 here (greedy keeps only the arg max: see :func:`filtered_probs`)."""
    logits = _check_logits(logits)
    s = _settings(temperature, top_k, top_p, min_p, repetition_penalty)
    presence = (jnp.zeros(logits.shape, bool) if history is None
                else token_presence(history, logits.shape[-1]))
    return _process(logits, presence, s)


def filtered_probs(logits, **settings):
    """The distribution the next token is actually drawn from, (..., V), after every processor.

    With ``temperature=0`` it is the one-hot of the (first) arg max.
    """
    z = process_logits(logits, **settings)
    if settings.get("temperature", 1.0) == 0:
        return jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1])
    return jax.nn.softmax(z, axis=-1)


def sample_token(key, logits, temperature=1.0):
    r"""One token per row of ``logits`` (B, V): $\arg\max$ if $\tau = 0$, else a draw from
    $\mathrm{softmax}(z / \tau)$. ``temperature`` may be traced."""
    _check_number("temperature", temperature, low=0.0)
    t = jnp.asarray(temperature, jnp.float32)
    drawn = jax.random.categorical(key, logits / jnp.where(t > 0, t, 1.0), axis=-1)
    return jnp.where(t > 0, drawn, jnp.argmax(logits, axis=-1)).astype(jnp.int32)


# --------------------------------------------------------------------------------------------
# The decoding interface, and generation
# --------------------------------------------------------------------------------------------
@runtime_checkable
class Decoder(Protocol):
    """What every model that generates token by token offers (see the module docstring)."""

    def init_state(self, batch_size: int, max_len: int): ...

    def prefill(self, state, prompt): ...

    def step(self, state, tokens): ...


def check_decoder(model) -> None:
    """Raise a ``TypeError`` naming what ``model`` lacks to be a :class:`Decoder`."""
    from flax import nnx

    missing = [m for m in ("init_state", "prefill", "step") if not callable(getattr(model, m, None))]
    if missing:
        raise TypeError(f"model must implement the decoding interface (init_state, prefill, "
                        f"step); {type(model).__name__} lacks {', '.join(missing)}")
    if not isinstance(model, nnx.Module):
        raise TypeError(f"model must be a flax.nnx.Module, got {type(model).__name__}")


def prefill_by_steps(model, state, prompt):
    """A :meth:`Decoder.prefill` for models that read a prompt one token at a time: ``model.step``
    scanned over ``prompt`` (B, P). Returns the logits after the last prompt token and the state."""

    def body(carry, tokens):
        state, _ = carry
        logits, state = model.step(state, tokens)
        return (state, logits), None

    logits0, _ = jax.eval_shape(model.step, state, prompt[:, 0])
    init = (state, jnp.zeros(logits0.shape, logits0.dtype))
    (state, logits), _ = jax.lax.scan(body, init, prompt.T)
    return logits, state


def take_rows(state, rows):
    """Rows ``rows`` of a decoding state: every leaf with a batch axis (ndim >= 1) is gathered on
    axis 0, scalars (a shared position counter) are kept. Beam search uses this unless the model
    defines ``reorder_state(state, rows)``."""
    return jax.tree.map(lambda x: jnp.take(x, rows, axis=0) if jnp.ndim(x) else x, state)


def _reorder(model, state, rows):
    fn = getattr(model, "reorder_state", None)
    return fn(state, rows) if callable(fn) else take_rows(state, rows)


def _decode_step(model, settings, carry, key):
    """Draw one token from the processed logits, feed it back: the body of the decoding loop."""
    state, logits, presence = carry
    z = _process(logits, presence, settings)  # already divided by the temperature
    tokens = sample_token(key, z, (settings.temperature > 0).astype(jnp.float32))  # 0: greedy
    presence = presence | jax.nn.one_hot(tokens, logits.shape[-1], dtype=jnp.bool_)
    logits, state = model.step(state, tokens)
    return (state, logits.astype(jnp.float32), presence), tokens


def _start(model, state, prompt):
    logits, state = model.prefill(state, prompt)
    presence = token_presence(prompt, logits.shape[-1])
    return state, logits.astype(jnp.float32), presence


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens"))
def _generate(graphdef, num_tokens, params, state, prompt, key, settings):
    from flax import nnx

    model = nnx.merge(graphdef, params)
    carry = _start(model, state, prompt)
    keys = jax.random.split(key, num_tokens)
    _, tokens = jax.lax.scan(functools.partial(_decode_step, model, settings), carry, keys)
    return tokens.T


def _check_prompt(prompt, num_tokens):
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[1] < 1 or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an integer array (batch, length >= 1), got "
                         f"{prompt.dtype}{list(prompt.shape)}")
    if not isinstance(num_tokens, int | np.integer) or isinstance(num_tokens, bool) \
            or num_tokens < 1:
        raise ValueError(f"num_tokens must be an integer >= 1, got {num_tokens!r}")
    return prompt.astype(jnp.int32), int(num_tokens)


def _prepare(model, prompt, num_tokens, max_len, rows=None):
    """Check the arguments; split the model into (graphdef, params); make its empty state."""
    from flax import nnx

    check_decoder(model)
    prompt, num_tokens = _check_prompt(prompt, num_tokens)
    need = prompt.shape[1] + num_tokens
    if max_len is None:
        max_len = need
    elif isinstance(max_len, bool) or not isinstance(max_len, int | np.integer) or max_len < need:
        raise ValueError(f"max_len must be an integer >= prompt length + num_tokens = {need}, "
                         f"got {max_len!r}")
    graphdef, params = nnx.split(model)
    state = model.init_state(prompt.shape[0] if rows is None else rows, int(max_len))
    return graphdef, params, state, prompt, num_tokens


def generate(model, prompt, num_tokens: int, key, *, temperature=1.0, top_k=None, top_p=None,
             min_p=None, repetition_penalty=None, max_len: int | None = None):
    r"""Generate ``num_tokens`` tokens after ``prompt`` (int32[B, P]): returns int32[B, num_tokens].

    ``model`` implements the decoding interface (:class:`Decoder`). Its state starts as
    ``model.init_state(B, max_len)`` (``max_len`` defaults to ``P + num_tokens``), the prompt is
    read by ``model.prefill``, then one compiled ``lax.scan`` repeats: process the logits
    (repetition penalty over the prompt and everything generated, temperature, top-k, top-p,
    min-p), draw $x_t \sim \mathrm{softmax}(\tilde z_t)$ (the arg max when ``temperature=0``),
    feed $x_t$ to ``model.step``. ``None`` switches a processor off.

    The model's parameters are arguments of the compiled loop, not constants baked into it, and
    the settings are traced: a retrained model of the same structure, or new settings, never
    recompile. A new prompt shape or ``num_tokens`` does.
    """
    graphdef, params, state, prompt, num_tokens = _prepare(model, prompt, num_tokens, max_len)
    s = _settings(temperature, top_k, top_p, min_p, repetition_penalty)
    return _generate(graphdef, num_tokens, params, state, prompt, key, s)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _jit_start(graphdef, params, state, prompt):
    from flax import nnx

    return _start(nnx.merge(graphdef, params), state, prompt)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _jit_decode_step(graphdef, params, settings, carry, key):
    from flax import nnx

    return _decode_step(nnx.merge(graphdef, params), settings, carry, key)


def generate_python_loop(model, prompt, num_tokens: int, key, *, temperature=1.0, top_k=None,
                         top_p=None, min_p=None, repetition_penalty=None,
                         max_len: int | None = None):
    """:func:`generate` with the same compiled step called from a Python loop, once per token.

    The same computation and the same keys, so the same tokens: it exists to measure what the
    compiled loop saves (one dispatch per token from Python).
    """
    graphdef, params, state, prompt, num_tokens = _prepare(model, prompt, num_tokens, max_len)
    s = _settings(temperature, top_k, top_p, min_p, repetition_penalty)
    carry = _jit_start(graphdef, params, state, prompt)
    keys = jax.random.split(key, num_tokens)
    out = []
    for t in range(num_tokens):
        carry, tokens = _jit_decode_step(graphdef, params, s, carry, keys[t])
        out.append(tokens)
    return jnp.stack(out, axis=1)


# --------------------------------------------------------------------------------------------
# Beam search
# --------------------------------------------------------------------------------------------
def length_penalty_factor(length, alpha):
    r"""GNMT's length normaliser (Wu et al. 2016): $\mathrm{lp}(L) = ((5 + L) / 6)^\alpha$.

    A finished hypothesis is ranked by $\ln p(y) / \mathrm{lp}(|y|)$; $\alpha = 0$ ranks by
    $\ln p(y)$ alone, which favours short outputs; larger $\alpha$ favours longer ones.
    """
    return ((5.0 + jnp.asarray(length, jnp.float32)) / 6.0) ** alpha


def beam_step(beam_log_probs, token_log_probs, width: int):
    r"""One beam-search step: the ``width`` best one-token extensions of all beams together.

    ``beam_log_probs`` (W,) the score $s_b = \ln p(y^{(b)})$ of each beam, ``token_log_probs``
    (W, V) $\ln p(v \mid y^{(b)})$. Every candidate $(b, v)$ scores $s_b + \ln p(v \mid y^{(b)})$;
    return the ``width`` best (scores descending, ties to the lower flat index $bV + v$), as
    ``(scores float (width,), parents int32 (width,), tokens int32 (width,))``.
    """
    beam_log_probs = jnp.asarray(beam_log_probs)
    token_log_probs = jnp.asarray(token_log_probs)
    if token_log_probs.ndim != 2 or beam_log_probs.shape != token_log_probs.shape[:1]:
        raise ValueError(f"beam_log_probs must be (W,) and token_log_probs (W, V), got "
                         f"{beam_log_probs.shape} and {token_log_probs.shape}")
    W, V = token_log_probs.shape
    if not isinstance(width, int | np.integer) or not 1 <= width <= W * V:
        raise ValueError(f"width must be an integer in [1, W*V={W * V}], got {width!r}")
    total = (beam_log_probs[:, None] + token_log_probs).reshape(-1)
    scores, flat = jax.lax.top_k(total, int(width))
    return scores, (flat // V).astype(jnp.int32), (flat % V).astype(jnp.int32)


class BeamResult(NamedTuple):
    """The beams, best first: ``tokens`` int32[B, W, N] (after an EOS: EOS repeated),
    ``scores`` the ranking score $\\ln p / \\mathrm{lp}(L)$, ``log_probs`` $\\ln p$ and
    ``lengths`` $L$ (tokens up to and including the EOS), each [B, W]."""

    tokens: jax.Array
    scores: jax.Array
    log_probs: jax.Array
    lengths: jax.Array


@functools.partial(jax.jit, static_argnames=("graphdef", "num_tokens", "width", "eos_id"))
def _beam_search(graphdef, num_tokens, width, eos_id, params, state, prompt, alpha):
    from flax import nnx

    model = nnx.merge(graphdef, params)
    B, W, N = prompt.shape[0], width, num_tokens
    logits, state = model.prefill(state, prompt)
    V = logits.shape[-1]
    if eos_id is not None and eos_id >= V:
        raise ValueError(f"eos_id must be a token id in [0, {V}), got {eos_id}")
    tile = jnp.repeat(jnp.arange(B), W)  # beam (b, w) starts as a copy of sequence b
    state, logits = _reorder(model, state, tile), logits[tile]
    logp = jnp.full((B, W), NEG_INF).at[:, 0].set(0.0)  # one live beam: no duplicates
    carry = (state, logits, logp, jnp.zeros((B, W), jnp.int32), jnp.zeros((B, W), bool),
             jnp.zeros((B, W, N), jnp.int32))

    def body(carry, t):
        state, logits, logp, lengths, done, seqs = carry
        lp_tok = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1).reshape(B, W, V)
        if eos_id is not None:  # a finished beam can only repeat EOS, at no cost
            pad = jnp.where(jnp.arange(V) == eos_id, 0.0, NEG_INF)
            lp_tok = jnp.where(done[..., None], pad, lp_tok)
        total = logp[..., None] + lp_tok  # (B, W, V)
        new_len = lengths + (~done).astype(jnp.int32)
        rank = total / length_penalty_factor(new_len, alpha)[..., None]
        _, flat = jax.lax.top_k(rank.reshape(B, W * V), W)
        parent, tok = flat // V, (flat % V).astype(jnp.int32)
        logp = jnp.take_along_axis(total.reshape(B, W * V), flat, axis=1)
        lengths = jnp.take_along_axis(new_len, parent, axis=1)
        done = jnp.take_along_axis(done, parent, axis=1)
        if eos_id is not None:
            done = done | (tok == eos_id)
        seqs = jnp.take_along_axis(seqs, parent[..., None], axis=1).at[:, :, t].set(tok)
        rows = (jnp.arange(B)[:, None] * W + parent).reshape(-1)
        logits, state = model.step(_reorder(model, state, rows), tok.reshape(-1))
        return (state, logits, logp, lengths, done, seqs), None

    (_, _, logp, lengths, _, seqs), _ = jax.lax.scan(body, carry, jnp.arange(N))
    scores = logp / length_penalty_factor(lengths, alpha)
    scores, order = jax.lax.top_k(scores, W)
    take = lambda x: jnp.take_along_axis(x, order, axis=1)
    return BeamResult(jnp.take_along_axis(seqs, order[..., None], axis=1), scores, take(logp),
                      take(lengths))


def beam_search(model, prompt, num_tokens: int, beam_width: int, *, length_penalty: float = 0.0,
                eos_id: int | None = None, max_len: int | None = None) -> BeamResult:
    r"""Beam search: keep the ``beam_width`` best partial sequences, one compiled ``lax.scan``.

    ``model`` implements the decoding interface (:class:`Decoder`). At each step every live beam
    is extended by every token, each candidate is ranked by $\ln p(y) / \mathrm{lp}(|y|)$
    (:func:`length_penalty_factor`, ``length_penalty`` is $\alpha$), and the best
    ``beam_width`` survive. A beam that emits ``eos_id`` is finished: it keeps its score and
    length and competes with the live ones to the end. Returns a :class:`BeamResult`, best first.
    Width 1 is greedy decoding; a width of at least $V^N$ keeps every sequence, so its best is the
    exact most likely one.

    Surviving beams take their parents' states: :func:`take_rows` gathers every batched leaf of
    the state, unless the model defines ``reorder_state(state, rows)``.
    """
    if not isinstance(beam_width, int | np.integer) or isinstance(beam_width, bool) \
            or beam_width < 1:
        raise ValueError(f"beam_width must be an integer >= 1, got {beam_width!r}")
    _check_number("length_penalty", length_penalty)
    if eos_id is not None and not (isinstance(eos_id, int | np.integer) and eos_id >= 0):
        raise ValueError(f"eos_id must be a token id >= 0 or None, got {eos_id!r}")
    graphdef, params, state, prompt, num_tokens = _prepare(model, prompt, num_tokens, max_len)
    return _beam_search(graphdef, num_tokens, int(beam_width),
                        None if eos_id is None else int(eos_id), params, state, prompt,
                        jnp.asarray(length_penalty, jnp.float32))


# --------------------------------------------------------------------------------------------
# Measuring samples
# --------------------------------------------------------------------------------------------
def sequence_log_prob(logits_fn: Callable, prompt, tokens):
    r"""$\ln p(x_{1:N} \mid \text{prompt})$ per sequence and per token, under ``logits_fn``.

    ``logits_fn(ids int32[B, T]) -> logits [B, T, V]`` is a teacher-forced model (position $t$
    predicts $t+1$). Returns ``(total [B], per_token [B, N])``.
    """
    prompt = jnp.asarray(prompt, jnp.int32)
    tokens = jnp.asarray(tokens, jnp.int32)
    ids = jnp.concatenate([prompt, tokens], axis=1)
    logits = logits_fn(ids[:, :-1])[:, prompt.shape[1] - 1:]
    lp = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), tokens[..., None], -1)[..., 0]
    return lp.sum(-1), lp


def distinct_ngrams(tokens, n: int, *, pooled: bool = False) -> float:
    """distinct-n of samples ``tokens`` (batch, length), two ways.

    Per row (the default): the distinct n-grams of each row over its ``length - n + 1`` n-grams,
    averaged over the rows; it measures how much each sample repeats itself (1.0: no n-gram
    repeats; a text stuck in a loop scores near 0). ``pooled=True`` is the corpus-level measure
    of Li et al. (2016): the distinct n-grams of all rows together (an n-gram never spans two
    rows) over the total number of tokens, so samples that repeat each other count too.
    """
    tokens = np.asarray(tokens)
    if tokens.ndim != 2:
        raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}")
    if not isinstance(n, int | np.integer) or not 1 <= n <= tokens.shape[1]:
        raise ValueError(f"n must be an integer in [1, {tokens.shape[1]}], got {n!r}")
    grams = [{g.tobytes() for g in np.lib.stride_tricks.sliding_window_view(row, n)}
             for row in tokens]
    if pooled:
        return len(set().union(*grams)) / tokens.size
    return float(np.mean([len(g) / (tokens.shape[1] - n + 1) for g in grams]))


def repetition_period(tokens, min_repeats: int = 2, min_length: int = 16) -> int | None:
    """The shortest period $q$ with which the end of ``tokens`` (1-D) repeats, or ``None``.

    The last ``max(min_repeats * q, min_length)`` tokens must be periodic with period ``q``
    (``min_length`` keeps a doubled letter from counting as a loop): greedy decoding falls into
    such loops and never leaves them.
    """
    x = np.asarray(tokens).reshape(-1)
    if not isinstance(min_repeats, int | np.integer) or min_repeats < 2:
        raise ValueError(f"min_repeats must be an integer >= 2, got {min_repeats!r}")
    for q in range(1, len(x) // min_repeats + 1):
        span = max(min_repeats * q, min_length)
        if span > len(x):
            continue
        tail = x[len(x) - span:]
        if np.array_equal(tail[q:], tail[:-q]):
            return q
    return None
