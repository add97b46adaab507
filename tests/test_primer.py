"""Chapter 00's primer teaches every JAX / Flax NNX / Optax idiom before an exercise needs it.

A grep-level check on the chapter sources (``solutions/*.md``): for each idiom below, every
exercise cell whose answer uses it must come after a place that teaches it, either chapter 00's
text (its markdown and its code outside the answers) or an earlier cell of the exercise's own
chapter. Chapter 00 must teach every idiom in ``REQUIRED`` whether or not an exercise uses it
today, and must teach each one before its own warm-up exercises use it.
"""

import re

import pytest

from arcourse.course import authoring

IDIOMS = {
    ".at[": r"\.at\[",
    "tree_map": r"\btree_map\b",
    "tree_leaves": r"\btree_leaves\b",
    "jax.random.key": r"\brandom\.key\(",
    "jax.random.split": r"\brandom\.split\(",
    "jax.random.categorical": r"\brandom\.categorical\(",
    "jit": r"\b(jax|nnx)\.jit\b",
    "jnp.where": r"\bjnp\.where\(",
    "lax.cond": r"\blax\.cond\(",
    "lax.scan": r"\blax\.scan\(",
    "fori_loop": r"\bfori_loop\(",
    "vmap": r"\bvmap\(",
    "take_along_axis": r"\btake_along_axis\(",
    "grad": r"\b(jax|nnx)\.grad\(",
    "value_and_grad": r"\bvalue_and_grad\(",
    "nnx.Module": r"\bnnx\.Module\b",
    "nnx.Param": r"\bnnx\.Param\b",
    "nnx.Variable": r"\bnnx\.Variable\b",
    "nnx.state": r"\bnnx\.state\(",
    "nnx.split": r"\bnnx\.split\(",
    "nnx.merge": r"\bnnx\.merge\(",
    "nnx.Optimizer": r"\bnnx\.Optimizer\(",
    "conv_general_dilated": r"\bconv_general_dilated\(",
}
REQUIRED = list(IDIOMS)  # chapter 00 teaches all of them
PRIMER = "00_welcome.md"


def _chapters():
    out = {}
    for path in authoring.chapter_sources():
        nb = authoring._read_md(path)
        cells = []
        for cell in nb.cells:
            exercise = authoring.has_solution(cell)
            taught = (authoring.strip_solutions(cell.source) if exercise else cell.source)
            cells.append((exercise, cell.source, taught))
        out[path.name] = cells
    return out


CHAPTERS = _chapters()


def _uses(text):
    return {name for name, pattern in IDIOMS.items() if re.search(pattern, text)}


def test_the_primer_exists_and_comes_first():
    assert PRIMER in CHAPTERS
    assert sorted(CHAPTERS)[0] == PRIMER
    assert sum(exercise for exercise, _, _ in CHAPTERS[PRIMER]) >= 6  # 3 + the primer's warm-ups


@pytest.mark.parametrize("idiom", REQUIRED)
def test_chapter_00_teaches_the_idiom(idiom):
    taught = "\n".join(t for _, _, t in CHAPTERS[PRIMER])
    assert re.search(IDIOMS[idiom], taught), f"chapter 00 never shows {idiom}"


def _exercise_cells():
    for name, cells in sorted(CHAPTERS.items()):
        for i, (exercise, source, _) in enumerate(cells):
            if exercise:
                yield name, i, source


@pytest.mark.parametrize("chapter,index,source",
                         [pytest.param(*e, id=f"{e[0][:2]}-cell{e[1]}") for e in _exercise_cells()])
def test_each_idiom_is_taught_before_the_exercise_that_needs_it(chapter, index, source):
    before = [t for _, _, t in CHAPTERS[chapter][:index]]
    if chapter != PRIMER:
        before += [t for _, _, t in CHAPTERS[PRIMER]]
    taught = _uses("\n".join(before))
    missing = sorted(_uses(source) - taught)
    assert not missing, (f"{chapter}, cell {index + 1}: the exercise uses {missing}, which "
                         "neither chapter 00 nor the cells above it in its chapter show")


def test_the_check_sees_the_primer_exercises():
    """The check is not vacuous: the primer's own warm-ups use idioms it must teach first."""
    used = set().union(*(_uses(s) for c, _, s in _exercise_cells() if c == PRIMER))
    assert {"tree_map", "jnp.where", "lax.scan", "jax.random.split"} <= used
