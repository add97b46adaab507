"""Grade many notebooks, a few at a time: ``make grade`` runs this on every solution (expect full
marks, no cell raising) and every learner copy (expect zero).

    python tools/grade_all.py --jobs 2 --full solutions/*.ipynb --save-executed build/executed \
        --zero notebooks/*.ipynb --zero-reports build/reports

With ``--zero-reports DIR`` a learner copy is not executed again: its scorecard comes from the
check results that ``make nbval`` (which executed it) wrote to ``DIR/NN_slug.jsonl``. With
``--core-only`` the graders and their kernels run as a plain ``pip install`` of arcourse with no
extras would (``tools/core_only``): CI proves that grading needs nothing more.

Each notebook is graded by ``python -m arcourse grade`` in its own process and kernel; its
scorecard is printed whole when it finishes (never interleaved with another's). Exits 1 if any
notebook missed its expectation. Two jobs suit a 2-core machine: much of a quick-mode run is
compilation and kernel start-up, which run on one core.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

CORE_ONLY = Path(__file__).resolve().parent / "core_only"


def grade(path: str, expect: str, save_dir: str | None, reports: str | None,
          core_only: bool) -> tuple[str, str, int, str, float]:
    cmd = [sys.executable, "-m", "arcourse", "grade", path, "--expect", expect]
    if save_dir and expect == "full":
        cmd += ["--save-executed", str(Path(save_dir) / Path(path).name)]
    if reports and expect == "zero":
        cmd += ["--from-report", str(Path(reports) / f"{Path(path).stem}.jsonl")]
    env = dict(os.environ)
    if core_only:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(CORE_ONLY),
                                                          env.get("PYTHONPATH")]))
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return path, expect, run.returncode, run.stdout + run.stderr, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full", nargs="*", default=[], help="notebooks that must get full marks")
    p.add_argument("--zero", nargs="*", default=[], help="notebooks that must get zero")
    p.add_argument("--jobs", type=int, default=2, help="notebooks graded at once (default 2)")
    p.add_argument("--save-executed", metavar="DIR", help="write executed solutions here")
    p.add_argument("--zero-reports", metavar="DIR",
                   help="score the --zero notebooks from the check reports nbval wrote here")
    p.add_argument("--core-only", action="store_true",
                   help="run as a plain pip install with no extras (tools/core_only)")
    args = p.parse_args(argv)
    if args.jobs < 1:
        p.error(f"--jobs must be a positive integer, got {args.jobs}")
    todo = [(x, "full") for x in args.full] + [(x, "zero") for x in args.zero]
    if not todo:
        p.error("give notebooks with --full and/or --zero")
    if args.save_executed:
        Path(args.save_executed).mkdir(parents=True, exist_ok=True)

    failed = []
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(grade, path, expect, args.save_executed, args.zero_reports,
                               args.core_only) for path, expect in todo]
        for f in futures:
            path, expect, rc, output, seconds = f.result()
            verdict = "ok" if rc == 0 else "FAILED"
            print(f"== {path} (expect {'full marks' if expect == 'full' else 'zero'}): "
                  f"{verdict} in {seconds:.0f} s", flush=True)
            print(output.rstrip(), flush=True)
            if rc != 0:
                failed.append(path)
    if failed:
        print(f"\ngrading: {len(failed)} notebook(s) missed their expectation: {', '.join(failed)}")
        return 1
    print(f"\ngrading: all {len(todo)} notebooks met their expectation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
