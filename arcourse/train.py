r"""One compact training loop for every chapter: Flax NNX + Optax, compiled once.

``fit`` splits the model and its optimiser into a static graph and a state pytree, then runs
``chunk`` optimisation steps per call inside one ``jax.lax.scan`` (sampling each batch inside the
compiled code too), so Python is visited once per chunk, not once per step, and nothing retraces.
Between chunks it evaluates, updates a progress bar and keeps the parameters with the best
validation score: models are selected on validation loss, and budgets are counted in steps.

**Every core at work.** At this course's sizes XLA runs a training step on one core. ``fit``
therefore trains data-parallel over the host's devices (``import arcourse`` gives JAX one CPU
device per core, unless the user set a count): a ``Mesh`` over the devices, each batch split
along its first axis, parameters and optimiser state replicated, gradients averaged by XLA. The
computation is the same as on one device (the same batches, the same steps; only the order of
the floating-point sums differs), so the numbers are too. A batch whose leaves do not all divide
evenly by the device count runs on one device. So does every run in quick mode (``ARCOURSE_QUICK=1``):
its few steps are over before the second core pays back the extra compilation of a partitioned
program.

**Convolutions in quick mode.** XLA's CPU backend can compute a convolution's weight gradient
inside a compiled loop with a generic loop nest instead of its convolution library (the loop body
keeps a layout, ``f01b_i01o->01bf``, the library does not take): 10 gradient steps of a 3x3,
32-channel convolution on 64 8x8 images took 300 ms in a ``lax.scan`` against 28 ms as 10 calls
of one compiled step, and 4.1 s at quick mode's unoptimised code level
(:data:`arcourse.QUICK_XLA_FLAGS`). At that level it hits whole models too: chapter 09's VQ-VAE
took 1.36 s for 10 gradient steps in a scan against 11 ms per call (at the default level its
scan was as fast as calls, so full mode is unaffected there). So in quick mode a step
whose gradient has a convolution runs as one compiled step per call, from Python, which changes
nothing but the speed (the chunk's trace is read to find out and, when it has no convolution,
compiled as it is, so the common case is traced once); full mode keeps the loop inside ``jit``.
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from arcourse._checks import check_int
from arcourse.course.config import is_quick

__all__ = ["History", "fit", "progress_bar", "data_parallel_devices", "has_convolution",
           "use_every_core"]


@dataclass
class History:
    """What a training run did: per-step training loss and the evaluations between chunks."""

    train_steps: list[int] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    eval_steps: list[int] = field(default_factory=list)
    evals: dict[str, list[float]] = field(default_factory=dict)
    best_step: int | None = None
    best_value: float | None = None
    select_on: str | None = None
    seconds: float = 0.0
    chunk_seconds: list[float] = field(default_factory=list)
    devices: int = 1

    @property
    def compile_seconds(self) -> float:
        """About how long compilation took: the first chunk's time beyond a typical later one."""
        if len(self.chunk_seconds) < 2:
            return float("nan")
        return max(0.0, self.chunk_seconds[0] - float(np.median(self.chunk_seconds[1:])))

    def last(self, metric: str) -> float:
        return self.evals[metric][-1]

    def best(self, metric: str) -> float:
        """The value of ``metric`` at the selected (best validation) step."""
        return self.evals[metric][self.eval_steps.index(self.best_step)]

    def summary(self) -> str:
        s = f"{self.train_steps[-1] if self.train_steps else 0} steps in {self.seconds:.1f} s"
        if self.best_step is not None:
            s += f"; best {self.select_on} = {self.best_value:.4f} at step {self.best_step}"
        return s

    def plot(self, ax=None, label: str = "", metric: str | None = None, scale: float = 1.0,
             smooth: int = 50):
        """Training loss (smoothed) and the validation metric against steps."""
        import matplotlib.pyplot as plt

        ax = ax or plt.gca()
        metric = metric or self.select_on
        tl = np.asarray(self.train_loss) * scale
        if len(tl):
            k = max(1, min(smooth, len(tl) // 10 or 1))
            sm = np.convolve(tl, np.ones(k) / k, mode="valid")
            line, = ax.plot(self.train_steps[k - 1 :], sm, alpha=0.5,
                            label=f"{label} train".strip())
            color = line.get_color()
        else:
            color = None
        if metric and metric in self.evals:
            ax.plot(self.eval_steps, np.asarray(self.evals[metric]) * scale, "o-", ms=3,
                    color=color, label=f"{label} {metric}".strip())
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        return ax


def progress_bar(total: int, desc: str):
    """A tqdm bar that works in JupyterLab and in a terminal.

    ``ARCOURSE_PROGRESS=off`` silences it (the book build does: a static page cannot show a
    live widget) and ``ARCOURSE_PROGRESS=text`` forces the plain text bar.
    """
    mode = os.environ.get("ARCOURSE_PROGRESS", "auto")
    if mode == "off":
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=True)
    if mode == "text":
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, mininterval=1.0)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, mininterval=0.5)


def data_parallel_devices(batch_example, devices=None) -> list:
    """The devices ``fit`` splits a batch over: ``devices`` (default: every device of JAX's
    default backend, or its first one only in quick mode), or just the first one when some leaf of
    ``batch_example`` (arrays or ``jax.ShapeDtypeStruct``) has no leading axis divisible by their
    number."""
    if isinstance(devices, bool) or not (devices is None or isinstance(devices, int | np.integer)
                                         or hasattr(devices, "__len__")):
        raise ValueError(f"devices must be None, an integer >= 1 or a list of devices, "
                         f"got {devices!r}")
    if devices is None:
        devices = jax.devices()
        if is_quick():  # a few steps: compiling for several devices costs more than they save
            devices = devices[:1]
        if devices[0].platform == "cpu":  # simulated devices beyond the cores only add overhead
            devices = devices[:_cores()]
    elif isinstance(devices, int | np.integer):
        n = check_int("devices", devices)
        if n > len(jax.devices()):
            raise ValueError(f"devices={n} but JAX has {len(jax.devices())}: {jax.devices()}")
        devices = jax.devices()[:n]
    devices = list(devices)
    if not devices:
        raise ValueError("devices must name at least one device")
    leaves = jax.tree.leaves(batch_example)
    for n in range(len(devices), 1, -1):  # the most devices that split every leaf evenly
        if all(len(x.shape) and x.shape[0] % n == 0 for x in leaves):
            return devices[:n]
    return devices[:1]


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def use_every_core(count: int | None = None) -> int | None:
    """Give JAX one CPU device per core (at most 8), so that :func:`fit` can use them all.

    Must run before JAX computes anything (``import arcourse`` calls it). It never overrides a
    choice already made: a count set with ``jax.config.update("jax_num_cpu_devices", n)`` or
    the XLA flag ``--xla_force_host_platform_device_count``, or JAX already running. The
    environment variable ``ARCOURSE_CPU_DEVICES`` sets the count (``1``: one device). Returns the
    count it set, or ``None`` when it left JAX alone.
    """
    if "xla_force_host_platform_device_count" in os.environ.get("XLA_FLAGS", ""):
        return None
    if jax.config.jax_num_cpu_devices != -1:  # -1: nobody chose yet
        return None
    if count is None:
        env = os.environ.get("ARCOURSE_CPU_DEVICES", "").strip()
        if env:
            count = check_int("ARCOURSE_CPU_DEVICES", int(env))
        else:
            count = min(_cores(), 8)
    count = check_int("count", count)
    if count <= 1:
        return None
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # JAX has already started: too late, leave it as it is
        return None
    return count


@functools.partial(jax.jit, static_argnums=(1, 2))
def _chunk_keys(key, n: int, chunk: int):
    """The next key, and a chunk's ``chunk`` step keys of which the first ``n`` are active (the
    rest repeat the last one), as one compiled program: op by op, each of these small steps would
    compile a program of its own in every ``fit`` (integer arithmetic: the keys are the same)."""
    key, sub = jax.random.split(key)
    keys = jax.random.split(sub, n)
    if n < chunk:
        keys = jnp.concatenate([keys, jnp.repeat(keys[-1:], chunk - n, axis=0)])
    return key, keys, jnp.arange(chunk) < n


def _set_mode(model, train: bool):
    fn = getattr(model, "train" if train else "eval", None)
    if callable(fn):
        fn()


def fit(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    loss_fn: Callable,
    sample_batch: Callable,
    *,
    steps: int,
    eval_fn: Callable | None = None,
    eval_every: int | None = None,
    select_on: str | None = "loss",
    seed: int = 0,
    devices=None,
    desc: str = "training",
    progress: bool = True,
    verbose: bool = True,
) -> History:
    r"""Train ``model`` in place for ``steps`` optimisation steps and return its :class:`History`.

    Args:
      model: an ``nnx.Module``; its ``nnx.Param`` leaves are trained.
      tx: an Optax transformation (schedules, clipping and all).
      loss_fn: ``loss_fn(model, batch) -> scalar``, traceable.
      sample_batch: ``sample_batch(key) -> batch``, traceable: batches are drawn inside ``jit``.
      steps: the budget, in optimisation steps.
      eval_fn: ``eval_fn(model) -> {name: scalar}``, traceable, run in eval mode between chunks.
      eval_every: steps per compiled chunk (and between evaluations); default ``steps // 10``.
      select_on: the ``eval_fn`` metric to minimise; the model ends with the parameters of the
        best evaluation (early stopping on validation loss). ``None`` keeps the final parameters.
      seed: the seed of the batch sampling.
      devices: the devices to train data-parallel on: ``None`` (default) every device of the
        default backend (on a CPU, at most one per core: chapter 10's eight simulated devices
        share two cores), an integer for the first ``n``, or a list; see
        :func:`data_parallel_devices`.
    """
    steps = check_int("steps", steps)
    chunk = max(1, steps // 10) if eval_every is None else check_int("eval_every", eval_every)
    if eval_fn is None:
        select_on = None

    _set_mode(model, train=False)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    eval_graph, _ = nnx.split((model, optimizer))
    _set_mode(model, train=True)
    train_graph, state = nnx.split((model, optimizer))

    devs = data_parallel_devices(jax.eval_shape(sample_batch, jax.random.key(0)), devices)
    if len(devs) > 1:
        mesh = jax.sharding.Mesh(np.asarray(devs), ("data",))
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
        state = jax.device_put(state, replicated)
        shard = lambda batch: jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, split),
                                           batch)
        chunk_out = (replicated, replicated)
    else:
        shard, chunk_out = (lambda batch: batch), None

    def train_step(state, key):
        m, opt = nnx.merge(train_graph, state)
        loss, grads = nnx.value_and_grad(loss_fn)(m, shard(sample_batch(key)))
        opt.update(m, grads)
        # a scalar float32 (as the inactive branch below), so that the step is traced only once
        return nnx.split((m, opt))[1], jnp.asarray(loss, jnp.float32).reshape(())

    def one_step(state, key_and_active):
        # Every chunk has the same length, so the loop compiles once: a shorter last chunk is
        # padded with inactive steps, which leave the state as it is.
        key, active = key_and_active
        return jax.lax.cond(active, train_step, lambda s, _: (s, jnp.zeros((), jnp.float32)),
                            state, key)

    @functools.partial(jax.jit, out_shardings=chunk_out)
    def run_chunk(state, keys, active):
        return jax.lax.scan(one_step, state, (keys, active))

    def chunk_runner(state, keys, active):
        """The compiled chunk. In quick mode its trace is read first and, without a
        convolution, compiled as it is; a step with a convolution runs one compiled call per
        step instead, its step traced on its own (see the module's docstring)."""
        if not is_quick():
            return run_chunk
        traced = run_chunk.trace(state, keys, active)
        if not _jaxpr_has_convolution(traced.jaxpr.jaxpr):
            return traced.lower().compile()
        run_step = jax.jit(train_step, out_shardings=chunk_out)

        def step_by_step(state, keys, active):
            losses = []
            for key, is_active in zip(keys, np.asarray(active)):
                if is_active:
                    state, loss = run_step(state, key)
                    losses.append(loss)
            return state, jnp.stack(losses)

        return step_by_step

    @jax.jit
    def evaluate(state):
        m, _ = nnx.merge(eval_graph, state)
        return {k: jnp.asarray(v, jnp.float32) for k, v in eval_fn(m).items()}

    hist = History(select_on=select_on, devices=len(devs))
    best_state = None
    key = jax.random.key(seed)
    start = time.perf_counter()
    bar = progress_bar(steps, desc) if progress else None
    done, runner = 0, None
    while done < steps:
        chunk_start = time.perf_counter()
        n = min(chunk, steps - done)
        key, keys, active = _chunk_keys(key, n, chunk)
        if runner is None:
            runner = chunk_runner(state, keys, active)
        state, losses = runner(state, keys, active)
        losses = np.asarray(losses, dtype=np.float64)[:n]
        hist.train_steps.extend(range(done + 1, done + n + 1))
        hist.train_loss.extend(losses.tolist())
        done += n
        postfix = {"loss": f"{losses.mean():.4f}"}
        if not np.all(np.isfinite(losses)):
            if bar is not None:
                bar.close()
            raise FloatingPointError(f"training loss became non-finite by step {done}: "
                                     "lower the learning rate or clip the gradients")
        if eval_fn is not None:
            metrics = {k: float(v) for k, v in evaluate(state).items()}
            hist.eval_steps.append(done)
            for k, v in metrics.items():
                hist.evals.setdefault(k, []).append(v)
            postfix.update({k: f"{v:.4f}" for k, v in metrics.items()})
            if select_on is not None:
                if select_on not in metrics:
                    raise KeyError(f"select_on={select_on!r} is not a metric of eval_fn: "
                                   f"{sorted(metrics)}")
                v = metrics[select_on]
                if hist.best_value is None or v < hist.best_value or math.isnan(hist.best_value):
                    hist.best_value, hist.best_step, best_state = v, done, state
        hist.chunk_seconds.append(time.perf_counter() - chunk_start)
        if bar is not None:
            bar.update(n)
            bar.set_postfix(postfix, refresh=False)
    if bar is not None:
        bar.close()
    hist.seconds = time.perf_counter() - start
    final = best_state if best_state is not None else state
    if len(devs) > 1:  # back on one device, as the model came in
        final = jax.device_put(final, devs[0])
    nnx.update((model, optimizer), final)
    _set_mode(model, train=False)
    if verbose:
        print(f"{desc}: {hist.summary()}")
    _report(hist, desc)
    return hist


def has_convolution(fn: Callable, *args) -> bool:
    """Whether ``fn(*args)`` computes a convolution anywhere (nested calls, loops, branches and
    custom derivatives included), read off its jaxpr; ``fn`` is traced, not run."""
    return _jaxpr_has_convolution(jax.make_jaxpr(fn)(*args).jaxpr)


def _jaxpr_has_convolution(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            return True
        for value in eqn.params.values():
            for sub in value if isinstance(value, tuple | list) else (value,):
                inner = getattr(sub, "jaxpr", sub)  # a ClosedJaxpr holds its Jaxpr
                if hasattr(inner, "eqns") and _jaxpr_has_convolution(inner):
                    return True
    return False


def _report(hist: History, desc: str) -> None:
    """For ``make verify``: how long this run trained and about how much of it was compiling."""
    path = os.environ.get("ARCOURSE_VERIFY_REPORT")
    if path:
        import json

        compile_s = hist.compile_seconds
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"kind": "fit", "name": desc, "seconds": hist.seconds,
                                "compile_seconds": None if math.isnan(compile_s) else compile_s,
                                "devices": hist.devices}) + "\n")
