"""Cached against uncached generation with a GPT: the speed ratio, measured in one run.

    python benchmarks/bench_kv_cache.py [--tokens 512] [--prompt 16] [--repeats 3]

Both decoders run inside the same compiled loop (``arcourse.decoding.generate``); they differ
only in their ``step``: the GPT itself (its state is a KV cache) and ``gpt.UncachedGPT``. The
uncached one reruns the whole forward pass over a fixed window of ``prompt + tokens`` positions
at every step (the causal mask hides the not-yet-written positions), the cached one computes the
new token's queries, keys and values and attends over the stored keys and values. Compilation is
excluded (one warm-up call each); the time is the best of ``--repeats`` calls. Greedy decoding,
so both must also produce the same tokens.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from arcourse.decoding import generate
from arcourse.gpt import GPT, GPTConfig, UncachedGPT


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn())  # compile and warm up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args(argv)

    cfg = GPTConfig(vocab_size=96, context=a.prompt + a.tokens, dim=a.dim, num_layers=a.layers,
                    num_heads=a.heads, num_kv_heads=a.kv_heads)
    model = GPT(cfg, rngs=nnx.Rngs(0))
    prompt = jax.random.randint(jax.random.key(0), (a.batch, a.prompt), 0, cfg.vocab_size)
    max_len = a.prompt + a.tokens
    key = jax.random.key(1)
    out = {}

    def run(decoder):
        return lambda: generate(decoder, prompt, a.tokens, key, temperature=0.0, max_len=max_len)

    fns = {"cached": run(model), "uncached": run(UncachedGPT(model))}
    times = {name: best_time(fn, a.repeats) for name, fn in fns.items()}
    for name, fn in fns.items():
        out[name] = np.asarray(fn())
    agree = float(np.mean(out["cached"] == out["uncached"]))
    print(f"JAX {jax.__version__} on {jax.default_backend().upper()}; GPT dim={a.dim} "
          f"layers={a.layers} heads={a.heads}/{a.kv_heads}; batch {a.batch}, prompt {a.prompt}, "
          f"{a.tokens} new tokens (greedy)")
    for name, t in times.items():
        print(f"{name:>9}: {t:8.3f} s  ({1e3 * t / a.tokens:7.3f} ms/token)")
    print(f"tokens identical: {agree:.1%}")
    print(f"speed ratio cached / uncached: {times['uncached'] / times['cached']:.1f}x")
    return times


if __name__ == "__main__":
    main()
