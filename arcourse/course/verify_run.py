"""``make verify``: execute every chapter in full mode and check the numbers it claims.

Each chapter states its numbers with :func:`arcourse.course.verify.claim`; here every claim is collected
from a fresh full-mode run, and one table is printed: chapter, claim, value, target, PASS/FAIL,
and the chapter's run time (the design's budget: about 3 minutes on a 2-core CPU).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from arcourse.course.authoring import ROOT, chapter_sources
from arcourse.course.config import seed
from arcourse.course.verify import REPORT_ENV, record_full_values

TIME_BUDGET_S = 200  # "about 3 minutes", with a little room
QUICK_BUDGET_S = 30  # quick mode: the check-edit loop of a learner, and CI's cost per chapter


def slowest_cells(nb, n: int = 6) -> list[tuple[float, str]]:
    """The ``n`` slowest code cells of an executed notebook: (seconds, first line of the cell)."""
    from datetime import datetime

    out = []
    for cell in nb.cells:
        timing = cell.get("metadata", {}).get("execution", {})
        start, end = timing.get("iopub.execute_input"), timing.get("shell.execute_reply")
        if cell.cell_type == "code" and start and end:
            seconds = (datetime.fromisoformat(end.replace("Z", "+00:00"))
                       - datetime.fromisoformat(start.replace("Z", "+00:00"))).total_seconds()
            first = next((x for x in cell.source.splitlines() if x.strip()), "")
            out.append((seconds, first[:70]))
    return sorted(out, reverse=True)[:n]


def run_chapter(ipynb: Path, report: Path, quick: bool = False,
                cold: bool = False) -> tuple[float, str]:
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(ipynb, as_version=4)
    env_before = dict(os.environ)
    os.environ.pop("ARCOURSE_QUICK", None)
    if quick:
        os.environ["ARCOURSE_QUICK"] = "1"
    os.environ[REPORT_ENV] = str(report)
    os.environ.setdefault("ARCOURSE_PROGRESS", "off")
    if cold:  # an empty compilation cache of its own, next to the claims report
        os.environ["JAX_COMPILATION_CACHE_DIR"] = str(report.parent / "jax-cache")
    start = time.perf_counter()
    error = ""
    try:
        NotebookClient(nb, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(ipynb.parent)}}).execute()
    except Exception as e:  # noqa: BLE001 - report and carry on with the next chapter
        error = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
    finally:
        os.environ.clear()
        os.environ.update(env_before)
    seconds = time.perf_counter() - start
    # the executed copy, to read the numbers off
    saved = ROOT / "build" / ("verify-quick" if quick else "verify") / ipynb.name
    saved.parent.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, saved)
    print(f"  {seconds:.0f} s (executed copy: {saved.relative_to(ROOT)}); slowest cells:", flush=True)
    for cell_s, first in slowest_cells(nb):
        print(f"    {cell_s:6.1f} s  {first}", flush=True)
    return seconds, error


# A fixed reference: the time to compile the same 40 tiny programs in quick mode, from an empty
# cache. Machines differ and a shared VM's speed drifts (by up to 2x within an hour, measured), so
# a quick-mode time is reported beside it, measured in the same run.
_SPEED_REFERENCE = """
import os, tempfile, time
os.environ["ARCOURSE_QUICK"] = "1"
os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp()
import arcourse, jax.numpy as jnp
start = time.perf_counter()
for n in range(1, 21):
    (jnp.ones((n, 3)) * 2.0).block_until_ready()
print((time.perf_counter() - start) / 40 * 1000)
"""


def machine_speed_ms() -> float:
    """Milliseconds to compile one tiny program in quick mode (:data:`_SPEED_REFERENCE`), measured
    now in a fresh process; ``nan`` if that fails. Lower is a faster machine."""
    import math
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _SPEED_REFERENCE], capture_output=True,
                         text=True, cwd=ROOT)
    try:
        return float(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return math.nan


def run_verify(chapters: list[str] | None = None, quick: bool = False, cold: bool = False) -> int:
    """Run the chapters in full mode (claims judged, values recorded), or with ``quick`` in quick
    mode, where only the run time is judged, against :data:`QUICK_BUDGET_S`. With ``cold``, each
    chapter starts from an empty compilation cache (a learner's first run), not the shared one."""
    sources = chapter_sources()
    budget = QUICK_BUDGET_S if quick else TIME_BUDGET_S
    if chapters:
        sources = [s for s in sources if any(s.stem.startswith(c) or c in s.stem for c in chapters)]
    rows, ok = [], True
    for md in sources:
        ipynb = ROOT / "solutions" / f"{md.stem}.ipynb"
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "claims.jsonl"
            mode = "quick" if quick else "full"
            print(f"running {ipynb.relative_to(ROOT)} in {mode} mode ...", flush=True)
            seconds, error = run_chapter(ipynb, report, quick=quick, cold=cold)
            records = ([json.loads(x) for x in report.read_text().splitlines()]
                       if report.exists() else [])
        claims = [] if quick else [r for r in records if r.get("kind", "claim") == "claim"]
        curves = [] if quick else [r for r in records if r.get("kind") == "curve"]
        fits = [r for r in records if r.get("kind") == "fit"]
        if fits:
            train_s = sum(r["seconds"] for r in fits)
            compile_s = sum(r["compile_seconds"] or 0.0 for r in fits)
            print(f"  training: {len(fits)} fit runs, {train_s:.0f} s, of which about "
                  f"{compile_s:.0f} s compiling (first chunk beyond a typical one); devices "
                  f"{sorted({r['devices'] for r in fits})}", flush=True)
        if (claims or curves) and not error:
            stored = record_full_values(md.stem, seed(0), claims, seconds, curves)
            print(f"  full-mode values recorded in {stored.relative_to(ROOT)} "
                  f"(seed offset {seed(0)})", flush=True)
        in_time = seconds <= budget
        ok &= in_time and not error and all(c["ok"] for c in claims)
        rows.append((md.stem, f"{mode} mode run time", f"{seconds:.0f} s", f"<= {budget} s",
                     "PASS" if in_time else "FAIL"))
        if error:
            rows.append((md.stem, "executes without error", error[:60], "no error", "FAIL"))
        for c in claims:
            rows.append((md.stem, c["name"], f"{c['value']:.4f} {c['unit']}".strip(), c["target"],
                         "PASS" if c["ok"] else "FAIL"))
    widths = [max(len(str(r[i])) for r in rows + [("chapter", "claim", "value", "target", "result")])
              for i in range(5)]
    header = ("chapter", "claim", "value", "target", "result")
    print()
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(r, widths)))
    if quick:
        print(f"this machine's speed: {machine_speed_ms():.1f} ms per tiny program compiled "
              "(a fixed reference, measured now)")
        print(f"\nmake verify QUICK=1: {'every chapter' if ok else 'NOT every chapter'} ran without "
              f"error within {QUICK_BUDGET_S} s")
    else:
        print(f"\nmake verify: {'all claims hold' if ok else 'SOME CLAIMS FAIL'}")
    return 0 if ok else 1
