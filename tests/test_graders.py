"""Every registered exercise: its reference passes, the untouched stub reads "not attempted",
and every plausible wrong answer it lists fails with a message. A grader that cannot fail is a
defect, so each exercise must list at least one wrong answer."""

import time

import numpy as np
import pytest

from arcourse.course import grading
from arcourse.course.grading import Case, CheckFailure, check

EXERCISES = grading.all_exercises()
IDS = sorted(EXERCISES)


def test_there_are_exercises():
    assert len(EXERCISES) >= 4


@pytest.mark.parametrize("exercise_id", IDS)
def test_reference_passes(exercise_id):
    ex = EXERCISES[exercise_id]
    r = check(exercise_id, ex.reference, quiet=True)
    assert r.outcome == "passed", r.message
    assert r.points == ex.points > 0


@pytest.mark.parametrize("exercise_id", IDS)
def test_stub_is_not_attempted(exercise_id):
    r = check(exercise_id, grading.not_implemented_stub, quiet=True)
    assert r.outcome == "not attempted", r.message
    assert r.points == 0


@pytest.mark.parametrize("exercise_id", IDS)
def test_wrong_answers_fail_with_a_message(exercise_id):
    ex = EXERCISES[exercise_id]
    assert ex.wrong, f"{exercise_id} lists no plausible wrong answer: its grader is untested"
    for name, wrong in ex.wrong.items():
        r = check(exercise_id, wrong, quiet=True)
        assert r.outcome == "failed", f"wrong answer {name!r} was not rejected: {r}"
        assert r.message.strip(), f"wrong answer {name!r} failed without a diagnosis"


# ---- check itself, on a toy exercise -------------------------------------------------------
grading.register(
    "toy.double",
    title="Double an array",
    reference=lambda x: 2 * x,
    cases=lambda rng: [Case((np.arange(3.0),), label="arange"),
                       Case((rng.normal(size=(2, 3)),), label="random 2x3")],
    wrong={"adds instead": lambda x: x + 2},
    timeout=2.0,
)


def test_check_diagnoses_values_shapes_and_dtypes(capsys):
    r = check("toy.double", lambda x: x + 2)
    assert r.outcome == "failed" and "expected 0" in r.message and "got 2" in r.message
    assert "arange" in r.message
    assert "FAILED" in capsys.readouterr().out
    r = check("toy.double", lambda x: (2 * x).T)
    assert r.outcome == "failed" and "shape mismatch" in r.message and "transposed" in r.message
    r = check("toy.double", lambda x: (2 * x).astype(int))
    assert r.outcome == "failed"
    r = check("toy.double", lambda x: None)
    assert r.outcome == "failed" and "return" in r.message


def test_check_never_raises_and_bounds_time():
    r = check("toy.double", lambda x: 1 / 0, quiet=True)
    assert r.outcome == "error" and "ZeroDivisionError" in r.message
    r = check("toy.double", "not a function", quiet=True)
    assert r.outcome == "error" and "expected a function" in r.message
    r = check("no_such.exercise", lambda x: x, quiet=True)
    assert r.outcome == "error" and "no exercise" in r.message

    def forever(x):
        while True:
            time.sleep(0.01)

    t = time.perf_counter()
    r = check("toy.double", forever, quiet=True)
    assert r.outcome == "error" and "did not finish" in r.message
    assert time.perf_counter() - t < 10


def test_nan_is_named():
    with pytest.raises(CheckFailure, match="NaN"):
        grading.assert_matches(np.array([np.nan, 1.0]), np.array([0.5, 1.0]))


def test_report_file(tmp_path, monkeypatch):
    path = tmp_path / "r.jsonl"
    monkeypatch.setenv(grading.REPORT_ENV, str(path))
    check("toy.double", lambda x: 2 * x, quiet=True)
    assert '"outcome": "passed"' in path.read_text()


def test_a_classic_mistake_is_named_only_when_it_explains_every_case():
    """The platform names a listed mistake when the answer agrees with it on every case, never
    from the first failing case alone, and never because both give NaN."""
    ex = grading.Exercise(
        id="demo.mask", title="demo", reference=lambda n: np.tril(np.ones((n, n), bool)),
        cases=[Case((1,)), Case((4,))],
        wrong={"hides the diagonal": lambda n: np.tril(np.ones((n, n), bool), -1),
               "upper triangle": lambda n: np.triu(np.ones((n, n), bool))})
    with pytest.raises(CheckFailure, match="classic mistake: upper triangle"):
        ex.run(lambda n: np.triu(np.ones((n, n), bool)))  # agrees with the reference at n = 1
    with pytest.raises(CheckFailure) as info:  # wrong in another way: no name
        ex.run(lambda n: np.zeros((n, n), bool))
    assert "classic mistake" not in str(info.value)
    nan_ex = grading.Exercise(
        id="demo.softmax", title="demo", reference=lambda z: np.exp(z) / np.exp(z).sum(),
        cases=[Case((np.array([1000.0, 0.0]),))],
        wrong={"no max subtraction": lambda z: np.exp(z) / np.exp(z).sum()})
    with np.errstate(all="ignore"), pytest.raises(CheckFailure) as info:
        nan_ex.run(lambda z: np.full(z.shape, np.nan))
    assert "classic mistake" not in str(info.value)


def test_hints_come_in_steps():
    """A failure says what is wrong; the exercise's hint only on request or on a second failure."""
    ex_id = "welcome.softmax"
    wrong = EXERCISES[ex_id].wrong
    bad = next(iter(wrong.values()))
    grading._FAILURES.pop(ex_id, None)
    with np.errstate(all="ignore"):
        first = check(ex_id, bad, quiet=True)
        assert first.outcome == "failed" and "hint=2" in first.message
        assert EXERCISES[ex_id].hint not in first.message
        second = check(ex_id, bad, quiet=True)
        assert EXERCISES[ex_id].hint in second.message
        grading._FAILURES.pop(ex_id, None)
        asked = check(ex_id, bad, quiet=True, hint=2)
        assert EXERCISES[ex_id].hint in asked.message


def test_a_raised_jax_error_is_translated():
    """An error from the learner's code gets a sentence saying what it means, and the spec."""
    import jax
    import jax.numpy as jnp

    @jax.jit
    def python_if(z):
        if z.sum() > 0:  # a Python if on a traced value
            return z
        return -z

    r = check("welcome.softmax", python_if, quiet=True)
    assert r.outcome == "error" and "what it means" in r.message and "jnp.where" in r.message
    assert "docstring" in r.message

    def nchw(z):
        x = jnp.ones((1, 5, 5, 3))  # NHWC data given to the default NCHW layout
        return jax.lax.conv_general_dilated(x, jnp.ones((3, 3, 3, 4)), (1, 1), "VALID")

    r = check("welcome.softmax", nchw, quiet=True)
    assert r.outcome == "error" and "layouts" in r.message, r.message

    def shapes(z):
        return jnp.ones((3, 4)) @ jnp.ones((5, 2))

    r = check("welcome.softmax", shapes, quiet=True)
    assert r.outcome == "error" and "shapes do not line up" in r.message, r.message


def _code_lines(fn) -> list[str]:
    """The statements of ``fn``'s source worth hiding: no signature, docstring, comment or
    trivial line (``return x``), whitespace squeezed."""
    import inspect
    import re

    try:
        src = inspect.getsource(fn)
    except (OSError, TypeError):
        return []
    lines, in_doc = [], False
    for raw in src.splitlines():
        line = raw.split("#")[0].strip()
        if line.count('"""') == 1 or line.count("'''") == 1:
            in_doc = not in_doc
            continue
        if in_doc or not line or line.startswith(("def ", "@", '"""', "'''", "register(")):
            continue
        line = re.sub(r"\s+", "", line.removeprefix("return "))
        if len(line) >= 10:
            lines.append(line)
    return lines


@pytest.mark.parametrize("exercise_id", IDS)
def test_hints_never_hand_over_the_reference_code(exercise_id):
    """A hint says what is wrong and which idea to use; it never contains a line of the
    reference's code: not the stronger hint (hint=2), and not the names of the classic mistakes
    that a first-level diagnosis prints (the rest of a diagnosis is the platform's own text)."""
    import re

    ex = EXERCISES[exercise_id]
    code = _code_lines(ex.reference)
    texts = {"hint": ex.hint, **{f"mistake name {name!r}": name for name in ex.wrong}}
    for where, text in texts.items():
        squeezed = re.sub(r"\s+", "", text or "")
        for line in code:
            assert line not in squeezed, f"{where} of {exercise_id} contains the reference's code {line!r}"


def test_compiled_runs_one_program_per_case_and_keeps_python_values_fixed():
    import jax
    import jax.numpy as jnp

    seen = []

    def fn(x, size, scales=(1, 2)):
        seen.append((isinstance(x, jax.core.Tracer), type(size), scales))
        return jnp.tile(x, size) * sum(scales)

    run = grading.compiled(fn)
    x = jnp.arange(3.0)
    np.testing.assert_allclose(run(x, 2, scales=(1, 3)), np.tile(np.arange(3.0), 2) * 4)
    run(x, 2, scales=(1, 3))  # the same case again: compiled once, not traced again
    assert seen == [(True, int, (1, 3))]


def test_compiled_falls_back_to_running_as_written():
    import contextlib
    import io

    import jax.numpy as jnp

    def branchy(x):  # a Python `if` on a value: cannot be traced, right when run op by op
        return x * 2 if float(x.sum()) > 0 else -x

    def shouty(x):
        print("x =", x)  # must show the learner values, not a tracer
        return x + 1

    x = jnp.ones(3)
    np.testing.assert_allclose(grading.compiled(branchy)(x), 2 * np.ones(3))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        grading.compiled(shouty)(x)
    assert "Traced" not in out.getvalue() and "[1. 1. 1.]" in out.getvalue(), out.getvalue()

    def not_finished(x):
        raise NotImplementedError

    with pytest.raises(NotImplementedError):
        grading.compiled(not_finished)(x)
