"""arcourse: tested reference implementations of autoregressive models, one module per topic.

The modules a learner reads are at the top level, each named for what it teaches and each
docstring naming its chapter. The course platform (grading, modes, authoring) is in
:mod:`arcourse.course`.

Importing arcourse gives JAX one CPU device per core (unless you chose a count yourself, or JAX
has already started) so that training runs data-parallel on every core: see
:func:`arcourse.train.use_every_core`.
"""

from arcourse.train import use_every_core as _use_every_core

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
