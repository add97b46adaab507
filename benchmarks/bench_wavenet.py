"""Fast against naive WaveNet generation: the speed ratio, measured in one run.

    python benchmarks/bench_wavenet.py [--samples 2048] [--residual 32] [--skip 64]

The model is chapter 07's WaveNet: dilations 1, 2, ..., 512 (receptive field R = 1024), kernel 2,
gated residual layers, a softmax over 256 mu-law levels, conditioned on a note. Both decoders run
inside the same compiled loop and differ only in their step:

* naive (``NaiveWaveNet``): every new sample reruns the whole stack over the last R samples,
  O(R * layers) per sample;
* fast (``WaveNet``'s own decoding interface, Paine et al. 2016): every layer keeps a queue of its
  last d inputs, so a new sample costs O(layers).

Both are sampled by ``arcourse.wavenet.sample`` (plain ancestral sampling, one compiled
``lax.scan``; the same draws as ``decoding.generate`` with its logit processors off, without
their cost of about V^2 = 65,536 comparisons per sample, which would otherwise dominate the fast
step).

Each is compiled and warmed up by one call, then timed on one call with the same key: the samples
must be identical. The last line is the ratio of the two times.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from arcourse import wavenet as wn


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=2048)
    ap.add_argument("--residual", type=int, default=32)
    ap.add_argument("--skip", type=int, default=64)
    ap.add_argument("--layers", type=int, default=10, help="dilations 1, 2, ..., 2^(layers-1)")
    a = ap.parse_args(argv)

    cfg = wn.WaveNetConfig(dilations=tuple(2**i for i in range(a.layers)), residual=a.residual,
                           skip=a.skip, num_classes=8)
    model = wn.WaveNet(cfg, rngs=nnx.Rngs(0))
    notes = jnp.array([4])
    prompt = jnp.full((1, 1), 128, jnp.int32)
    key = jax.random.key(1)
    decoders = {"naive": wn.conditioned(wn.NaiveWaveNet(model), notes),
                "fast": wn.conditioned(model, notes)}
    print(f"JAX {jax.__version__} on {jax.default_backend().upper()}; WaveNet with "
          f"{len(cfg.dilations)} layers, R = {cfg.receptive_field}, {a.residual} residual / "
          f"{a.skip} skip channels, {wn.num_params(model):,} parameters; {a.samples} samples")
    times, out = {}, {}
    for name, dec in decoders.items():
        t = time.perf_counter()
        jax.block_until_ready(wn.sample(key, dec, prompt, a.samples))  # compile and warm up
        warm = time.perf_counter() - t
        t = time.perf_counter()
        out[name] = np.asarray(jax.block_until_ready(wn.sample(key, dec, prompt, a.samples)))
        times[name] = time.perf_counter() - t
        print(f"{name:>6}: {times[name]:8.3f} s  ({1e3 * times[name] / a.samples:7.3f} ms/sample; "
              f"first call with compilation {warm:.1f} s)")
    same = bool(np.array_equal(out["naive"], out["fast"]))
    print(f"samples identical: {same}")
    if not same:
        raise SystemExit("fast and naive generation disagree")
    print(f"speed-up ratio: {times['naive'] / times['fast']:.1f}x")
    return times


if __name__ == "__main__":
    main()
