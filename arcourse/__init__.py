"""arcourse: tested reference implementations of autoregressive models, one module per topic.

The modules a learner reads are at the top level, each named for what it teaches and each
docstring naming its chapter. The course platform (grading, modes, authoring) is in
:mod:`arcourse.course`.

Importing arcourse gives JAX one CPU device per core (unless you chose a count yourself, or JAX
has already started) so that training runs data-parallel on every core: see
:func:`arcourse.train.use_every_core`. In quick mode it also has XLA compile faster (see
:func:`_quick_mode_compiles_fast`).
"""


# XLA flags for quick mode and the jaxlib releases they were checked on. XLA aborts the process
# on a flag it does not know, so they are passed only to those releases: on any other, quick mode
# compiles at XLA's defaults (slower, never broken). tests/test_train.py fails when the pinned
# jaxlib is not listed, so that whoever upgrades it re-checks the flags.
QUICK_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
QUICK_XLA_FLAGS_CHECKED_ON = ("0.10.",)


def _quick_mode_compiles_fast() -> None:
    """In quick mode (``ARCOURSE_QUICK=1``), have XLA compile for speed of compilation.

    A quick-mode run is mostly compilation: hundreds of programs (each model's training chunk,
    each initialiser and grader shape run eagerly) that then run for a few steps. Without LLVM's
    optimisations and with XLA's classic (not MLIR) fusion emitters, a chapter's programs compile
    three to four times as fast (chapter 11, measured on 2 cores: 441 programs in 16 s instead of
    58 s) and run somewhat slower, the right trade for a run that is over in seconds. Either flag
    alone is worse: the classic emitters at full optimisation take seconds per random-number
    program. Results agree with the default build to float rounding. The flags must be set
    before JAX starts its CPU backend, so they are set here, at import; nothing is added when
    ``XLA_FLAGS`` already names either setting, and full mode is untouched.
    """
    import os
    from importlib.metadata import PackageNotFoundError, version

    from arcourse.course.config import is_quick

    if not is_quick():
        return
    try:
        jaxlib = version("jaxlib")
    except PackageNotFoundError:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    names = [f.split("=")[0] for f in QUICK_XLA_FLAGS]
    if jaxlib.startswith(QUICK_XLA_FLAGS_CHECKED_ON) and not any(n in flags for n in names):
        os.environ["XLA_FLAGS"] = " ".join([flags, *QUICK_XLA_FLAGS]).strip()


_quick_mode_compiles_fast()

from arcourse.train import use_every_core as _use_every_core  # noqa: E402

_use_every_core()


def _persistent_compilation_cache() -> None:
    """Keep compiled programs between sessions (JAX's persistent compilation cache), so that a
    chapter re-run starts without recompiling: in ``$ARCOURSE_CACHE_DIR``, by default
    ``~/.cache/arcourse/jax``. A cache directory the user chose is left as it is.

    Every program is kept, not only those that took JAX's default threshold of a second to
    compile: a chapter's quick mode is mostly small programs (each model's initialisation, each
    grader's shapes) of a fraction of a second each, and a warm re-run skips them all.
    """
    import os

    import jax

    if not os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"):
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    if jax.config.jax_compilation_cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return
    path = os.environ.get("ARCOURSE_CACHE_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "arcourse", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError:  # a read-only home: run without the cache
        return
    jax.config.update("jax_compilation_cache_dir", path)


_persistent_compilation_cache()
