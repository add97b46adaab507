"""The one-source-per-chapter pipeline.

``solutions/NN_slug.md`` (MyST markdown) is the source of a chapter. From it we write

* ``solutions/NN_slug.ipynb``: the same notebook, paired by Jupytext (no outputs);
* ``notebooks/NN_slug.{md,ipynb}``: the learner's copy, each ``# BEGIN SOLUTION`` ...
  ``# END SOLUTION`` region replaced by a stub that raises ``NotImplementedError``;
* ``book/chapters/NN_slug.ipynb``: the book's copy, with the cells holding answers folded.

Everything is generated, so :func:`stale_files` can tell which generated file differs from what
the source would give now; the test suite fails on any.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

__all__ = ["strip_solutions", "learner_notebook", "generate", "stale_files", "chapter_sources",
           "SolutionMarkerError"]

BEGIN, END = "# BEGIN SOLUTION", "# END SOLUTION"
STUB = ("# YOUR CODE HERE", "raise NotImplementedError")
ROOT = Path(__file__).resolve().parents[2]


def _read_md(path):
    import jupytext  # the authoring tools need the dev extra; grading does not

    return jupytext.read(path)


class SolutionMarkerError(ValueError):
    """A ``# BEGIN SOLUTION`` / ``# END SOLUTION`` pair is malformed."""


def strip_solutions(source: str, where: str = "cell") -> str:
    """Replace every marked region of a cell's source by the stub, at the region's indentation.

    Regions must sit inside a function body (indented), so that the learner's copy still runs
    from top to bottom: the stub raises only when the exercise is called.
    """
    out: list[str] = []
    inside = None
    for n, line in enumerate(source.split("\n"), 1):
        stripped = line.strip()
        if stripped == BEGIN:
            if inside is not None:
                raise SolutionMarkerError(f"{where}, line {n}: nested {BEGIN}")
            indent = line[: len(line) - len(line.lstrip())]
            if not indent:
                raise SolutionMarkerError(
                    f"{where}, line {n}: {BEGIN} must be indented inside a function body")
            inside = indent
            out.extend(inside + s for s in STUB)
        elif stripped == END:
            if inside is None:
                raise SolutionMarkerError(f"{where}, line {n}: {END} without {BEGIN}")
            inside = None
        elif inside is None:
            out.append(line)
    if inside is not None:
        raise SolutionMarkerError(f"{where}: {BEGIN} is never closed")
    return "\n".join(out)


def has_solution(cell) -> bool:
    return cell.cell_type == "code" and BEGIN in cell.source


def learner_notebook(nb, name: str = "notebook"):
    """A copy of ``nb`` with every solution region stubbed out."""
    nb = copy.deepcopy(nb)
    for i, cell in enumerate(nb.cells):
        if has_solution(cell):
            cell.source = strip_solutions(cell.source, where=f"{name}, cell {i + 1}")
    return nb


def book_notebook(nb):
    """A copy of ``nb`` for the book: the cells holding answers are folded (``hide-input``)."""
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        if has_solution(cell):
            tags = list(cell.metadata.get("tags", []))
            if "hide-input" not in tags:
                tags.append("hide-input")
            cell.metadata["tags"] = tags
    return nb


def chapter_sources(root: Path = ROOT) -> list[Path]:
    return sorted((root / "solutions").glob("[0-9][0-9]_*.md"))


def _render(nb, fmt: str) -> str:
    if fmt == "ipynb":  # stable cell ids, so regenerating an unchanged chapter changes nothing
        nb = copy.deepcopy(nb)
        for i, cell in enumerate(nb.cells):
            cell["id"] = f"cell-{i:03d}"
    import jupytext  # the authoring tools need the dev extra; grading does not

    text = jupytext.writes(nb, fmt=fmt)
    return text if text.endswith("\n") else text + "\n"


def expected_files(root: Path = ROOT) -> dict[Path, str]:
    """Every generated file and the text it should hold, from the sources as they are now."""
    files: dict[Path, str] = {}
    for md in chapter_sources(root):
        nb = _read_md(md)
        stem = md.stem
        files[root / "solutions" / f"{stem}.ipynb"] = _render(nb, "ipynb")
        learner = learner_notebook(nb, name=md.name)
        files[root / "notebooks" / f"{stem}.md"] = _render(learner, "md:myst")
        files[root / "notebooks" / f"{stem}.ipynb"] = _render(learner, "ipynb")
    files[root / "book" / "_toc.yml"] = toc_text(root)
    return files


def toc_text(root: Path = ROOT) -> str:
    """``book/_toc.yml``: the front page, then every chapter in ``solutions/``, in order."""
    lines = ["# Generated from solutions/ by `make notebooks` (a test fails when it is stale).",
             "format: jb-book", "root: intro", "chapters:"]
    lines += [f"  - file: chapters/{md.stem}" for md in chapter_sources(root)]
    return "\n".join(lines) + "\n"


def readme_chapter_rows(root: Path = ROOT) -> dict[str, str]:
    """The README's chapter table: chapter number -> the solutions file its row links to."""
    rows = {}
    for line in (root / "README.md").read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\|\s*(\d\d)\s*\|\s*\[[^\]]+\]\((solutions/[^)]+\.md)\)", line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def generate(root: Path = ROOT, verbose: bool = True) -> list[Path]:
    """Write every generated file whose text differs; return the paths written."""
    written = []
    (root / "notebooks").mkdir(exist_ok=True)
    for path, text in expected_files(root).items():
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.write_text(text, encoding="utf-8")
            written.append(path)
    expected = {p.name for p in expected_files(root) if p.parent.name == "notebooks"}
    for extra in sorted((root / "notebooks").glob("[0-9][0-9]_*")):
        if extra.name not in expected:
            extra.unlink()
            written.append(extra)
    if verbose:
        for p in written:
            print(f"wrote {p.relative_to(root)}")
        print(f"{len(written)} file(s) updated")
    return written


def stale_files(root: Path = ROOT) -> list[str]:
    """Generated files that are missing or differ from what ``make notebooks`` would write."""
    stale = []
    for path, text in expected_files(root).items():
        if not path.exists():
            stale.append(f"{path.relative_to(root)} is missing")
        elif path.read_text(encoding="utf-8") != text:
            stale.append(f"{path.relative_to(root)} differs from its source")
    return stale


def write_book_chapters(root: Path = ROOT, executed: Path | None = None) -> list[Path]:
    """Write ``book/chapters/NN_slug.ipynb`` (answers folded) for the book build.

    With ``executed``, a chapter already executed there (by ``grade --save-executed``) is taken
    with its outputs and marked not to be executed again; the others are executed by the build.
    """
    import nbformat

    out_dir = root / "book" / "chapters"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for md in chapter_sources(root):
        done = Path(executed) / f"{md.stem}.ipynb" if executed else None
        if done is not None and done.exists():
            nb = book_notebook(nbformat.read(done, as_version=4))
            nb.metadata["mystnb"] = {"execution_mode": "off"}
        else:
            nb = book_notebook(_read_md(md))
        path = out_dir / f"{md.stem}.ipynb"
        path.write_text(_render(nb, "ipynb"), encoding="utf-8")
        paths.append(path)
    return paths


CHECK_CALL = re.compile(r"""\bcheck\(\s*["']([\w.]+)["']""")


def exercise_ids_in(nb) -> list[str]:
    """The exercise ids a notebook checks, in order of appearance."""
    ids: list[str] = []
    for cell in nb.cells:
        if cell.cell_type == "code":
            for m in CHECK_CALL.finditer(cell.source):
                if m.group(1) not in ids:
                    ids.append(m.group(1))
    return ids
