"""Speculative decoding against target-only cached decoding: the speed ratio, in one run.

    python benchmarks/bench_speculative.py [--tokens 512] [--gamma 5] [--temperature 1.0]
                                           [--draft-training distill|data] [--gammas 3 5 7]

Two GPTs on the course's text corpus (the Python reference):

* the **target** (default dim 384, 6 layers, about 11M parameters), trained 150 steps on the
  corpus (about a minute on 2 cores): a target step costs over 100 draft steps;
* the **draft** (dim 64, 1 layer, about 60K parameters), *distilled from the target*
  (DistillSpec, Zhou et al. 2024): the target samples 96 sequences of 256 tokens with the
  benchmark's settings (on-policy data: the contexts speculative decoding will meet), and the
  draft is trained for 400 steps to match the target's full next-token distributions on them
  (forward KL, soft labels at the sampling temperature). Speculative decoding keeps a token with
  probability ``min(1, p/q)``, and the acceptance rate is alpha = 1 - E[TV(p, q)]: a
  draft trained on the corpus learns the corpus, not the target, which (briefly trained) is
  far from it. Measured on this machine, the same draft reaches alpha 0.57 trained on the corpus
  (``--draft-training data``, 400 steps: 2.24 tokens per target call, 1.47x) and 0.75-0.77
  distilled (gamma 3-7: 2.7-3.7 tokens per call, about 3x). Distillation changes
  only the draft, so the output is still exactly the target's distribution.

Then ``--tokens`` tokens are sampled after the same prompt, with the same settings (temperature,
top-k), two ways:

* target only: ``arcourse.decoding.generate``, one cached step per token, one compiled scan;
* speculative: ``arcourse.speculative.speculative_generate``, the draft proposes ``gamma``
  tokens, the target scores them in one ``extend`` pass, one compiled while loop.

``gamma = 5`` by default: a round costs one target ``extend`` over gamma + 1 tokens plus gamma + 1
draft steps (under 1% of a target step each), measured at 0.9-1.2 target steps for gamma 3-7,
so a larger gamma costs little while alpha^gamma still adds tokens; ``--gammas 3 5 7`` measures
several (measured 2.96x, 3.32x, 3.05x in one run; the last line is always for ``--gamma``).

Compilation is excluded (a warm-up call each); the time is the best of ``--repeats`` calls. Both
outputs are samples from the same distribution (the tests check it), not the same tokens. The last
line is ``speed-up ratio: <target-only time / speculative time>x`` (3.02x and 3.32x in two runs).
About 2.5 minutes on 2 cores (135 s measured).
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse import data, gpt
from arcourse.decoding import generate
from arcourse.losses import lm_loss, make_optimizer
from arcourse.speculative import expected_tokens_per_call, speculative_generate
from arcourse.train import fit


def best_time(fn, repeats: int):
    out = jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times), out


def train(model, steps, lr, loss, sample, desc):
    fit(model, make_optimizer(lr, steps, warmup_steps=steps // 10, weight_decay=0.01), loss,
        sample, steps=steps, seed=0, desc=desc, verbose=False)


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def distillation_data(target, corpus, num_seqs, length, settings, seed=0):
    """``num_seqs`` sequences sampled from the target (after 16-token prompts from the corpus)
    and the target's next-token distributions along them, at the sampling temperature."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(corpus.train) - 16, num_seqs)
    prompts = jnp.asarray(np.stack([corpus.train[s:s + 16] for s in starts]), jnp.int32)
    seqs = jnp.concatenate([prompts, generate(target, prompts, length, jax.random.key(seed + 1),
                                              **settings)], axis=1)
    temperature = settings["temperature"] or 1.0
    probs = jnp.concatenate([jax.nn.softmax(_logits(target, seqs[i:i + 16]) / temperature, -1)
                             for i in range(0, num_seqs, 16)])
    return seqs, probs


def distill_loss(model, batch):
    """Forward KL to the target, up to a constant: -sum_x p(x) ln q(x), mean over positions."""
    tokens, p = batch
    return -jnp.mean(jnp.sum(p * jax.nn.log_softmax(model(tokens), -1), -1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--gammas", type=int, nargs="*", default=[],
                    help="more gammas to time (printed before the result for --gamma)")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--target-dim", type=int, default=384)
    ap.add_argument("--target-layers", type=int, default=6)
    ap.add_argument("--target-steps", type=int, default=150)
    ap.add_argument("--draft-dim", type=int, default=64)
    ap.add_argument("--draft-layers", type=int, default=1)
    ap.add_argument("--draft-steps", type=int, default=400)
    ap.add_argument("--draft-training", choices=("distill", "data"), default="distill")
    ap.add_argument("--distill-seqs", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)
    if a.tokens < 256:
        ap.error("--tokens must be at least 256")

    corpus = data.char_corpus()
    V = corpus.vocab_size
    train_tokens = jnp.asarray(corpus.train)
    gammas = sorted(set(a.gammas) | {a.gamma})
    context = 64 + a.tokens + max(gammas) + 2
    tcfg = gpt.GPTConfig(vocab_size=V, context=context, dim=a.target_dim,
                         num_layers=a.target_layers, num_heads=a.target_dim // 64)
    dcfg = gpt.GPTConfig(vocab_size=V, context=context, dim=a.draft_dim,
                         num_layers=a.draft_layers, num_heads=max(1, a.draft_dim // 32))
    target, draft = gpt.GPT(tcfg, rngs=nnx.Rngs(0)), gpt.GPT(dcfg, rngs=nnx.Rngs(1))
    settings = dict(temperature=a.temperature, top_k=a.top_k)

    t0 = time.perf_counter()
    train(target, a.target_steps, 2e-3, lm_loss,
          lambda key: data.random_windows(key, train_tokens, 8, 64), "target")
    t1 = time.perf_counter()
    if a.draft_training == "distill":
        seqs, probs = distillation_data(target, corpus, a.distill_seqs, 256, settings)

        def sample(key):
            kr, ks = jax.random.split(key)
            rows = jax.random.randint(kr, (32, 1), 0, seqs.shape[0])
            idx = jax.random.randint(ks, (32, 1), 0, seqs.shape[1] - 64) + jnp.arange(64)
            return seqs[rows, idx], probs[rows, idx]

        train(draft, a.draft_steps, 1e-2, distill_loss, sample, "draft (distilled)")
    else:
        train(draft, a.draft_steps, 1e-2, lm_loss,
              lambda key: data.random_windows(key, train_tokens, 32, 64), "draft (data)")
    t2 = time.perf_counter()
    print(f"target {gpt.num_params(target):,} parameters ({a.target_steps} steps, {t1 - t0:.0f} s); "
          f"draft {gpt.num_params(draft):,} ({a.draft_training}, {a.draft_steps} steps, "
          f"{t2 - t1:.0f} s)")

    prompt = jnp.asarray(corpus.encode("The import statement")[None], jnp.int32)
    key = jax.random.key(7)
    t_target, _ = best_time(lambda: generate(target, prompt, a.tokens, key, **settings),
                            a.repeats)
    t_draft, _ = best_time(lambda: generate(draft, prompt, a.tokens, key, **settings), a.repeats)
    ms = 1e3 / a.tokens
    print(f"settings: {settings}, {a.tokens} tokens, same prompt and settings on both paths")
    print(f"target only   : {t_target * 1e3:8.1f} ms  ({t_target * ms:.3f} ms/token)")
    print(f"draft only    : {t_draft * 1e3:8.1f} ms  ({t_draft * ms:.3f} ms/token)")
    for g in [x for x in gammas if x != a.gamma] + [a.gamma]:  # --gamma last
        t_spec, res = best_time(lambda g=g: speculative_generate(
            target, draft, prompt, a.tokens, key, gamma=g, **settings), a.repeats)
        calls = int(res.calls)
        print(f"gamma={g}: speculative {t_spec * 1e3:8.1f} ms  ({t_spec * ms:.3f} ms/token); "
              f"alpha = {res.alpha:.3f}; tokens per target call: measured "
              f"{res.tokens_per_call:.2f}, predicted "
              f"{float(expected_tokens_per_call(res.alpha, g)):.2f}; {calls} target calls, "
              f"{t_spec / calls * 1e3:.2f} ms per round = {t_spec / calls / (t_target / a.tokens):.2f} "
              f"target steps; speed-up {t_target / t_spec:.2f}x")
    print(f"sample: {corpus.decode(res.tokens)[:120]!r}")
    print(f"speed-up ratio: {t_target / t_spec:.2f}x")


if __name__ == "__main__":
    main()
