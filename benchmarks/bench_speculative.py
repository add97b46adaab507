"""Speculative decoding against target-only cached decoding: the speed ratio, in one run.

    python benchmarks/bench_speculative.py [--tokens 512] [--gamma 5] [--temperature 1.0]

Two GPTs are trained briefly on the course's text corpus (the Python reference): a target
(default dim 384, 6 layers, about 11M parameters) and a draft (dim 64, 1 layer, about 60K), so a
target step costs many draft steps. Then ``--tokens`` tokens are sampled after the same prompt,
with the same settings (temperature, top-k), two ways:

* target only: ``arcourse.decoding.generate``, one cached step per token, one compiled scan;
* speculative: ``arcourse.speculative.speculative_generate``, the draft proposes ``gamma``
  tokens, the target scores them in one ``extend`` pass, one compiled while loop.

Compilation is excluded (a warm-up call each); the time is the best of ``--repeats`` calls. Both
outputs are samples from the same distribution (the tests check it), not the same tokens. The last
line is ``speed-up ratio: <target-only time / speculative time>x``.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
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


def train(model, steps, lr, batch, length, train_tokens, desc):
    def sample(key):
        return data.random_windows(key, train_tokens, batch, length)

    fit(model, make_optimizer(lr, steps, warmup_steps=steps // 10, weight_decay=0.01), lm_loss,
        sample, steps=steps, seed=0, desc=desc, verbose=False)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--gamma", type=int, default=5)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=None)
    ap.add_argument("--target-dim", type=int, default=384)
    ap.add_argument("--target-layers", type=int, default=6)
    ap.add_argument("--target-steps", type=int, default=150)
    ap.add_argument("--draft-steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)

    corpus = data.char_corpus()
    V = corpus.vocab_size
    train_tokens = jnp.asarray(corpus.train)
    context = 64 + a.tokens + a.gamma + 2
    tcfg = gpt.GPTConfig(vocab_size=V, context=context, dim=a.target_dim,
                         num_layers=a.target_layers, num_heads=a.target_dim // 64)
    dcfg = gpt.GPTConfig(vocab_size=V, context=context, dim=64, num_layers=1, num_heads=2)
    target, draft = gpt.GPT(tcfg, rngs=nnx.Rngs(0)), gpt.GPT(dcfg, rngs=nnx.Rngs(1))
    t0 = time.perf_counter()
    train(target, a.target_steps, 2e-3, 8, 64, train_tokens, "target")
    train(draft, a.draft_steps, 1e-2, 32, 64, train_tokens, "draft")
    print(f"target {gpt.num_params(target):,} parameters, draft {gpt.num_params(draft):,}; "
          f"trained in {time.perf_counter() - t0:.0f} s")

    prompt = jnp.asarray(corpus.encode("The import statement")[None], jnp.int32)
    key = jax.random.key(7)
    settings = dict(temperature=a.temperature, top_k=a.top_k)
    t_target, _ = best_time(lambda: generate(target, prompt, a.tokens, key, **settings),
                            a.repeats)
    t_draft, _ = best_time(lambda: generate(draft, prompt, a.tokens, key, **settings), a.repeats)
    t_spec, res = best_time(lambda: speculative_generate(target, draft, prompt, a.tokens, key,
                                                         gamma=a.gamma, **settings), a.repeats)
    alpha = res.alpha
    print(f"settings: {settings}, gamma={a.gamma}, {a.tokens} tokens")
    print(f"target only   : {t_target * 1e3:8.1f} ms  ({t_target / a.tokens * 1e3:.3f} ms/token)")
    print(f"draft only    : {t_draft * 1e3:8.1f} ms  ({t_draft / a.tokens * 1e3:.3f} ms/token)")
    print(f"speculative   : {t_spec * 1e3:8.1f} ms  ({t_spec / a.tokens * 1e3:.3f} ms/token)")
    print(f"acceptance rate alpha = {alpha:.3f}; tokens per target call: measured "
          f"{res.tokens_per_call:.2f}, predicted {float(expected_tokens_per_call(alpha, a.gamma)):.2f}"
          f"; target calls: {int(res.calls)}")
    print(f"sample: {corpus.decode(res.tokens)[:120]!r}")
    print(f"speed-up ratio: {t_target / t_spec:.2f}x")


if __name__ == "__main__":
    main()
