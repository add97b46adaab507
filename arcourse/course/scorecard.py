"""Grade a learner's notebook: execute it in a fresh kernel, collect every ``check`` it made.

Each ``check`` call appends its result to a report file named by ``ARCOURSE_GRADE_REPORT``; the
grader sets that variable for the kernel it starts, runs every cell (a cell that raises does not
stop the run), and confirms the kernel is still alive at the end.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import nbformat

from arcourse.course.authoring import exercise_ids_in
from arcourse.course.grading import ERROR, NOT_ATTEMPTED, PASSED, REPORT_ENV, all_exercises

__all__ = ["Scorecard", "grade_notebook", "render"]

NOT_RUN = "not run"
ALIVE_MARK = "arcourse-kernel-alive"


@dataclass
class Row:
    exercise_id: str
    title: str
    points: int
    max_points: int
    outcome: str
    message: str = ""


@dataclass
class Scorecard:
    notebook: str
    rows: list[Row] = field(default_factory=list)
    cell_errors: list[str] = field(default_factory=list)
    kernel_alive: bool = False
    seconds: float = 0.0
    mode: str = "full"

    @property
    def score(self) -> int:
        return sum(r.points for r in self.rows)

    @property
    def max_score(self) -> int:
        return sum(r.max_points for r in self.rows)

    @property
    def all_passed(self) -> bool:
        return bool(self.rows) and all(r.outcome == PASSED for r in self.rows)

    @property
    def none_passed(self) -> bool:
        return all(r.outcome != PASSED for r in self.rows)


def _read(path: Path):
    if path.suffix == ".ipynb":
        return nbformat.read(path, as_version=4)
    try:
        import jupytext
    except ImportError:
        raise ValueError(f"{path} is a Jupytext text notebook: grade its .ipynb, or install "
                         "jupytext to read it") from None
    return jupytext.read(path)


def grade_notebook(path: str | os.PathLike, cell_timeout: float = 900,
                   save_executed: str | None = None) -> Scorecard:
    """Execute the notebook at ``path`` in a fresh kernel and score its exercises."""
    from nbclient import NotebookClient

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no notebook at {path}")
    nb = _read(path)
    ids = exercise_ids_in(nb)
    from arcourse.course.config import is_quick

    card = Scorecard(notebook=str(path), mode="quick" if is_quick() else "full")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.jsonl"
        old = os.environ.get(REPORT_ENV)
        os.environ[REPORT_ENV] = str(report)
        try:
            client = NotebookClient(nb, timeout=cell_timeout, allow_errors=True,
                                    kernel_name="python3",
                                    resources={"metadata": {"path": str(path.parent.resolve())}})
            with client.setup_kernel():
                for i, cell in enumerate(nb.cells):
                    if cell.cell_type != "code":
                        continue
                    try:
                        client.execute_cell(cell, i)
                    except Exception as e:  # a timeout or a dead kernel: record, carry on
                        card.cell_errors.append(f"cell {i + 1}: {type(e).__name__}: {e}"[:300])
                        if not _alive(client):
                            break
                    for out in cell.get("outputs", []):
                        if out.get("output_type") == "error":
                            card.cell_errors.append(
                                f"cell {i + 1}: {out.get('ename')}: {out.get('evalue', '')}"[:300])
                card.kernel_alive = _probe_alive(client, nb)
        finally:
            if old is None:
                os.environ.pop(REPORT_ENV, None)
            else:
                os.environ[REPORT_ENV] = old
        results = read_report(report)
    if save_executed:
        Path(save_executed).parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, save_executed)
    _fill_rows(card, ids, results)
    card.seconds = round(time.perf_counter() - start, 1)
    return card


def read_report(report: Path) -> dict[str, dict]:
    """The ``check`` results a kernel wrote to ``report`` (JSON lines); the last check counts."""
    results: dict[str, dict] = {}
    if Path(report).exists():
        for line in Path(report).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            results[r["exercise_id"]] = r
    return results


def _fill_rows(card: Scorecard, ids: list[str], results: dict[str, dict]) -> None:
    registry = all_exercises()
    for ex_id in ids + [k for k in results if k not in ids]:
        ex = registry.get(ex_id)
        r = results.get(ex_id)
        max_points = ex.points if ex else 0
        title = ex.title if ex else "(unknown exercise)"
        if r is None:
            card.rows.append(Row(ex_id, title, 0, max_points, NOT_RUN,
                                 "its check(...) never ran (did an earlier cell fail?)"))
        else:
            card.rows.append(Row(ex_id, title, r["points"], max_points, r["outcome"],
                                 r.get("message", "")))


def card_from_report(path: str | os.PathLike, report: str | os.PathLike) -> Scorecard:
    """The scorecard of the notebook at ``path`` from the ``check`` results that an execution
    which already happened wrote to ``report`` (CI's nbval run of the learner copies), without
    executing it again. ``kernel_alive`` is taken as true: that run would have failed otherwise."""
    from arcourse.course.config import is_quick

    path = Path(path)
    if not Path(report).exists():
        raise FileNotFoundError(f"no check report at {report}: was {path} executed with "
                                f"{REPORT_ENV} set?")
    card = Scorecard(notebook=str(path), mode="quick" if is_quick() else "full", kernel_alive=True)
    _fill_rows(card, exercise_ids_in(_read(path)), read_report(Path(report)))
    return card


def _alive(client) -> bool:
    from jupyter_core.utils import run_sync

    return bool(run_sync(client.km.is_alive)())


def _probe_alive(client, nb) -> bool:
    try:
        if not _alive(client):
            return False
        probe = nbformat.v4.new_code_cell(f"print('{ALIVE_MARK}')")
        nb.cells.append(probe)
        client.execute_cell(probe, len(nb.cells) - 1)
        nb.cells.pop()
        return any(ALIVE_MARK in o.get("text", "") for o in probe.get("outputs", []))
    except Exception:  # noqa: BLE001
        return False


def render(card: Scorecard, as_json: bool = False) -> str:
    if as_json:
        d = asdict(card)
        d.update(score=card.score, max_score=card.max_score)
        return json.dumps(d, indent=2)
    icons = {PASSED: "✅", "failed": "❌", NOT_ATTEMPTED: "⬜", ERROR: "⚠️", NOT_RUN: "·"}
    width = max([len(r.exercise_id) for r in card.rows] + [8])
    lines = [f"Scorecard for {card.notebook} ({card.mode} mode)", ""]
    lines.append(f"  {'exercise'.ljust(width)}  points  outcome")
    for r in card.rows:
        lines.append(f"  {r.exercise_id.ljust(width)}  {r.points:>2}/{r.max_points:<3}  "
                     f"{icons.get(r.outcome, '?')} {r.outcome}")
        if r.outcome not in (PASSED, NOT_ATTEMPTED) and r.message:
            for m in r.message.splitlines()[:3]:
                lines.append(f"  {''.ljust(width)}           {m}")
    if not card.rows:
        lines.append("  (this notebook has no graded exercises)")
    lines.append("")
    lines.append(f"Total: {card.score}/{card.max_score} points   "
                 f"kernel alive at the end: {'yes' if card.kernel_alive else 'NO'}   "
                 f"time: {card.seconds:.0f} s")
    if card.cell_errors:
        lines.append(f"Cells that raised ({len(card.cell_errors)}):")
        lines.extend(f"  {e}" for e in card.cell_errors[:10])
    return "\n".join(lines)
