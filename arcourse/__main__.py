"""Command line: ``python -m arcourse grade PATH [--json]``, ``notebooks``, ``check-sync``,
``book-chapters`` and ``verify``."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arcourse", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("grade", help="execute a learner's notebook in a fresh kernel and score it")
    g.add_argument("path", help="the notebook (.ipynb, or a Jupytext .md)")
    g.add_argument("--json", action="store_true", help="print the scorecard as JSON")
    g.add_argument("--cell-timeout", type=float, default=900, help="seconds per cell (default 900)")
    g.add_argument("--expect", choices=["full", "zero"],
                   help="exit non-zero unless every exercise passed (full) / none did (zero)")
    g.add_argument("--save-executed", metavar="PATH", help="also write the executed notebook here")
    g.add_argument("--from-report", metavar="JSONL",
                   help="do not execute: score the check results an earlier execution wrote here "
                        "(CI: nbval runs the learner copies with ARCOURSE_GRADE_REPORT set)")

    sub.add_parser("notebooks", help="write solutions/*.ipynb and notebooks/ from solutions/*.md")
    sub.add_parser("check-sync", help="fail if any generated notebook is stale")
    b = sub.add_parser("book-chapters", help="write book/chapters/ (answers folded) from solutions/")
    b.add_argument("--executed", metavar="DIR",
                   help="reuse the chapters already executed in DIR instead of executing them again")

    v = sub.add_parser("verify", help="run every chapter in full mode and check its claims")
    v.add_argument("chapters", nargs="*", help="chapter numbers or slugs (default: all)")
    v.add_argument("--quick", action="store_true",
                   help="run in quick mode and judge only the run time (at most 30 s a chapter)")
    v.add_argument("--cold", action="store_true",
                   help="run each chapter with an empty JAX compilation cache, as a learner's "
                        "first run does")

    args = parser.parse_args(argv)
    if args.command == "grade":
        from arcourse.course.scorecard import card_from_report, grade_notebook, render

        if args.from_report:
            card = card_from_report(args.path, args.from_report)
        else:
            card = grade_notebook(args.path, cell_timeout=args.cell_timeout,
                                  save_executed=args.save_executed)
        print(render(card, as_json=args.json))
        if args.expect == "full":  # full marks, and no cell of the notebook raised
            return 0 if card.all_passed and not card.cell_errors and card.kernel_alive else 1
        if args.expect == "zero":
            return 0 if card.none_passed else 1
        return 0 if card.kernel_alive else 1
    if args.command == "notebooks":
        from arcourse.course.authoring import generate

        generate()
        return 0
    if args.command == "check-sync":
        from arcourse.course.authoring import stale_files

        stale = stale_files()
        for s in stale:
            print(f"stale: {s}")
        if stale:
            print("run `make notebooks` to regenerate them from solutions/*.md")
            return 1
        print("all notebooks are in sync with their sources")
        return 0
    if args.command == "book-chapters":
        from arcourse.course.authoring import write_book_chapters

        for p in write_book_chapters(executed=args.executed):
            print(f"wrote {p}")
        return 0
    if args.command == "verify":
        from arcourse.course.verify_run import run_verify

        return run_verify(args.chapters, quick=args.quick, cold=args.cold)
    return 2


if __name__ == "__main__":
    sys.exit(main())
