"""Where a chapter's quick-mode run spends its time: per cell, and its compilation per program.

    .venv/bin/python tools/profile_compiles.py 11            # empty compilation cache (cold)
    .venv/bin/python tools/profile_compiles.py 11 --warm     # with build/jax-cache

Runs the chapter's solution notebook in quick mode in a fresh kernel, with a ``jax.monitoring``
listener that adds up XLA's backend compile time of every program (by its name, e.g.
``jit(run_chunk)``, or ``jit(multiply)`` for an eager op) and of every cell, and JAX's tracing
and lowering time. Then prints the total run time, where JAX spent its part of it, the costliest
programs, and the slowest cells with their wall time beside their compile time. What a cell
spends outside compilation is mostly running its programs (quick mode compiles them
unoptimised) and tracing and lowering them. Measure with nothing else running.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

LISTENER = '''
import collections as _collections, jax.monitoring as _monitoring
_PROGRAMS = _collections.defaultdict(lambda: [0, 0.0])
_CELLS = _collections.defaultdict(lambda: [0, 0.0])
_EVENTS = _collections.defaultdict(lambda: [0, 0.0])
_WALL = _collections.defaultdict(float)
_CELL = ["(setup)"]
import time as _time
_START = [_time.perf_counter()]
def _post_run(result):
    _WALL[_CELL[0]] += _time.perf_counter() - _START[0]
def _pre_run(info):
    _START[0] = _time.perf_counter()
    lines = [x for x in info.raw_cell.splitlines() if x.strip()]
    _CELL[0] = lines[0][:70] if lines else "?"
def _on_duration(event, seconds, **kw):
    _EVENTS[event.rsplit("/", 1)[-1]][0] += 1
    _EVENTS[event.rsplit("/", 1)[-1]][1] += seconds
    if event.endswith("backend_compile_duration"):
        for table, key in ((_PROGRAMS, kw.get("fun_name", "?")), (_CELLS, _CELL[0])):
            table[key][0] += 1
            table[key][1] += seconds
get_ipython().events.register("pre_run_cell", _pre_run)
get_ipython().events.register("post_run_cell", _post_run)
_monitoring.register_event_duration_secs_listener(_on_duration)
'''

DUMP = '''
import json as _json
with open({path!r}, "w") as _f:
    _json.dump({{"programs": dict(_PROGRAMS), "cells": dict(_CELLS), "events": dict(_EVENTS),
                "wall": dict(_WALL)}}, _f)
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("chapter", help="chapter number, e.g. 11")
    parser.add_argument("--warm", action="store_true",
                        help="use build/jax-cache instead of an empty compilation cache")
    parser.add_argument("--top", type=int, default=15, help="rows per table (default 15)")
    args = parser.parse_args(argv)

    import nbformat
    from nbclient import NotebookClient

    matches = sorted(ROOT.glob(f"solutions/{args.chapter}_*.ipynb"))
    if len(matches) != 1:
        print(f"chapter {args.chapter!r}: expected one solutions/{args.chapter}_*.ipynb, "
              f"found {[m.name for m in matches]}", file=sys.stderr)
        return 2
    nb = nbformat.read(matches[0], as_version=4)
    scratch = Path(tempfile.mkdtemp(prefix="arcourse-profile-"))
    stats = scratch / "stats.json"
    nb.cells.insert(0, nbformat.v4.new_code_cell(LISTENER))
    nb.cells.append(nbformat.v4.new_code_cell(DUMP.format(path=str(stats))))
    cache = ROOT / "build" / "jax-cache" if args.warm else scratch / "jax-cache"
    env_before = dict(os.environ)
    os.environ.update(ARCOURSE_QUICK="1", ARCOURSE_PROGRESS="off",
                      JAX_COMPILATION_CACHE_DIR=str(cache))
    start = time.perf_counter()
    try:
        NotebookClient(nb, timeout=1800, kernel_name="python3",
                       resources={"metadata": {"path": str(matches[0].parent)}}).execute()
        total = time.perf_counter() - start
        data = json.loads(stats.read_text())
    finally:
        os.environ.clear()
        os.environ.update(env_before)
        shutil.rmtree(scratch, ignore_errors=True)

    sys.path.insert(0, str(ROOT))
    from arcourse.course.verify_run import machine_speed_ms

    reference = machine_speed_ms()
    programs, cells = data["programs"], data["cells"]
    compile_s = sum(s for _, s in programs.values())
    count = sum(n for n, _ in programs.values())
    print(f"{matches[0].name} ({'warm' if args.warm else 'cold'} cache): {total:.1f} s in all, "
          f"{compile_s:.1f} s compiling {count} programs")
    print(f"this machine's speed now: {reference:.1f} ms per tiny program compiled (a fixed reference "
          "measured right after; compare runs only at similar values)")
    print("JAX's share, by stage: " + ", ".join(
        f"{name.removesuffix('_duration').removesuffix('_sec')} {s:.1f} s"
        for name, (n, s) in sorted(data["events"].items(), key=lambda kv: -kv[1][1])
        if not name.startswith("compile_time_saved")))
    print("\ncompile time by program:")
    for name, (n, s) in sorted(programs.items(), key=lambda kv: -kv[1][1])[:args.top]:
        print(f"  {s:7.2f} s  x{n:4d}  {name}")
    print("\nslowest cells (by first line): wall time, compile time, programs compiled")
    for name, wall in sorted(data["wall"].items(), key=lambda kv: -kv[1])[:args.top]:
        n, s = cells.get(name, (0, 0.0))
        print(f"  {wall:7.2f} s  {s:6.2f} s  x{n:4d}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
