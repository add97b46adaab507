"""Training on every core: ms per step of chapter 06's GPT, one device against all host devices.

At chapter 06's "GPT-2 block" size (dim 64, 2 layers, 4 heads, T = 64, batch 32, AdamW with
global-norm clipping), ``arcourse.train.fit`` runs the same steps twice in this process: once on
one device, once data-parallel over every host CPU device (``import arcourse`` made one per
core). Both run the same compiled ``lax.scan`` chunks on the same batches; the time per step is
taken from the chunks after the first (which includes compilation). The two runs end at the same
loss to float tolerance. Run: ``python benchmarks/bench_train_step.py`` (last line: the ratio).
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import arcourse  # noqa: F401  (gives JAX one CPU device per core before it starts)
from arcourse import data, gpt, losses
from arcourse.train import fit


def run(devices: int, steps: int, chunk: int):
    corpus = data.char_corpus()
    tokens = jnp.asarray(corpus.train)
    cfg = gpt.GPTConfig(corpus.vocab_size, context=64, dim=64, num_layers=2, num_heads=4,
                        position="learned", norm="layer", mlp="gelu")
    model = gpt.GPT(cfg, rngs=nnx.Rngs(0))

    def batch(key):
        return data.random_windows(key, tokens, 32, 64)

    tx = losses.make_optimizer(3e-3, steps, warmup_steps=steps // 10, weight_decay=0.01)
    hist = fit(model, tx, losses.lm_loss, batch, steps=steps, eval_every=chunk, seed=0,
               devices=devices, progress=False, verbose=False)
    per_step = 1000 * float(np.median(hist.chunk_seconds[1:])) / chunk
    return per_step, float(np.mean(hist.train_loss[-chunk:])), hist.devices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--chunk", type=int, default=100)
    a = p.parse_args()
    n = len(jax.devices())
    print(f"JAX {jax.__version__}, {n} {jax.default_backend()} device(s)")
    one, loss_one, _ = run(1, a.steps, a.chunk)
    print(f"one device          : {one:6.2f} ms per step (last-chunk loss {loss_one:.4f})")
    every, loss_every, used = run(n, a.steps, a.chunk)
    print(f"{used} devices (batch split): {every:6.2f} ms per step (last-chunk loss {loss_every:.4f})")
    print(f"same training to float tolerance: {abs(loss_one - loss_every) < 1e-3}")
    print(f"speed-up ratio: {one / every:.2f}x")


if __name__ == "__main__":
    main()
