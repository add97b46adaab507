"""Claims a chapter makes about its numbers, checked where they are made.

A chapter states a number (``claim("gated PixelCNN test bits/dim", bpd, at_most=1.85)``); in full
mode the line prints PASS or FAIL against its target, and ``make verify`` collects every claim of
every chapter into one table. In quick mode budgets are tiny, so claims are shown but not judged;
each then prints, beside its quick value, the value full mode reached, as ``make verify`` last
recorded it in ``arcourse/course/full_values/<chapter>.json`` (one file per chapter, one table per
seed offset), so a learner in quick mode still sees the number the chapter's argument rests on.

Figures get the same treatment: ``ref = full_curve("name", step=steps, val=losses)`` records the
named series in a full-mode ``make verify`` run and, in quick mode, returns the series full mode
recorded, which ``show_full_mode(ax, ref, "step", "val")`` draws dashed beside the quick curve.
"""

from __future__ import annotations

import json
import math
import os
from functools import lru_cache
from pathlib import Path

from arcourse.course.config import is_quick, seed

__all__ = ["claim", "full_curve", "show_full_mode", "REPORT_ENV", "FULL_VALUES_DIR",
           "full_values", "full_curves", "record_full_values"]

REPORT_ENV = "ARCOURSE_VERIFY_REPORT"
FULL_VALUES_DIR = Path(__file__).with_name("full_values")


def _recorded(section: str) -> dict[str, dict[str, object]]:
    """One section ("seeds" or "curves") of every chapter's full_values file:
    name -> {seed offset (as a string) -> what was recorded}."""
    out: dict[str, dict[str, object]] = {}
    for path in sorted(FULL_VALUES_DIR.glob("*.json")):
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        for seed_key, entries in data.get(section, {}).items():
            for name, entry in entries.items():
                out.setdefault(name, {})[seed_key] = entry
    return out


@lru_cache(maxsize=1)
def full_values() -> dict[str, dict[str, float]]:
    """Every recorded full-mode value: claim name -> {seed offset (as a string) -> value}."""
    return {name: {k: float(v) for k, v in by_seed.items()}
            for name, by_seed in _recorded("seeds").items()}


@lru_cache(maxsize=1)
def full_curves() -> dict[str, dict[str, dict[str, list[float]]]]:
    """Every recorded full-mode curve: name -> {seed offset (as a string) -> {series -> values}}."""
    return _recorded("curves")


def record_full_values(chapter: str, seed_offset: int, claims: list[dict],
                       run_seconds: float, curves: list[dict] | None = None) -> Path:
    """Store one full-mode run's claim values (and curves) for ``chapter`` at ``seed_offset``.

    The seed's tables are replaced as a whole, so a claim or a curve the chapter no longer makes
    disappears.
    """
    path = FULL_VALUES_DIR / f"{chapter}.json"
    bad = [c["name"] for c in claims if not math.isfinite(float(c["value"]))]
    if bad:  # strict JSON has no inf or nan, and a full-mode value must be a measured number
        raise ValueError(f"{chapter}: claims {bad} have non-finite values in full mode; "
                         "report a finite measurement (a bound, if that is what was measured)")
    data = json.loads(path.read_text(encoding="utf-8")) if path.exists() else {}
    data.setdefault("seeds", {})[str(seed_offset)] = {c["name"]: round(float(c["value"]), 6)
                                                      for c in claims}
    if curves:
        data.setdefault("curves", {})[str(seed_offset)] = {c["name"]: c["series"] for c in curves}
    elif str(seed_offset) in data.get("curves", {}):
        del data["curves"][str(seed_offset)]
    if "curves" in data:
        data["curves"] = dict(sorted(data["curves"].items()))
        if not data["curves"]:
            del data["curves"]
    data.setdefault("run_seconds", {})[str(seed_offset)] = round(float(run_seconds), 1)
    data["seeds"] = dict(sorted(data["seeds"].items()))
    data["run_seconds"] = dict(sorted(data["run_seconds"].items()))
    FULL_VALUES_DIR.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n", encoding="utf-8")
    full_values.cache_clear()
    full_curves.cache_clear()
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
    if is_quick() and math.isnan(value):  # a quantity quick mode does not measure (no run)
        print(f"claim: {name}: not measured in quick mode (target {rel} {target:g}; "
              f"{_full_mode_note(name)})")
    else:
        print(f"claim: {name} = {value:.4f}{unit_s} (target {rel} {target:g}) {verdict}")
    path = os.environ.get(REPORT_ENV)
    if path:
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"name": name, "value": value, "target": f"{rel} {target:g}",
                                "unit": unit, "ok": result}) + "\n")
    return result


MAX_CURVE_POINTS = 200  # a recorded curve is thinned to this many points (evenly spaced)


def _recorded_for_this_seed(recorded: dict):
    here = str(seed(0))
    if here in recorded:
        return recorded[here]
    return recorded.get("0") or (next(iter(recorded.values())) if recorded else None)


def full_curve(name: str, **series) -> dict[str, list[float]] | None:
    """A figure's curve as full mode draws it, for a quick-mode run to show beside its own.

    ``series`` are equal-length 1-D sequences (for example ``step=steps, val=losses``). In full
    mode, under ``make verify``, they are recorded (thinned to :data:`MAX_CURVE_POINTS` points, six
    significant digits, so a gradient norm of 1e-11 survives) in
    ``arcourse/course/full_values/<chapter>.json`` and ``None`` is returned: the figure already
    shows the full-mode curve. In quick mode the recorded series are returned as a dict of lists
    (``None`` if ``make verify`` has not recorded this name), ready for :func:`show_full_mode`.

    >>> ref = full_curve("ch02 validation loss", step=steps, val=val_losses)  # doctest: +SKIP
    """
    import numpy as np

    if not isinstance(name, str) or not name:
        raise TypeError(f"full_curve: name must be a non-empty string, got {name!r}")
    if not series:
        raise ValueError("full_curve: give at least one series, e.g. step=..., val=...")
    cols = {}
    for key, values in series.items():
        arr = np.asarray(values, dtype=float).ravel()
        if arr.size == 0:
            raise ValueError(f"full_curve: series {key!r} is empty")
        cols[key] = arr
    lengths = {k: v.size for k, v in cols.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"full_curve: series must have equal lengths, got {lengths}")
    if is_quick():
        return _recorded_for_this_seed(full_curves().get(name, {}))
    path = os.environ.get(REPORT_ENV)
    if path:
        n = next(iter(lengths.values()))
        keep = np.unique(np.linspace(0, n - 1, min(n, MAX_CURVE_POINTS)).round().astype(int))
        record = {"kind": "curve", "name": name,
                  "series": {k: [float(f"{x:.6g}") for x in v[keep]] for k, v in cols.items()}}
        with open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    return None


def show_full_mode(ax, ref: dict | None, x: str, y: str, label: str | None = None, **style):
    """Draw a curve :func:`full_curve` returned, dashed, on the matplotlib axis ``ax``.

    Does nothing (and returns ``None``) when ``ref`` is ``None``, that is in full mode or when no
    full-mode run has been recorded, so a chapter calls it unconditionally. ``label`` gets
    " (full mode)" appended; other keyword arguments go to ``ax.plot``.
    """
    if ref is None:
        return None
    for key in (x, y):
        if key not in ref:
            raise KeyError(f"show_full_mode: no series {key!r} in the recorded curve "
                           f"(it has {sorted(ref)})")
    style.setdefault("linestyle", "--")
    style.setdefault("alpha", 0.8)
    if label is not None:
        style["label"] = f"{label} (full mode)"
    (line,) = ax.plot(ref[x], ref[y], **style)
    return line
