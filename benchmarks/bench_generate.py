"""Generation speed: one compiled ``lax.scan`` against the same step called from Python.

Both decode a ``CharRNN`` through the course's decoding interface with the same compiled
per-token function (sample with every processor switched on, then one ``model.step``) and the
same keys, so they produce the same tokens (checked here, and by
``tests/test_decoding.py``). The compiled loop pays one dispatch for the whole text; the Python
loop pays one per token. Run: ``python benchmarks/bench_generate.py`` (prints the ratio).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse import decoding as dec
from arcourse.rnn import CharRNN


def timed(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=94)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)

    model = CharRNN(args.vocab, args.hidden, cell="lstm", rngs=nnx.Rngs(0))
    prompt = jnp.asarray(np.random.default_rng(0).integers(0, args.vocab, (args.batch, 16)),
                         jnp.int32)
    settings = dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.02, repetition_penalty=1.1)
    key = jax.random.key(0)
    scan = lambda: dec.generate(model, prompt, args.tokens, key, **settings)
    loop = lambda: dec.generate_python_loop(model, prompt, args.tokens, key, **settings)
    scan(), loop()  # compile both (not timed)
    t_scan, a = timed(scan, args.repeats)
    t_loop, b = timed(loop, args.repeats)
    same = bool(np.array_equal(np.asarray(a), np.asarray(b)))
    try:
        load = "load average " + " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "load average unknown"
    print(f"JAX {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} CPUs, {load}")
    print(f"LSTM hidden {args.hidden}, vocab {args.vocab}, batch {args.batch}, "
          f"{args.tokens} tokens, median of {args.repeats}")
    print(f"compiled lax.scan : {t_scan * 1e3:8.1f} ms  ({t_scan / args.tokens * 1e6:.0f} us/token)")
    print(f"python loop       : {t_loop * 1e3:8.1f} ms  ({t_loop / args.tokens * 1e6:.0f} us/token)")
    print(f"identical tokens  : {same}")
    print(f"speed-up ratio    : {t_loop / t_scan:.1f}x")
    if not same:
        raise SystemExit("the two loops produced different tokens")
    return t_loop / t_scan


if __name__ == "__main__":
    main()
