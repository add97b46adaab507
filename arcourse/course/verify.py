"""Claims a chapter makes about its numbers, checked where they are made.

A chapter states a number (``claim("gated PixelCNN test bits/dim", bpd, at_most=1.85)``); in full
mode the line prints PASS or FAIL against its target, and ``make verify`` collects every claim of
every chapter into one table. In quick mode budgets are tiny, so claims are shown but not judged;
each then prints, beside its quick value, the value full mode reached, as ``make verify`` last
recorded it in ``arcourse/course/full_values/<chapter>.json`` (one file per chapter, one table per
seed offset), so a learner in quick mode still sees the number the chapter's argument rests on.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

from arcourse.course.config import is_quick, seed

__all__ = ["claim", "REPORT_ENV", "FULL_VALUES_DIR", "full_values", "record_full_values"]

REPORT_ENV = "ARCOURSE_VERIFY_REPORT"
FULL_VALUES_DIR = Path(__file__).with_name("full_values")


@lru_cache(maxsize=1)
def full_values() -> dict[str, dict[str, float]]:
    """Every recorded full-mode value: claim name -> {seed offset (as a string) -> value}."""
    out: dict[str, dict[str, float]] = {}
    for path in sorted(FULL_VALUES_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for seed_key, values in data.get("seeds", {}).items():
            for name, value in values.items():
                out.setdefault(name, {})[seed_key] = float(value)
    return out


def record_full_values(chapter: str, seed_offset: int, claims: list[dict],
                       run_seconds: float) -> Path:
    """Store one full-mode run's claim values for ``chapter`` at ``seed_offset``.

    The seed's table is replaced as a whole, so a claim the chapter no longer makes disappears.
    """
    path = FULL_VALUES_DIR / f"{chapter}.json"
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data.setdefault("seeds", {})[str(seed_offset)] = {c["name"]: round(float(c["value"]), 6)
                                                      for c in claims}
    data.setdefault("run_seconds", {})[str(seed_offset)] = round(float(run_seconds), 1)
    data["seeds"] = dict(sorted(data["seeds"].items()))
    data["run_seconds"] = dict(sorted(data["run_seconds"].items()))
    FULL_VALUES_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    full_values.cache_clear()
    return path


def _full_mode_note(name: str) -> str:
    recorded = full_values().get(name, {})
    if not recorded:
        return "full mode: not recorded yet (make verify)"
    here = str(seed(0))
    if here in recorded:
        return f"full mode reached {recorded[here]:.4f}"
    return "full mode reached " + ", ".join(f"{v:.4f} at seed offset {k}"
                                            for k, v in sorted(recorded.items()))


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
        verdict = f"(quick mode: not judged; {_full_mode_note(name)})"
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
