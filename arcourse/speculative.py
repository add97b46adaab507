r"""Speculative decoding and multi-token prediction (chapter 12): faster, and provably the same.

**Speculative sampling** (Leviathan et al. 2023; Chen et al. 2023). A cheap *draft* model $q$
proposes $\gamma$ tokens $d_1..d_\gamma$, one after the other. The expensive *target* $p$ scores
all of them in one forward pass (:meth:`arcourse.gpt.GPT.extend` over its KV cache), which gives
$p_1..p_{\gamma+1}$, its distributions after each prefix. Then, left to right, draft token $d_i$
is accepted with probability

$$a_i = \min\!\Big(1, \frac{p_i(d_i)}{q_i(d_i)}\Big).$$

At the first rejection, the token at that position is drawn from the *residual*

$$r(x) = \frac{\max(0,\ p_i(x) - q_i(x))}{\sum_y \max(0,\ p_i(y) - q_i(y))},$$

and the round ends; if all $\gamma$ are accepted, a bonus token is drawn from $p_{\gamma+1}$.
Every emitted token is then distributed exactly as under the target alone:
$P(x) = q(x)\min(1, p(x)/q(x)) + (1 - \sum_y \min(p(y), q(y)))\, r(x) = \min(p, q) + (p - q)^+ = p(x)$.
With $\beta_i = \sum_x \min(p_i(x), q_i(x))$ the probability of accepting at position $i$, and
$\alpha = E[\beta]$ treated as constant, a round (one target call) emits on average

$$E[\text{tokens per target call}] = \frac{1 - \alpha^{\gamma+1}}{1 - \alpha}.$$

The logit processors of chapter 04 (temperature, top-k, top-p, min-p) are applied to $p$ and $q$
alike: the output is then distributed as the target *with those settings*. ``temperature=0``
turns $p$ and $q$ into one-hots of their arg max, and the same rule becomes greedy verification:
the output is the target's greedy output, token for token.

**Rolling back.** Both models keep a :class:`arcourse.gpt.KVCache`; a rejected suffix is undone
by resetting the cache's ``length`` (the stale keys and values past it are masked out, then
overwritten).

**Multi-token prediction** (Gloeckle et al. 2024; Stern et al. 2018; Medusa, Cai et al. 2024):
:class:`MTPModel` adds heads to a GPT trunk, head $k$ predicting token $t+k$ from the trunk's
hidden state at $t$, through the trunk's own final norm and unembedding. Head 1 is the trunk's
next-token head. :func:`mtp_generate` decodes *self-speculatively*: heads $2..n$ draft, the
next-token head verifies with the same accept/residual rule, so the output is still exactly the
model's.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse._checks import check_int
from arcourse.decoding import Settings, make_settings, process_logits
from arcourse.gpt import GPT, KVCache
from arcourse.layers import RMSNorm, SwiGLU

__all__ = [
    "accept_probability",
    "residual_distribution",
    "expected_tokens_per_call",
    "speculative_verify",
    "wrong_verify_inverted",
    "wrong_verify_resample_p",
    "greedy_verify",
    "SpecResult",
    "speculative_generate",
    "speculative_samples",
    "speculative_samples_by_rule",
    "sequence_distribution",
    "MTPModel",
    "mtp_windows",
    "mtp_head_loss",
    "mtp_accuracy",
    "mtp_generate",
    "mtp_samples",
]


# --------------------------------------------------------------------------------------------
# The rule
# --------------------------------------------------------------------------------------------
def accept_probability(p_token, q_token):
    r"""$a = \min(1,\ p(d) / q(d))$, elementwise: the chance of keeping a draft token $d$.

    ``p_token``, ``q_token``: the target's and the draft's probabilities of the drafted tokens,
    any (equal) shape. A token the draft gives probability 0 (it cannot have drawn it) gets 1.
    """
    p_token, q_token = jnp.asarray(p_token), jnp.asarray(q_token)
    if p_token.shape != q_token.shape:
        raise ValueError(f"p_token and q_token must have the same shape, got {p_token.shape} "
                         f"and {q_token.shape}")
    safe_q = jnp.where(q_token > 0, q_token, 1.0)
    return jnp.where(q_token > 0, jnp.minimum(1.0, p_token / safe_q), 1.0)


def residual_distribution(p, q):
    r"""$r = \max(0, p - q) / \sum_x \max(0, p(x) - q(x))$ over the last axis, (..., V).

    What is drawn after a rejection. Where $p = q$ (nothing left: a rejection is then
    impossible) it returns $p$, so the result is always a distribution.
    """
    p, q = jnp.asarray(p), jnp.asarray(q)
    if p.shape != q.shape or p.ndim < 1:
        raise ValueError(f"p and q must be distributions of the same shape (..., V), got "
                         f"{p.shape} and {q.shape}")
    diff = jnp.maximum(p - q, 0.0)
    total = jnp.sum(diff, axis=-1, keepdims=True)
    return jnp.where(total > 0, diff / jnp.where(total > 0, total, 1.0), p)


def expected_tokens_per_call(alpha, gamma):
    r"""$(1 - \alpha^{\gamma+1}) / (1 - \alpha)$: tokens emitted per target call, on average,
    when each of $\gamma$ draft tokens is accepted with probability $\alpha$ (independently),
    counting the token the target adds itself. $\alpha = 1$ gives $\gamma + 1$."""
    alpha = jnp.asarray(alpha, jnp.float32)
    gamma = jnp.asarray(gamma, jnp.float32)
    near_one = jnp.abs(1.0 - alpha) < 1e-6
    safe = jnp.where(near_one, 0.5, alpha)
    return jnp.where(near_one, gamma + 1.0, (1.0 - safe ** (gamma + 1.0)) / (1.0 - safe))


def _take(dist, tokens):
    return jnp.take_along_axis(dist, tokens[:, None], axis=-1)[:, 0]


def speculative_verify(u, p, q, draft_tokens):
    r"""One round of verification, for one sequence.

    ``u`` (gamma,) uniforms in [0, 1); ``p`` (gamma+1, V) the target's distributions after the
    pending token and after each draft token; ``q`` (gamma, V) the draft's distributions that
    ``draft_tokens`` (gamma,) were drawn from. Draft token $i$ is accepted iff
    $u_i < \min(1, p_i(d_i)/q_i(d_i))$; ``n`` is the number accepted before the first rejection.
    Returns ``(n int32, dist (V,))``: the distribution the next token is drawn from, the
    residual of $p_n$ and $q_n$ if $n < \gamma$, else $p_\gamma$ (the bonus token).
    """
    gamma = draft_tokens.shape[0]
    ok = u < accept_probability(_take(p[:gamma], draft_tokens), _take(q, draft_tokens))
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    resid = residual_distribution(p[jnp.minimum(n, gamma)], q[jnp.minimum(n, gamma - 1)])
    return n.astype(jnp.int32), jnp.where(n < gamma, resid, p[gamma])


def wrong_verify_inverted(u, p, q, draft_tokens):
    """A deliberately WRONG rule: the ratio upside down, accept with $\\min(1, q/p)$, then the
    right residual. Tokens the draft under-proposes are kept too often. The chapter and the tests
    show that its output is not distributed as the target's."""
    gamma = draft_tokens.shape[0]
    ok = u < accept_probability(_take(q, draft_tokens), _take(p[:gamma], draft_tokens))
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    resid = residual_distribution(p[jnp.minimum(n, gamma)], q[jnp.minimum(n, gamma - 1)])
    return n.astype(jnp.int32), jnp.where(n < gamma, resid, p[gamma])


def wrong_verify_resample_p(u, p, q, draft_tokens):
    """A deliberately WRONG rule: the right acceptance test, but after a rejection the token is
    drawn from $p$ instead of the residual. Tokens the draft over-proposes come out too often."""
    gamma = draft_tokens.shape[0]
    ok = u < accept_probability(_take(p[:gamma], draft_tokens), _take(q, draft_tokens))
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32)))
    return n.astype(jnp.int32), p[jnp.minimum(n, gamma)]


def greedy_verify(target_logits, draft_tokens):
    r"""Greedy verification: ``target_logits`` (gamma+1, V), ``draft_tokens`` (gamma,) int.

    Accept draft tokens while each equals the target's arg max at its position; ``n`` is the
    number accepted. The next token is the target's arg max at position ``n`` (the correction
    at the first mismatch, or the bonus token when all match). Returns ``(n, next_token)``,
    both int32 scalars. The output is exactly what greedy decoding with the target produces.
    """
    target_logits, draft_tokens = jnp.asarray(target_logits), jnp.asarray(draft_tokens)
    gamma = draft_tokens.shape[0]
    best = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # (gamma+1,)
    n = jnp.sum(jnp.cumprod((best[:gamma] == draft_tokens).astype(jnp.int32)))
    return n.astype(jnp.int32), best[n]


# --------------------------------------------------------------------------------------------
# The decoding loop
# --------------------------------------------------------------------------------------------
def _settings(temperature, top_k, top_p, min_p) -> Settings:
    """The chapter-04 settings, checked and as arrays (traced: new values never recompile)."""
    return make_settings(temperature, top_k, top_p, min_p)


def _probs(logits, s: Settings):
    """The distribution a token is drawn from after the chapter-04 processors: (..., V)."""
    z = process_logits(logits.astype(jnp.float32), temperature=s.temperature, top_k=s.top_k,
                       top_p=s.top_p, min_p=s.min_p)
    greedy = jax.nn.one_hot(jnp.argmax(z, axis=-1), z.shape[-1], dtype=jnp.float32)
    return jnp.where(s.temperature > 0, jax.nn.softmax(z, axis=-1), greedy)


def _draw(key, probs):
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)


class SpecResult(NamedTuple):
    """``tokens`` int32 (..., N); per sequence: ``calls`` the target (or trunk) forward passes
    after the prompt, ``accepted`` draft tokens kept, ``tested`` draft tokens put to the test
    (all up to and including the first rejection), ``beta`` the sum over tested positions of
    $\\sum_x \\min(p(x), q(x))$, each acceptance's probability. The measured
    $\\alpha$ is ``accepted / tested``; tokens per call is ``N / calls`` (roughly: the last round
    may overshoot ``N``)."""

    tokens: jax.Array
    calls: jax.Array
    accepted: jax.Array
    tested: jax.Array
    beta: jax.Array

    @property
    def alpha(self) -> float:
        return float(np.sum(self.accepted) / max(1, np.sum(self.tested)))

    @property
    def mean_beta(self) -> float:
        return float(np.sum(self.beta) / max(1, np.sum(self.tested)))

    @property
    def tokens_per_call(self) -> float:
        return float(np.sum(self.accepted + self.calls) / max(1, np.sum(self.calls)))


def _roll_back(cache: KVCache, length) -> KVCache:
    return cache._replace(length=jnp.asarray(length, jnp.int32))


def _emit(out, n_out, drafts, n, token):
    """Write d_1..d_n and then ``token`` into ``out`` at ``n_out``."""
    g = drafts.shape[0]
    chunk = jnp.where(jnp.arange(g + 1) < n, jnp.concatenate([drafts, jnp.zeros(1, jnp.int32)]),
                      token)
    return jax.lax.dynamic_update_slice_in_dim(out, chunk, n_out, axis=0)


def _spec_run(tgraph, dgraph, num_tokens, gamma, verify_fn, tparams, dparams, prompt, key, s,
              rule=None):
    """One sequence of speculative sampling; prompt (1, P). The whole loop is a while_loop.
    With ``rule`` (a traced int32), ``verify_fn`` is a tuple of rules and ``rule`` picks one."""
    target, draft = nnx.merge(tgraph, tparams), nnx.merge(dgraph, dparams)
    P = prompt.shape[1]
    max_len = P + num_tokens + gamma + 1
    tcache, dcache = target.init_state(1, max_len), draft.init_state(1, max_len)
    if P > 1:  # both caches hold the prompt but its last token, which is pending
        _, tcache = target.prefill(tcache, prompt[:, :-1])
        _, dcache = draft.prefill(dcache, prompt[:, :-1])
    zero = jnp.zeros((), jnp.int32)
    out = jnp.zeros(num_tokens + gamma + 1, jnp.int32)
    carry = (tcache, dcache, prompt[0, -1], out, zero, key, zero, zero, zero,
             jnp.zeros((), jnp.float32))

    def body(c):
        tcache, dcache, last, out, n_out, key, calls, accepted, tested, beta = c
        key, kd, ku, kn = jax.random.split(key, 4)

        def draft_step(dc, k):  # feed last, d_1, ..., d_gamma: gamma+1 steps, the last one only
            cache, tok = dc      # writes d_gamma into the draft cache
            logits, cache = draft.step(cache, tok[None])
            q = _probs(logits[0], s)
            nxt = _draw(k, q)
            return (cache, nxt), (nxt, q)

        (dcache, _), (drafts, qs) = jax.lax.scan(draft_step, (dcache, last),
                                                 jax.random.split(kd, gamma + 1))
        drafts, qs = drafts[:gamma], qs[:gamma]
        length = tcache.length
        logits, tcache = target.extend(tcache, jnp.concatenate([last[None], drafts])[None])
        p = _probs(logits[0], s)  # (gamma+1, V)
        u = jax.random.uniform(ku, (gamma,))
        if rule is None:
            n, dist = verify_fn(u, p, qs, drafts)
        else:
            n, dist = jax.lax.switch(rule, verify_fn, u, p, qs, drafts)
        token = _draw(kn, dist)
        n_test = jnp.minimum(n + 1, gamma)
        b = jnp.sum(jnp.minimum(p[:gamma], qs), axis=-1)
        beta = beta + jnp.sum(jnp.where(jnp.arange(gamma) < n_test, b, 0.0))
        return (_roll_back(tcache, length + 1 + n), _roll_back(dcache, length + 1 + n), token,
                _emit(out, n_out, drafts, n, token), n_out + n + 1, key, calls + 1,
                accepted + n, tested + n_test, beta)

    c = jax.lax.while_loop(lambda c: c[4] < num_tokens, body, carry)
    return SpecResult(c[3][:num_tokens], c[6], c[7], c[8], c[9])


@functools.partial(jax.jit, static_argnames=("tgraph", "dgraph", "num_tokens", "gamma",
                                             "verify_fn"))
def _spec_jit(tgraph, dgraph, num_tokens, gamma, verify_fn, tparams, dparams, prompt, keys, s):
    run = functools.partial(_spec_run, tgraph, dgraph, num_tokens, gamma, verify_fn, tparams,
                            dparams, prompt)
    if keys.ndim == 0:
        return run(keys, s)
    return jax.vmap(run, in_axes=(0, None))(keys, s)


@functools.partial(jax.jit, static_argnames=("tgraph", "dgraph", "num_tokens", "gamma",
                                             "verify_fns"))
def _spec_rules_jit(tgraph, dgraph, num_tokens, gamma, verify_fns, tparams, dparams, prompt,
                    keys, s, rule):
    """:func:`_spec_jit` over S keys with one of several rules, picked by the traced ``rule``:
    one compiled program serves every rule."""
    def run(key):
        return _spec_run(tgraph, dgraph, num_tokens, gamma, verify_fns, tparams, dparams, prompt,
                         key, s, rule)

    return jax.vmap(run)(keys)


def _check_args(prompt, num_tokens, models):
    for name, m in models.items():
        if not isinstance(m, GPT):
            raise TypeError(f"{name} must be an arcourse.gpt.GPT (its state is a KVCache), got "
                            f"{type(m).__name__}")
    prompt = jnp.asarray(prompt)
    if prompt.ndim != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1 \
            or not jnp.issubdtype(prompt.dtype, jnp.integer):
        raise ValueError(f"prompt must be an integer array of shape (1, P >= 1), got "
                         f"{prompt.dtype}{list(prompt.shape)}")
    return prompt.astype(jnp.int32), check_int("num_tokens", num_tokens)


def _spec_setup(target, draft, prompt, num_tokens, gamma, temperature, top_k, top_p, min_p):
    prompt, num_tokens = _check_args(prompt, num_tokens, {"target": target, "draft": draft})
    gamma = check_int("gamma", gamma)
    if target.cfg.vocab_size != draft.cfg.vocab_size:
        raise ValueError(f"target and draft must share the vocabulary, got "
                         f"{target.cfg.vocab_size} and {draft.cfg.vocab_size}")
    return prompt, num_tokens, gamma, _settings(temperature, top_k, top_p, min_p)


def _speculative(target, draft, prompt, num_tokens, keys, gamma, temperature, top_k, top_p,
                 min_p, verify_fn):
    prompt, num_tokens, gamma, s = _spec_setup(target, draft, prompt, num_tokens, gamma,
                                               temperature, top_k, top_p, min_p)
    tgraph, tparams = nnx.split(target)
    dgraph, dparams = nnx.split(draft)
    return _spec_jit(tgraph, dgraph, num_tokens, gamma, verify_fn or speculative_verify,
                     tparams, dparams, prompt, keys, s)


def speculative_generate(target: GPT, draft: GPT, prompt, num_tokens: int, key, *, gamma: int = 4,
                         temperature=1.0, top_k=None, top_p=None, min_p=None,
                         verify_fn: Callable | None = None) -> SpecResult:
    r"""Speculative sampling of ``num_tokens`` tokens after ``prompt`` (int (1, P)), batch 1.

    Each round: the draft proposes $\gamma$ tokens by ``gamma + 1`` cached steps (the last one
    stores $d_\gamma$); the target scores $[x_{\text{pending}}, d_1..d_\gamma]$ in one
    :meth:`~arcourse.gpt.GPT.extend`; ``verify_fn`` (default :func:`speculative_verify`) keeps
    $n$ drafts and gives the next token's distribution; both caches roll back to the kept
    prefix. All inside one compiled ``lax.while_loop``. ``temperature``, ``top_k``, ``top_p``,
    ``min_p`` (as in :func:`arcourse.decoding.generate`) shape $p$ and $q$ alike; ``temperature=0``
    is greedy. The tokens are distributed exactly as ``generate(target, ...)`` with the same
    settings. Returns a :class:`SpecResult`.
    """
    return _speculative(target, draft, prompt, num_tokens, jnp.asarray(key), gamma, temperature,
                        top_k, top_p, min_p, verify_fn)


def speculative_samples(target: GPT, draft: GPT, prompt, num_tokens: int, keys, *, gamma: int = 4,
                        temperature=1.0, top_k=None, top_p=None, min_p=None,
                        verify_fn: Callable | None = None) -> SpecResult:
    """:func:`speculative_generate` for each key of ``keys`` (S,): S independent sequences in
    one compiled, vmapped loop; the fields of the result gain a leading axis S."""
    keys = jnp.asarray(keys)
    if keys.ndim != 1:
        raise ValueError(f"keys must be a 1-D array of PRNG keys, got shape {keys.shape}")
    return _speculative(target, draft, prompt, num_tokens, keys, gamma, temperature, top_k, top_p,
                        min_p, verify_fn)


def speculative_samples_by_rule(target: GPT, draft: GPT, prompt, num_tokens: int, keys,
                                verify_fns, *, gamma: int = 4, temperature=1.0, top_k=None,
                                top_p=None, min_p=None) -> list[SpecResult]:
    """:func:`speculative_samples` once for each rule of ``verify_fns`` (a sequence of functions
    with the signature of :func:`speculative_verify`), every rule with the same ``keys``.

    Returns one :class:`SpecResult` per rule, each equal to what ``speculative_samples(...,
    verify_fn=rule)`` returns; the rules share ONE compiled program (the rule is picked inside
    the loop by ``lax.switch`` on a traced index), so several rules cost one compilation."""
    keys = jnp.asarray(keys)
    if keys.ndim != 1:
        raise ValueError(f"keys must be a 1-D array of PRNG keys, got shape {keys.shape}")
    verify_fns = tuple(verify_fns)
    if not verify_fns or not all(callable(f) for f in verify_fns):
        raise ValueError("verify_fns must be a non-empty sequence of verification functions")
    prompt, num_tokens, gamma, s = _spec_setup(target, draft, prompt, num_tokens, gamma,
                                               temperature, top_k, top_p, min_p)
    tgraph, tparams = nnx.split(target)
    dgraph, dparams = nnx.split(draft)
    return [_spec_rules_jit(tgraph, dgraph, num_tokens, gamma, verify_fns, tparams, dparams,
                            prompt, keys, s, np.int32(i)) for i in range(len(verify_fns))]


@nnx.jit
def _forward(model, tokens):
    """``model(tokens)``, compiled: a first eager call of a GPT compiles each of its many
    operations on its own, which takes seconds."""
    return model(tokens)


def sequence_distribution(model: GPT, prompt, num_tokens: int, *, temperature=1.0, top_k=None,
                          top_p=None, min_p=None):
    r"""The exact distribution of the next ``num_tokens`` tokens under ``model`` and the settings:
    $P(x_{1:N}) = \prod_t \tilde p(x_t \mid \text{prompt}, x_{<t})$ for every one of the $V^N$
    sequences. Returns ``(sequences int32 (V^N, N), probs (V^N,))``, sequences in lexicographic
    order (so sequence ``i`` is ``i`` written in base V). For tiny vocabularies only."""
    prompt, num_tokens = _check_args(prompt, num_tokens, {"model": model})
    V = model.cfg.vocab_size
    if V ** num_tokens > 2**20:
        raise ValueError(f"V^N = {V}^{num_tokens} sequences is too many to enumerate")
    s = _settings(temperature, top_k, top_p, min_p)
    seqs = np.stack(np.unravel_index(np.arange(V ** num_tokens), (V,) * num_tokens), -1)
    seqs = seqs.astype(np.int32)
    ids = np.concatenate([np.broadcast_to(np.asarray(prompt), (seqs.shape[0], prompt.shape[1])),
                          seqs], 1)
    return jax.device_put(seqs), _sequence_probs(model, jax.device_put(ids), jax.device_put(seqs),
                                                 s)


@nnx.jit
def _sequence_probs(model, ids, seqs, s):
    """The probability of each sequence ``seqs`` (S, N) after the prompt that starts each row of
    ``ids`` (S, P + N), in one compiled program (eagerly, each operation compiles on its own)."""
    P = ids.shape[1] - seqs.shape[1]
    probs = _probs(model(ids[:, :-1])[:, P - 1:], s)  # (S, N, V)
    return jnp.prod(jnp.take_along_axis(probs, seqs[..., None], -1)[..., 0], axis=-1)


# --------------------------------------------------------------------------------------------
# Multi-token prediction
# --------------------------------------------------------------------------------------------
class _ResidualHead(nnx.Module):
    """$h + \\mathrm{SwiGLU}(\\mathrm{RMSNorm}(h))$, its output projection zero at first, so a new
    head starts as a copy of the next-token head."""

    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs):
        self.norm = RMSNorm(dim)
        self.mlp = SwiGLU(dim, hidden, rngs=rngs)
        self.mlp.w2.kernel[...] = jnp.zeros_like(self.mlp.w2.kernel[...])

    def __call__(self, h):
        return h + self.mlp(self.norm(h))


class MTPModel(nnx.Module):
    r"""Multi-token prediction on a shared trunk: ``num_heads`` heads, head $k$ ($k = 1..n$)
    predicting token $t+k$ from the trunk's hidden state $h_t$:

    $$\mathrm{logits}_k(t) = \mathrm{Norm}(f_k(h_t))\, W_{out}, \qquad f_1 = \mathrm{id},\quad
      f_k(h) = h + \mathrm{SwiGLU}_k(\mathrm{RMSNorm}_k(h)).$$

    The trunk is a :class:`~arcourse.gpt.GPT`; its final norm and unembedding $W_{out}$ are
    shared by every head (Gloeckle et al. 2024 share the unembedding too; their heads are
    transformer layers, these are residual MLPs as in Medusa, which need no KV cache). Head 1 is
    the trunk's own next-token head, unchanged.
    """

    def __init__(self, trunk: GPT, num_heads: int, *, hidden: int | None = None, rngs: nnx.Rngs):
        if not isinstance(trunk, GPT):
            raise TypeError(f"trunk must be an arcourse.gpt.GPT, got {type(trunk).__name__}")
        num_heads = check_int("num_heads", num_heads, 2)
        hidden = trunk.cfg.hidden if hidden is None else check_int("hidden", hidden)
        self.trunk = trunk
        self.heads = nnx.List([_ResidualHead(trunk.cfg.dim, hidden, rngs=rngs)
                               for _ in range(num_heads - 1)])

    @property
    def num_heads(self) -> int:
        return len(self.heads) + 1

    def hidden(self, tokens):
        """The trunk's last hidden states: (B, T) -> (B, T, dim)."""
        h = self.trunk.embed_tokens(jnp.asarray(tokens))
        for block in self.trunk.blocks:
            h = block(h)
        return h

    def head_logits(self, h, k: int, *, freeze_shared: bool = False):
        """The logits of head ``k`` (0-based: 0 is the next-token head), (..., dim) -> (..., V).

        ``freeze_shared`` holds the shared final norm and unembedding constant (no gradient
        reaches them), so that training a head cannot change the next-token head.
        """
        if k:
            h = self.heads[k - 1](h)
        norm, head = self.trunk.norm, self.trunk.head
        if freeze_shared:
            norm, head = (nnx.merge(g, jax.tree.map(jax.lax.stop_gradient, s))
                          for g, s in (nnx.split(norm), nnx.split(head)))
        return head(norm(h))

    def all_head_logits(self, h):
        """Every head at once: (..., dim) -> (num_heads, ..., V)."""
        return jnp.stack([self.head_logits(h, k) for k in range(self.num_heads)])

    def __call__(self, tokens):
        """(B, T) -> (num_heads, B, T, V); ``[k-1, :, t]`` predicts token ``t + k``."""
        return self.all_head_logits(self.hidden(tokens))


def mtp_windows(key, tokens, batch_size: int, length: int, num_heads: int):
    """Random windows for multi-token prediction: ``(inputs (B, T), targets (n, B, T))`` with
    ``targets[k-1, b, t] = tokens[s_b + t + k]``, the token ``k`` after input ``t``."""
    return _mtp_windows(key, jnp.asarray(tokens), batch_size, length, num_heads)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _mtp_windows(key, tokens, batch_size, length, num_heads):
    """:func:`mtp_windows` as one compiled program (eagerly, each operation compiles on its own;
    inside another ``jit`` it is inlined)."""
    starts = jax.random.randint(key, (batch_size,), 0, tokens.shape[0] - length - num_heads)
    win = tokens[starts[:, None] + jnp.arange(length + num_heads)[None, :]]
    targets = jnp.stack([win[:, k:k + length] for k in range(1, num_heads + 1)])
    return win[:, :length], targets


def mtp_head_loss(model: MTPModel, batch):
    r"""The mean cross-entropy of heads $2..n$ on a frozen trunk (Medusa-1 style): the trunk's
    hidden states and the shared final norm and unembedding are held constant
    (``stop_gradient``), so only the extra heads learn and the next-token head stays the
    model's. ``batch`` from :func:`mtp_windows`."""
    from arcourse.losses import cross_entropy

    inputs, targets = batch
    h = jax.lax.stop_gradient(model.hidden(inputs))
    return jnp.mean(jnp.stack([cross_entropy(model.head_logits(h, k, freeze_shared=True), targets[k])
                               for k in range(1, model.num_heads)]))


@nnx.jit
def mtp_accuracy(model: MTPModel, inputs, targets):
    """Top-1 accuracy of each head on ``(inputs (B, T), targets (n, B, T))``: (num_heads,).
    Compiled (one program, not one compilation per operation)."""
    logits = model(inputs)
    return jnp.mean(jnp.argmax(logits, -1) == targets, axis=(1, 2))


def _mtp_run(graph, num_tokens, verify_fn, params, prompt, key, s):
    model = nnx.merge(graph, params)
    g = model.num_heads - 1  # drafts per round
    P = prompt.shape[1]
    cache = model.trunk.init_state(1, P + num_tokens + g + 1)
    h, cache = model.trunk.extend(cache, prompt, return_hidden=True)
    key, k0, kq = jax.random.split(key, 3)
    probs = _probs(model.all_head_logits(h[0, -1]), s)  # (n, V)
    first = _draw(k0, probs[0])
    qs = probs[1:]
    drafts = _draw(kq, qs)
    zero = jnp.zeros((), jnp.int32)
    out = jnp.zeros(num_tokens + g + 1, jnp.int32).at[0].set(first)
    carry = (cache, first, drafts, qs, out, jnp.ones((), jnp.int32), key, zero, zero, zero,
             jnp.zeros((), jnp.float32))

    def body(c):
        cache, last, drafts, qs, out, n_out, key, calls, accepted, tested, beta = c
        key, ku, kn, kq = jax.random.split(key, 4)
        length = cache.length
        h, cache = model.trunk.extend(cache, jnp.concatenate([last[None], drafts])[None],
                                     return_hidden=True)
        p = _probs(model.head_logits(h[0], 0), s)  # (g+1, V): the model's own next-token head
        n, dist = verify_fn(jax.random.uniform(ku, (g,)), p, qs, drafts)
        token = _draw(kn, dist)
        n_test = jnp.minimum(n + 1, g)
        b = jnp.sum(jnp.minimum(p[:g], qs), axis=-1)
        beta = beta + jnp.sum(jnp.where(jnp.arange(g) < n_test, b, 0.0))
        hn = h[0, n]  # the last kept position: its heads 2..n draft the tokens after `token`
        new_qs = _probs(jnp.stack([model.head_logits(hn, k) for k in range(1, g + 1)]), s)
        return (_roll_back(cache, length + 1 + n), token, _draw(kq, new_qs), new_qs,
                _emit(out, n_out, drafts, n, token), n_out + n + 1, key, calls + 1,
                accepted + n, tested + n_test, beta)

    c = jax.lax.while_loop(lambda c: c[5] < num_tokens, body, carry)
    return SpecResult(c[4][:num_tokens], c[7], c[8], c[9], c[10])


@functools.partial(jax.jit, static_argnames=("graph", "num_tokens", "verify_fn"))
def _mtp_jit(graph, num_tokens, verify_fn, params, prompt, keys, s):
    run = functools.partial(_mtp_run, graph, num_tokens, verify_fn, params, prompt)
    if keys.ndim == 0:
        return run(keys, s)
    return jax.vmap(run, in_axes=(0, None))(keys, s)


def _mtp(model, prompt, num_tokens, keys, temperature, top_k, top_p, min_p, verify_fn):
    if not isinstance(model, MTPModel):
        raise TypeError(f"model must be an MTPModel, got {type(model).__name__}")
    prompt, num_tokens = _check_args(prompt, num_tokens, {"model.trunk": model.trunk})
    s = _settings(temperature, top_k, top_p, min_p)
    graph, params = nnx.split(model)
    return _mtp_jit(graph, num_tokens, verify_fn or speculative_verify, params, prompt, keys, s)


def mtp_generate(model: MTPModel, prompt, num_tokens: int, key, *, temperature=1.0, top_k=None,
                 top_p=None, min_p=None, verify_fn: Callable | None = None) -> SpecResult:
    r"""Self-speculative decoding with the heads of an :class:`MTPModel`, batch 1.

    The prompt is read in one pass; at the last kept position, the next-token head gives the
    next token and heads $2..n$ propose the $n - 1$ tokens after it (drawn from their own
    distributions $q$). Each round feeds ``[next token, drafts]`` to the trunk in one pass,
    verifies the drafts against the next-token head's distributions $p$ with
    :func:`speculative_verify` (``min(1, p/q)``, residual, bonus), rolls the cache back to the
    kept prefix, and lets the heads at the last kept position draft again. One compiled
    ``lax.while_loop``, one trunk call per round, output distributed exactly as sampling from
    the next-token head alone (``temperature=0``: its greedy output).
    """
    return _mtp(model, prompt, num_tokens, jnp.asarray(key), temperature, top_k, top_p, min_p,
                verify_fn)


def mtp_samples(model: MTPModel, prompt, num_tokens: int, keys, *, temperature=1.0, top_k=None,
                top_p=None, min_p=None, verify_fn: Callable | None = None) -> SpecResult:
    """:func:`mtp_generate` for each key of ``keys`` (S,), vmapped in one compiled loop."""
    keys = jnp.asarray(keys)
    if keys.ndim != 1:
        raise ValueError(f"keys must be a 1-D array of PRNG keys, got shape {keys.shape}")
    return _mtp(model, prompt, num_tokens, keys, temperature, top_k, top_p, min_p, verify_fn)
