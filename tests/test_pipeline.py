"""The one-source-per-chapter pipeline and the command-line grader."""

import json
import subprocess
import sys

import jupytext
import nbformat
import pytest

from arcourse.course import authoring
from arcourse.course.authoring import SolutionMarkerError, strip_solutions


def test_every_generated_notebook_is_in_sync():
    stale = authoring.stale_files()
    assert not stale, "run `make notebooks`: " + "; ".join(stale)


def test_every_chapter_has_a_learner_copy_and_a_pair():
    for md in authoring.chapter_sources():
        for path in (md.with_suffix(".ipynb"), authoring.ROOT / "notebooks" / md.name,
                     authoring.ROOT / "notebooks" / f"{md.stem}.ipynb"):
            assert path.exists(), path


def test_pairs_hold_the_same_cells():
    for md in authoring.chapter_sources():
        text_nb = jupytext.read(md)
        ipynb = nbformat.read(md.with_suffix(".ipynb"), as_version=4)
        assert [c.source for c in text_nb.cells] == [c.source for c in ipynb.cells], md.name
        assert all(not c.get("outputs") for c in ipynb.cells if c.cell_type == "code"), \
            f"{md.with_suffix('.ipynb').name} stores outputs"


def test_learner_copies_hold_no_solutions():
    for md in authoring.chapter_sources():
        learner = (authoring.ROOT / "notebooks" / md.name).read_text()
        assert "BEGIN SOLUTION" not in learner and "END SOLUTION" not in learner
        n_regions = md.read_text().count(authoring.BEGIN)
        assert learner.count("raise NotImplementedError") >= n_regions


def test_every_chapter_checks_at_least_three_exercises_that_exist():
    from arcourse.course.grading import all_exercises

    registry = all_exercises()
    for md in authoring.chapter_sources():
        ids = authoring.exercise_ids_in(jupytext.read(md))
        assert len(ids) >= 3, f"{md.name} has {len(ids)} graded exercises"
        missing = [i for i in ids if i not in registry]
        assert not missing, f"{md.name} checks unregistered exercises {missing}"


def test_strip_keeps_indentation_and_the_rest():
    src = ("def f(x):\n    '''doc'''\n    # BEGIN SOLUTION\n    return 2 * x\n    # END SOLUTION\n"
           "\ncheck('a.b', f)")
    out = strip_solutions(src)
    assert out == ("def f(x):\n    '''doc'''\n    # YOUR CODE HERE\n    raise NotImplementedError\n"
                   "\ncheck('a.b', f)")
    ns = {"check": lambda *a: None}
    exec(out, ns)  # the learner copy still runs
    with pytest.raises(NotImplementedError):
        ns["f"](1)


@pytest.mark.parametrize("src, msg", [
    ("# BEGIN SOLUTION\nx = 1\n# END SOLUTION", "indented"),
    ("def f():\n    # BEGIN SOLUTION\n    return 1", "never closed"),
    ("def f():\n    return 1\n    # END SOLUTION", "without"),
    ("def f():\n    # BEGIN SOLUTION\n    # BEGIN SOLUTION\n", "nested"),
])
def test_malformed_markers_are_named(src, msg):
    with pytest.raises(SolutionMarkerError, match=msg):
        strip_solutions(src)


def test_book_copy_folds_answers():
    md = authoring.chapter_sources()[0]
    nb = authoring.book_notebook(jupytext.read(md))
    for cell in nb.cells:
        if authoring.has_solution(cell):
            assert "hide-input" in cell.metadata["tags"]


def test_grade_cli_scores_a_notebook_and_survives_anything(tmp_path):
    """A notebook with a passing, a failing, an erroring and a crashing exercise, and a cell that
    raises: the grader reports each, and the kernel is alive at the end."""
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import numpy as np\nfrom arcourse.course.grading import check"),
        nbformat.v4.new_code_cell(
            "def one_hot(y, n):\n    return (np.asarray(y)[:, None] == np.arange(n)).astype(float)\n"
            "check('welcome.one_hot', one_hot)"),
        nbformat.v4.new_code_cell("check('welcome.softmax', lambda z: np.exp(z) / np.exp(z).sum())"),
        nbformat.v4.new_code_cell("raise RuntimeError('a learner cell that raises')"),
        nbformat.v4.new_code_cell("import os\ncheck('welcome.log_sum_exp', lambda z: os._exit(3) if False "
                                  "else 1 / 0)"),
    ]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "learner.ipynb"
    nbformat.write(nb, path)
    out = subprocess.run([sys.executable, "-m", "arcourse", "grade", str(path), "--json"],
                         capture_output=True, text=True, timeout=300)
    card = json.loads(out.stdout)
    outcomes = {r["exercise_id"]: r["outcome"] for r in card["rows"]}
    assert outcomes == {"welcome.one_hot": "passed", "welcome.softmax": "failed",
                        "welcome.log_sum_exp": "error"}
    assert card["score"] == 1 and card["max_score"] == 3
    assert card["kernel_alive"] is True
    assert any("RuntimeError" in e for e in card["cell_errors"])
    assert out.returncode == 0

    text = subprocess.run([sys.executable, "-m", "arcourse", "grade", str(path), "--expect", "full"],
                          capture_output=True, text=True, timeout=300)
    assert text.returncode == 1
    assert "Total: 1/3 points" in text.stdout and "kernel alive at the end: yes" in text.stdout


CORE_ONLY = authoring.ROOT / "tools" / "core_only"


def test_grading_needs_no_extras(tmp_path):
    """A plain `pip install` of the repository (no lab/dev/book extras) can grade: the grader and
    its kernel run with everything only the extras install blocked (tools/core_only)."""
    import os

    env = dict(os.environ, PYTHONPATH=str(CORE_ONLY), ARCOURSE_QUICK="1")
    blocked = subprocess.run([sys.executable, "-c", "import jupytext"], env=env,
                             capture_output=True, text=True)
    assert blocked.returncode != 0 and "blocked" in blocked.stderr  # the blocker is in force
    out = subprocess.run([sys.executable, "-m", "arcourse", "grade",
                          str(authoring.ROOT / "notebooks" / "00_welcome.ipynb"), "--expect", "zero",
                          "--save-executed", str(tmp_path / "run.ipynb")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "not attempted" in out.stdout and "Cells that raised" not in out.stdout
    md = subprocess.run([sys.executable, "-m", "arcourse", "grade",
                         str(authoring.ROOT / "notebooks" / "00_welcome.md")],
                        env=env, capture_output=True, text=True, timeout=60)
    assert md.returncode != 0 and "grade its .ipynb" in md.stderr


def test_scorecard_from_a_report_equals_grading_by_execution(tmp_path):
    """CI scores a learner copy from the check results its nbval run wrote: the same card."""
    from arcourse.course.scorecard import card_from_report

    nb = authoring.ROOT / "notebooks" / "00_welcome.ipynb"
    report = tmp_path / "00_welcome.jsonl"
    rows = [{"exercise_id": i, "outcome": "not attempted", "points": 0, "message": ""}
            for i in authoring.exercise_ids_in(nbformat.read(nb, as_version=4))]
    report.write_text("".join(json.dumps(r) + "\n" for r in rows))
    card = card_from_report(nb, report)
    assert card.none_passed and [r.outcome for r in card.rows] == ["not attempted"] * len(rows)
    with pytest.raises(FileNotFoundError, match="ARCOURSE_GRADE_REPORT"):
        card_from_report(nb, tmp_path / "missing.jsonl")


def test_toc_and_readme_list_every_chapter(tmp_path):
    """book/_toc.yml is generated from solutions/ (checked by the sync test); the README's chapter
    table must have a row linking every chapter, and no row for a chapter that does not exist."""
    chapters = {md.name[:2]: f"solutions/{md.name}" for md in authoring.chapter_sources()}
    assert authoring.readme_chapter_rows() == chapters
    toc = (authoring.ROOT / "book" / "_toc.yml").read_text()
    for md in authoring.chapter_sources():
        assert f"chapters/{md.stem}\n" in toc, f"{md.stem} is missing from book/_toc.yml"
    # A chapter added to solutions/ alone makes both checks fail.
    root = tmp_path
    (root / "solutions").mkdir()
    (root / "solutions" / "07_new.md").write_text("")
    (root / "README.md").write_text("| 00 | [welcome](solutions/00_welcome.md) | x |\n")
    assert "chapters/07_new" in authoring.toc_text(root)
    assert "07" not in authoring.readme_chapter_rows(root)


def _claim_calls(function: str = "claim"):
    """(chapter, name node) for every ``claim(...)`` (or ``function(...)``) call in the chapters'
    code cells."""
    import ast

    for md in authoring.chapter_sources():
        nb = jupytext.read(md)
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            src = "\n".join(x for x in cell.source.splitlines() if not x.lstrip().startswith(("%", "!")))
            for node in ast.walk(ast.parse(src)):
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                        and node.func.id == function and node.args):
                    yield md.stem, node.args[0]


def test_every_claim_has_a_recorded_full_mode_value():
    """Quick mode prints each claim's full-mode value beside the quick one: every claim is named
    by a literal string, unique in the course, and ``make verify`` has recorded its value at seed
    offset 0 in arcourse/course/full_values/<chapter>.json."""
    import ast

    from arcourse.course.verify import FULL_VALUES_DIR

    seen: dict[str, str] = {}
    missing = []
    for chapter, node in _claim_calls():
        assert isinstance(node, ast.Constant) and isinstance(node.value, str), (
            f"{chapter}: a claim's name must be a plain string literal (line {node.lineno})")
        name = node.value
        assert name not in seen, f"claim {name!r} is made by both {seen[name]} and {chapter}"
        seen[name] = chapter
        path = FULL_VALUES_DIR / f"{chapter}.json"
        recorded = json.loads(path.read_text())["seeds"].get("0", {}) if path.exists() else {}
        if name not in recorded:
            missing.append(f"{chapter}: {name}")
    assert seen, "no claims found"
    assert not missing, "no full-mode value recorded (run make verify):\n" + "\n".join(missing)


def test_every_full_curve_is_recorded():
    """Every ``full_curve`` a chapter draws in quick mode has its full-mode series recorded at seed
    offset 0, under a literal name unique in the course."""
    import ast

    from arcourse.course.verify import FULL_VALUES_DIR

    seen: dict[str, str] = {}
    missing = []
    for chapter, node in _claim_calls("full_curve"):
        assert isinstance(node, ast.Constant) and isinstance(node.value, str), (
            f"{chapter}: a full_curve's name must be a plain string literal (line {node.lineno})")
        assert node.value not in seen, f"curve {node.value!r} is drawn by {seen[node.value]} and {chapter}"
        seen[node.value] = chapter
        path = FULL_VALUES_DIR / f"{chapter}.json"
        recorded = json.loads(path.read_text()).get("curves", {}).get("0", {}) if path.exists() else {}
        if node.value not in recorded:
            missing.append(f"{chapter}: {node.value}")
    assert not missing, "no full-mode curve recorded (run make verify):\n" + "\n".join(missing)


def test_full_curve_records_in_full_mode_and_returns_it_in_quick_mode(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from arcourse.course import verify

    report = tmp_path / "claims.jsonl"
    monkeypatch.setattr(verify, "FULL_VALUES_DIR", tmp_path)
    monkeypatch.setenv(verify.REPORT_ENV, str(report))
    monkeypatch.delenv("ARCOURSE_QUICK", raising=False)
    verify.full_curves.cache_clear()
    try:
        steps = list(range(1000))
        assert verify.full_curve("demo curve", step=steps, val=[1 / (1 + s) for s in steps],
                                 tiny=[1e-11 * (1 + s) for s in steps]) is None
        records = [json.loads(x) for x in report.read_text().splitlines()]
        series = records[0]["series"]
        assert len(series["step"]) == verify.MAX_CURVE_POINTS
        assert series["step"][0] == 0 and series["step"][-1] == 999  # thinned, ends kept
        assert series["tiny"][0] == 1e-11  # six significant digits, not six decimals
        verify.record_full_values("99_demo", 0, [], 1.0, records)
        monkeypatch.setenv("ARCOURSE_QUICK", "1")
        ref = verify.full_curve("demo curve", step=[0, 1], val=[5.0, 4.0])
        assert ref["step"] == series["step"] and ref["val"][0] == 1.0
        assert verify.full_curve("never recorded", step=[0]) is None
        fig, ax = plt.subplots()
        line = verify.show_full_mode(ax, ref, "step", "val", label="validation")
        assert line.get_label() == "validation (full mode)" and line.get_linestyle() == "--"
        assert verify.show_full_mode(ax, None, "step", "val") is None
        with pytest.raises(KeyError, match="train"):
            verify.show_full_mode(ax, ref, "step", "train")
        plt.close(fig)
        with pytest.raises(ValueError, match="equal lengths"):
            verify.full_curve("bad", step=[0, 1], val=[1.0])
        # a run without curves drops that seed's curves
        verify.record_full_values("99_demo", 0, [], 1.0)
        assert verify.full_curve("demo curve", step=[0]) is None
    finally:
        verify.full_curves.cache_clear()
        verify.full_values.cache_clear()


def test_quick_mode_claim_prints_the_full_mode_value(tmp_path, monkeypatch, capsys):
    from arcourse.course import verify

    monkeypatch.setenv("ARCOURSE_QUICK", "1")
    monkeypatch.setattr(verify, "FULL_VALUES_DIR", tmp_path)
    verify.full_values.cache_clear()
    try:
        verify.record_full_values("99_demo", 0, [{"name": "demo loss", "value": 0.0034}], 12.0)
        verify.record_full_values("99_demo", 1, [{"name": "demo loss", "value": 0.0041}], 13.0)
        assert verify.claim("demo loss", 0.41, at_most=0.01) is None
        out = capsys.readouterr().out
        assert "0.4100" in out and "full mode reached 0.0034" in out, out
        verify.claim("never recorded", 1.0, at_least=0.0)
        assert "not recorded" in capsys.readouterr().out
        # a quantity quick mode does not measure (a model it does not train) is said to be so
        assert verify.claim("demo loss", float("nan"), at_most=0.01) is None
        out = capsys.readouterr().out
        assert "not measured in quick mode" in out and "full mode reached 0.0034" in out, out
        assert "nan" not in out, out
        # a later run at seed 0 replaces that seed's table: a claim no longer made disappears
        verify.record_full_values("99_demo", 0, [{"name": "other", "value": 1.0}], 12.0)
        assert "0" not in verify.full_values()["demo loss"]
    finally:
        verify.full_values.cache_clear()


def test_recorded_full_values_are_strict_json_and_refuse_non_finite(tmp_path, monkeypatch):
    """Every recorded full-mode value is a finite number (strict JSON: no Infinity or NaN), and
    recording a non-finite claim value fails, naming the claim."""
    import json

    import pytest

    from arcourse.course import verify

    def refuse(constant):
        raise AssertionError(f"non-finite constant {constant} in a full_values file")

    for path in sorted(verify.FULL_VALUES_DIR.glob("*.json")):
        json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)
    monkeypatch.setattr(verify, "FULL_VALUES_DIR", tmp_path)
    with pytest.raises(ValueError, match="never solved"):
        verify.record_full_values("99_x", 0, [{"name": "never solved", "value": float("inf")}], 1.0)
    assert not list(tmp_path.iterdir())
