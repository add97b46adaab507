"""Grade many notebooks, a few at a time: ``make grade`` runs this on every solution (expect full
marks) and every learner copy (expect zero).

    python tools/grade_all.py --jobs 2 --full solutions/*.ipynb --zero notebooks/*.ipynb \
        --save-executed build/executed

Each notebook is graded by ``python -m arcourse grade`` in its own process and kernel; its
scorecard is printed whole when it finishes (never interleaved with another's). Exits 1 if any
notebook missed its expectation. Two jobs suit a 2-core machine: much of a quick-mode run is
compilation and kernel start-up, which run on one core.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def grade(path: str, expect: str, save_dir: str | None) -> tuple[str, str, int, str, float]:
    cmd = [sys.executable, "-m", "arcourse", "grade", path, "--expect", expect]
    if save_dir and expect == "full":
        cmd += ["--save-executed", str(Path(save_dir) / Path(path).name)]
    start = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True)
    return path, expect, run.returncode, run.stdout + run.stderr, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--full", nargs="*", default=[], help="notebooks that must get full marks")
    p.add_argument("--zero", nargs="*", default=[], help="notebooks that must get zero")
    p.add_argument("--jobs", type=int, default=2, help="notebooks graded at once (default 2)")
    p.add_argument("--save-executed", metavar="DIR", help="write executed solutions here")
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
        futures = [pool.submit(grade, path, expect, args.save_executed) for path, expect in todo]
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
