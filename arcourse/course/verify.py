"""Claims a chapter makes about its numbers, checked where they are made.

A chapter states a number (``claim("gated PixelCNN test bits/dim", bpd, at_most=1.85)``); in full
mode the line prints PASS or FAIL against its target, and ``make verify`` collects every claim of
every chapter into one table. In quick mode budgets are tiny, so claims are shown but not judged.
"""

from __future__ import annotations

import json
import os

from arcourse.course.config import is_quick

__all__ = ["claim", "REPORT_ENV"]

REPORT_ENV = "ARCOURSE_VERIFY_REPORT"


def claim(name: str, value: float, *, at_most: float | None = None,
          at_least: float | None = None, unit: str = "") -> bool | None:
    """Print ``value`` against its target; return whether it is met (``None`` in quick mode)."""
    if (at_most is None) == (at_least is None):
        raise ValueError("give exactly one of at_most= or at_least=")
    value = float(value)
    target = at_most if at_most is not None else at_least
    ok = value <= at_most if at_most is not None else value >= at_least
    rel = "<=" if at_most is not None else ">="
    unit_s = f" {unit}" if unit else ""
    if is_quick():
        verdict = "(quick mode: not judged)"
        result = None
    else:
        verdict = "PASS" if ok else "FAIL"
        result = bool(ok)
    print(f"claim: {name} = {value:.4f}{unit_s} (target {rel} {target:g}) {verdict}")
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": value, "target": f"{rel} {target:g}",
                                "unit": unit, "ok": result}) + "\n")
    return result
