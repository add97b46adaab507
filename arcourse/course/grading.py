"""Graded exercises: the registry, :func:`check`, and the comparison that explains a failure.

An exercise is registered once, in ``arcourse/course/exercises/<chapter>.py``, with

* a ``reference`` implementation (the answer),
* ``cases``: the inputs to try, fixed and random (a function of a seeded ``numpy`` generator),
* optionally a ``test`` for exercises judged by a property rather than by equality with the
  reference (a sampler is judged by the frequencies it produces, not by its exact draws),
* ``wrong``: plausible wrong answers (the classic mistakes) that the check must reject; the test
  suite makes sure it does, so no grader can silently pass everything.

``check(exercise_id, fn)`` prints one line, and on failure a short diagnosis, and returns a
:class:`CheckResult`. It never raises and never hangs the kernel: an exception from the learner's
code is summarised, and code that runs past the exercise's time limit is abandoned.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Case",
    "Exercise",
    "CheckResult",
    "CheckFailure",
    "register",
    "get_exercise",
    "all_exercises",
    "check",
    "assert_matches",
    "describe",
    "not_implemented_stub",
    "translate_error",
    "device_array",
    "normal_array",
]

PASSED, FAILED, NOT_ATTEMPTED, ERROR = "passed", "failed", "not attempted", "error"
REPORT_ENV = "ARCOURSE_GRADE_REPORT"


class CheckFailure(AssertionError):
    """Raised by a test when the learner's answer is wrong; its message is the diagnosis."""


@dataclass
class Case:
    """One input to an exercise: positional ``args``, keyword ``kwargs`` and a readable ``label``."""

    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    label: str = ""


@dataclass
class Exercise:
    """A registered exercise. See the module docstring."""

    id: str
    title: str
    reference: Callable
    cases: Callable[[np.random.Generator], Sequence[Case]] | Sequence[Case] = ()
    points: int = 1
    test: Callable[[Callable, Exercise], str | None] | None = None
    wrong: dict[str, Callable] = field(default_factory=dict)
    rtol: float = 1e-5
    atol: float = 1e-6
    timeout: float = 60.0
    hint: str = ""

    def make_cases(self, seed: int = 0) -> list[Case]:
        cases = self.cases(np.random.default_rng(seed)) if callable(self.cases) else self.cases
        return list(cases)

    def run(self, fn: Callable) -> str:
        """Run the exercise's tests on ``fn``; raise :class:`CheckFailure` if it is wrong.

        Returns a short summary of what was checked.
        """
        if self.test is not None:
            return self.test(fn, self) or "property checks passed"
        cases = self.make_cases()
        reference, answer = compiled(self.reference), compiled(fn)
        for i, case in enumerate(cases):
            label = case.label or f"case {i + 1}"
            expected = reference(*case.args, **case.kwargs)
            got = answer(*case.args, **case.kwargs)
            try:
                assert_matches(got, expected, rtol=self.rtol, atol=self.atol,
                               where=f"{label} (input: {describe_call(case)})")
            except CheckFailure as failure:
                mistake = self.matching_mistake(answer, cases)
                if mistake is None:
                    raise
                raise CheckFailure(f"{failure}\n   your answer matches a classic mistake: "
                                   f"{mistake}") from None
        return f"{len(cases)} cases"

    def matching_mistake(self, fn: Callable, cases: Sequence[Case] | None = None) -> str | None:
        """The name of the ``wrong`` answer that ``fn`` agrees with on EVERY case, if any.

        A mistake is named only when it explains every case (two mistakes that agree on a small
        case are told apart by the others), and never by NaN alone: a case where the answer is
        all NaN matches nothing.
        """
        cases = self.make_cases() if cases is None else cases
        for what, mistake in self.wrong.items():
            try:
                for case in cases:
                    got = fn(*case.args, **case.kwargs)
                    if _all_nan(got):
                        raise CheckFailure("all NaN")
                    assert_matches(got, mistake(*case.args, **case.kwargs), rtol=self.rtol,
                                   atol=self.atol)
            except Exception:  # noqa: BLE001 - a mismatch, or the learner's code raising
                continue
            return what
        return None


def device_array(x, dtype=np.float32):
    """A case's array: ``x`` converted to ``dtype`` in NumPy, then put on the device as it is.

    ``jnp.asarray`` of a NumPy array or a list compiles a small conversion program for every new
    shape (about 30 ms each on a laptop CPU, hundreds in a chapter's checks); ``jax.device_put``
    of a ready NumPy array compiles nothing. The values are the same either way."""
    from arcourse._checks import as_array

    return as_array(x, dtype)


def normal_array(rng: np.random.Generator, *shape: int, scale: float = 1.0):
    """A case's float32 array of standard normal draws from ``rng`` times ``scale``, on the
    device (see :func:`device_array`)."""
    return device_array(rng.normal(size=shape) * scale)


def compiled(fn: Callable) -> Callable:
    """``fn`` run as one compiled program per case, where that gives the same answer; else as it is.

    Run op by op, a function compiles every operation for every new shape (tens of small programs
    per case); compiled whole, it is one program per case, which makes a check several times
    faster. The array arguments are traced and every other argument (an int size, a tuple of
    scales) is fixed, so the function sees them as the plain Python values they are. Whatever
    does not compile, or prints while it is traced (a learner's ``print`` should show values,
    not tracers), runs op by op instead: so do functions with an argument that is neither arrays
    nor a hashable constant (a model), and any function whose compiled run raises, which
    then raises its own error as it would without this wrapper.
    """
    import contextlib
    import io

    import jax

    variants: dict[tuple, Callable] = {}

    def run(*args, **kwargs):
        roles = [_role(a) for a in args]
        named = {k: _role(v) for k, v in kwargs.items()}
        fixed = tuple(i for i, r in enumerate(roles) if r == "fixed")
        fixed_names = tuple(sorted(k for k, r in named.items() if r == "fixed"))
        try:
            if "mixed" in roles or "mixed" in named.values():
                raise TypeError("arrays mixed with other values")
            hash(tuple(args[i] for i in fixed) + tuple(kwargs[k] for k in fixed_names))
            key = (fixed, fixed_names)
            if key not in variants:
                variants[key] = jax.jit(fn, static_argnums=fixed, static_argnames=fixed_names)
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                out = variants[key](*args, **kwargs)
            if printed.getvalue():
                raise RuntimeError("printed while traced")
            return out
        except Exception:  # noqa: BLE001 - anything jit cannot take runs op by op, as written
            return fn(*args, **kwargs)

    return run


def _role(x) -> str:
    """How a compiled function takes the argument ``x``: "traced" (its leaves are all arrays),
    "fixed" (none are: a size, a tuple of scales) or "mixed" (both: it runs op by op)."""
    import jax

    leaves = jax.tree_util.tree_leaves(x)
    arrays = sum(isinstance(v, np.ndarray) or hasattr(v, "aval") for v in leaves)
    if leaves and arrays == len(leaves):
        return "traced"
    return "mixed" if arrays else "fixed"


def _all_nan(x) -> bool:
    """True when every float leaf of ``x`` is entirely NaN (and there is at least one)."""
    import jax

    leaves = [np.asarray(v) for v in jax.tree_util.tree_leaves(x)]
    floats = [v for v in leaves if v.dtype.kind == "f" and v.size]
    return bool(floats) and all(np.isnan(v).all() for v in floats)


@dataclass
class CheckResult:
    """The outcome of :func:`check`: ``passed``, ``failed``, ``not attempted`` or ``error``."""

    exercise_id: str
    outcome: str
    message: str = ""
    points: int = 0
    max_points: int = 0
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.outcome == PASSED

    def __bool__(self) -> bool:
        return self.passed

    def summary(self) -> str:
        icon = {PASSED: "✅", FAILED: "❌", NOT_ATTEMPTED: "⬜", ERROR: "⚠️"}.get(self.outcome, "?")
        head = f"{icon} {self.exercise_id}: {self.outcome.upper()} ({self.points}/{self.max_points} points)"
        return head + (f"\n   {self.message}" if self.message else "")

    def _ipython_display_(self):
        # check() has already printed the summary; showing it again as the cell's value is noise.
        pass


_REGISTRY: dict[str, Exercise] = {}
_LOADED = False


def register(exercise_id: str, **kwargs) -> Exercise:
    """Create and register an :class:`Exercise` (see its fields for the keyword arguments)."""
    if "." not in exercise_id:
        raise ValueError(f"exercise_id must look like 'chapter.name', got {exercise_id!r}")
    ex = Exercise(id=exercise_id, **kwargs)
    _REGISTRY[exercise_id] = ex
    return ex


def _load_all() -> None:
    global _LOADED
    if _LOADED:
        return
    from arcourse.course import exercises

    for mod in pkgutil.iter_modules(exercises.__path__):
        importlib.import_module(f"arcourse.course.exercises.{mod.name}")
    _LOADED = True


def all_exercises() -> dict[str, Exercise]:
    """Every registered exercise, by id."""
    _load_all()
    return dict(_REGISTRY)


def get_exercise(exercise_id: str) -> Exercise:
    _load_all()
    try:
        return _REGISTRY[exercise_id]
    except KeyError:
        close = [k for k in _REGISTRY if k.split(".")[0] == str(exercise_id).split(".")[0]]
        raise KeyError(
            f"no exercise called {exercise_id!r}" + (f"; this chapter has {close}" if close else "")
        ) from None


def not_implemented_stub(*args, **kwargs):
    """What an untouched exercise does: the learner copy's body."""
    raise NotImplementedError


# --------------------------------------------------------------------------------------------
# check
# --------------------------------------------------------------------------------------------
_FAILURES: dict[str, int] = {}


def check(exercise_id: str, fn: Callable, *, hint: int = 1, timeout: float | None = None,
          quiet: bool = False) -> CheckResult:
    """Grade ``fn`` as the answer to ``exercise_id``; print the outcome and return it.

    Never raises: every problem becomes an outcome with a message. A failure first says what is
    wrong (which case, expected against got, the classic mistake it matches); the exercise's
    stronger hint comes with ``hint=2``, or by itself from the second failed check of the same
    exercise.
    """
    start = time.perf_counter()
    try:
        ex = get_exercise(exercise_id)
    except KeyError as e:
        result = CheckResult(str(exercise_id), ERROR, str(e.args[0]))
        return _finish(result, start, quiet)
    if not callable(fn):
        result = CheckResult(ex.id, ERROR, f"expected a function, got {type(fn).__name__}",
                             0, ex.points)
        return _finish(result, start, quiet)

    outcome, message = _run_with_timeout(ex, fn, ex.timeout if timeout is None else timeout)
    if outcome == FAILED:
        _FAILURES[ex.id] = _FAILURES.get(ex.id, 0) + 1
        if ex.hint and (hint >= 2 or _FAILURES[ex.id] >= 2):
            message += f"\n   hint: {ex.hint}"
        elif ex.hint:
            message += (f"\n   (for a hint: check({ex.id!r}, your_function, hint=2))")
    elif outcome == ERROR:
        message += "\n   " + _spec_pointer(ex)
    points = ex.points if outcome == PASSED else 0
    return _finish(CheckResult(ex.id, outcome, message, points, ex.points), start, quiet)


def _spec_pointer(ex: Exercise) -> str:
    return (f"the exercise's docstring states the shapes, dtypes and conventions "
            f"`{ex.id}` is checked on: help(your_function) shows it")


def _run_with_timeout(ex: Exercise, fn: Callable, timeout: float) -> tuple[str, str]:
    box: dict[str, Any] = {}

    def target():
        try:
            box["summary"] = ex.run(fn)
            box["outcome"] = PASSED
        except NotImplementedError:
            box["outcome"] = NOT_ATTEMPTED
        except CheckFailure as e:
            box["outcome"], box["message"] = FAILED, str(e)
        except BaseException as e:  # noqa: BLE001 - the learner's code may raise anything
            box["outcome"], box["message"] = ERROR, _summarise_exception(e)

    worker = threading.Thread(target=target, name=f"arcourse-check-{ex.id}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        return ERROR, (f"your code did not finish within {timeout:g} s (an infinite loop, or a "
                       "Python loop where a vectorised operation would do?)")
    outcome = box.get("outcome", ERROR)
    if outcome == PASSED:
        return PASSED, box.get("summary", "")
    if outcome == NOT_ATTEMPTED:
        return NOT_ATTEMPTED, "the stub still raises NotImplementedError: replace it with your code"
    return outcome, box.get("message", "")


# Common JAX errors, said in a sentence: (pattern in the type name or message, explanation).
JAX_ERRORS = [
    (r"TracerBoolConversionError|TracerIntegerConversionError",
     "a Python `if`, `while`, `and`/`or` or int() on a traced array: inside jit the value is not "
     "known yet. Choose between values with jnp.where (or jax.lax.cond), and loop with "
     "jax.lax.scan / fori_loop."),
    (r"ConcretizationTypeError|NonConcreteBooleanIndexError",
     "your code needs a concrete value where JAX has only a traced one (a shape, a Python bool, "
     "boolean-mask indexing): keep shapes static and select with jnp.where instead."),
    (r"conv_general_dilated|dimension_numbers|lhs feature dimension|rhs input feature",
     "the convolution's layouts do not match its arrays: jax.lax.conv_general_dilated assumes "
     "NCHW inputs and OIHW kernels unless dimension_numbers says otherwise; the spec gives the "
     "layouts of the exercise's arrays."),
    (r"Incompatible shapes for broadcasting|dot_general requires contracting|"
     r"matmul.*(shape|size)|shapes? .* (do not|don't) match|size mismatch",
     "two arrays' shapes do not line up (a product or a broadcast): print the shapes, compare "
     "them with the shapes the spec gives, and check which axis you reduce or transpose."),
    (r"dtype|must be (an )?integer|to integer|not a valid JAX type|float.* index|"
     r"indices must be integers",
     "a dtype problem: an index must be an integer array, maths on probabilities wants floats; "
     "convert with .astype where the spec says which dtype."),
    (r"IndexError|out of bounds|index .* is out of",
     "an index out of range: check the first and the last position your code touches (an "
     "off-by-one?)."),
]


def translate_error(e: BaseException) -> str | None:
    """A sentence explaining a common JAX error, or ``None``."""
    import re

    text = f"{type(e).__name__}: {e}"
    for pattern, sentence in JAX_ERRORS:
        if re.search(pattern, text, flags=re.IGNORECASE):
            return sentence
    return None


def _summarise_exception(e: BaseException) -> str:
    frames = traceback.extract_tb(e.__traceback__)
    # The innermost frame outside arcourse and JAX is where the learner's code went wrong.
    user = [f for f in frames if "arcourse" not in f.filename and "/jax/" not in f.filename
            and "site-packages" not in f.filename]
    where = f" (at line {user[-1].lineno}: `{(user[-1].line or '').strip()}`)" if user else ""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    if len(first) > 300:
        first = first[:300] + "..."
    message = f"your code raised {type(e).__name__}: {first}{where}"
    said = translate_error(e)
    return message + (f"\n   what it means: {said}" if said else "")


def _finish(result: CheckResult, start: float, quiet: bool) -> CheckResult:
    result.seconds = round(time.perf_counter() - start, 3)
    if not quiet:
        print(result.summary())
    path = os.environ.get(REPORT_ENV)
    if path:
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(asdict(result)) + "\n")
        except OSError:
            pass
    return result


# --------------------------------------------------------------------------------------------
# Comparison with a diagnosis
# --------------------------------------------------------------------------------------------
def describe(x: Any) -> str:
    """A short description of a value: ``float32[2,5]``, ``3``, ``tuple(int32[4], float32[])``."""
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        shape = ",".join(str(d) for d in x.shape)
        return f"{x.dtype}[{shape}]"
    if isinstance(x, tuple | list):
        inner = ", ".join(describe(v) for v in x[:6]) + (", ..." if len(x) > 6 else "")
        return f"{type(x).__name__}({inner})"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in list(x.items())[:6]) + "}"
    if callable(x):
        return getattr(x, "__name__", "function")
    r = repr(x)
    return r if len(r) <= 40 else r[:37] + "..."


def describe_call(case: Case) -> str:
    parts = [describe(a) for a in case.args] + [f"{k}={describe(v)}" for k, v in case.kwargs.items()]
    return ", ".join(parts) if parts else "no arguments"


def _kind(dtype: np.dtype) -> str:
    if dtype == np.bool_:
        return "bool"
    if np.issubdtype(dtype, np.integer):
        return "integer"
    if np.issubdtype(dtype, np.floating) or np.issubdtype(dtype, np.complexfloating):
        return "float"
    return str(dtype)


def assert_matches(got: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-6,
                   where: str = "") -> None:
    """Raise :class:`CheckFailure` explaining how ``got`` differs from ``expected``.

    Compares pytrees (tuples, lists, dicts) leaf by leaf; arrays by shape, kind of dtype
    (integer / float / bool) and value, reporting the first differing element.
    """
    prefix = f"{where}: " if where else ""
    if isinstance(expected, tuple | list):
        if not isinstance(got, tuple | list) or len(got) != len(expected):
            raise CheckFailure(f"{prefix}expected a {type(expected).__name__} of {len(expected)} "
                               f"items, got {describe(got)}")
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_matches(g, e, rtol=rtol, atol=atol, where=f"{where}, returned item {i}")
        return
    if isinstance(expected, dict):
        if not isinstance(got, dict) or set(got) != set(expected):
            raise CheckFailure(f"{prefix}expected a dict with keys {sorted(expected)}, got {describe(got)}")
        for k in expected:
            assert_matches(got[k], expected[k], rtol=rtol, atol=atol, where=f"{where}, key {k!r}")
        return
    if isinstance(expected, str):
        if got != expected:
            raise CheckFailure(f"{prefix}expected {expected!r}, got {got!r}")
        return
    if got is None:
        raise CheckFailure(f"{prefix}your function returned None: did you forget `return`?")
    try:
        g = np.asarray(got)
    except Exception:  # noqa: BLE001
        raise CheckFailure(f"{prefix}expected an array, got {describe(got)}") from None
    e = np.asarray(expected)
    if g.dtype == object:
        raise CheckFailure(f"{prefix}expected an array of numbers, got {describe(got)}")
    if g.shape != e.shape:
        hint = ""
        if sorted(g.shape) == sorted(e.shape) and g.shape != e.shape:
            hint = " (the same sizes in another order: a transposed or swapped axis?)"
        elif g.size == e.size:
            hint = " (the same number of elements: a reshape or a missing squeeze?)"
        raise CheckFailure(f"{prefix}shape mismatch: expected {e.shape}, got {g.shape}{hint}")
    ek, gk = _kind(e.dtype), _kind(g.dtype)
    if ek != gk and {ek, gk} != {"integer", "bool"}:
        raise CheckFailure(f"{prefix}dtype mismatch: expected {ek} values ({e.dtype}), "
                           f"got {gk} values ({g.dtype})")
    if ek == "float":
        gf, ef = g.astype(np.float64), e.astype(np.float64)
        bad_nan = np.isnan(gf) & ~np.isnan(ef)
        if bad_nan.any():
            idx = tuple(int(i) for i in np.argwhere(bad_nan)[0])
            raise CheckFailure(f"{prefix}got NaN at index {idx} where {ef[idx]:.6g} was expected "
                               "(an overflow, or log of zero?)")
        close = np.isclose(gf, ef, rtol=rtol, atol=atol, equal_nan=True)
    else:
        close = g == e
    if not np.all(close):
        bad = np.argwhere(~close)
        idx = tuple(int(i) for i in bad[0])
        gv, ev = g[idx] if g.ndim else g, e[idx] if e.ndim else e
        loc = f" at index {idx}" if idx else ""
        msg = f"{prefix}wrong value{loc}: expected {_fmt(ev)}, got {_fmt(gv)}"
        if g.ndim:
            msg += f" ({len(bad)} of {g.size} elements differ"
            if ek == "float":
                both = np.isfinite(gf) & np.isfinite(ef)
                if both.any():
                    diff = np.abs(gf[both] - ef[both])
                    msg += f"; largest finite difference {diff.max():.3g}"
            msg += ")"
        raise CheckFailure(msg)


def _fmt(v) -> str:
    v = np.asarray(v)
    if v.dtype.kind == "f":
        return f"{float(v):.6g}"
    return str(v.item()) if v.ndim == 0 else str(v)
