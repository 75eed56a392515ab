#!/usr/bin/env python
"""Safety–utility benchmark across the miniature worlds (a script that prints measurements, not a test).

Every method on every shipped world (``csulora.world.world_names()``) over a grid of settings: no defense;
``csulora`` (the paper's method, forms factored and block, λ × subspace); ``realign`` (factored and block,
λ × β × k); ``safe-lora`` (τ and top-n). Each variant is written by the real code path (``csulora.sanitize``
with ``Settings(...)``, the same call as ``csulora sanitize --method …``), loaded into PEFT on the world's
aligned model and evaluated with the world's own evaluation (its trained and held-out harmful topics, 240
prompts per group, seed 1234, greedy): refusal on both topics, accuracy on the new task and the original tasks.
Every adapter of every kind (mixed, harmful, benign) is measured under every setting; per adapter also its
geometry (erosion coefficient ``e = ⟨ΔW, D_k⟩/‖D_k‖²`` and ``ρ_F`` for several subspaces).

From the means over each world's *mixed* adapters: the front score of DESIGN.md §5c per world (per method, per
method and form, no defense), the defaults chosen leave-one-world-out, the rule check of the default and the
``METHOD_DEFAULTS`` it recommends.

    nice -n 5 python scripts/bench_safety.py --jobs 2     # docs/safety_benchmark{.md,.json,.png,_<world>.png}
    python scripts/bench_safety.py --quick                # a few settings, one world, one adapter (a temp folder)
    python scripts/bench_safety.py --render               # recompute the scores and redraw from the saved json
    python scripts/bench_safety.py --worlds wide --merge  # measure one world again, keep the others' rows
    python scripts/bench_safety.py --settings 'realign:factored:*:beta=0.75:*' --kinds mixed --merge  # add settings
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from datetime import datetime, timezone
from fnmatch import fnmatch
from multiprocessing import get_context
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the parts: scripts/bench/

from bench.grid import GRID, QUICK, WIDE, _num, grid  # noqa: E402
from bench.outputs import summary, write_outputs  # noqa: E402
from bench.run import EVAL_N, EVAL_SEED, run_world  # noqa: E402

from csulora import world as W  # noqa: E402

SCHEMA = 2


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def _code() -> str:
    """The checkout the numbers come from (``+dirty`` with uncommitted changes to the package or the scripts)."""
    dirty = _git("status", "--porcelain", "--", "csulora", "scripts")
    return (_git("rev-parse", "--short", "HEAD") or "unknown") + ("+dirty" if dirty else "")


def _machine(threads: int, jobs: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores (shared with other jobs), {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")  # fmt: skip


def _merge_settings(saved: dict, measured: dict[str, dict], ids: list[str], info: dict) -> dict:
    """The saved result with the rows of settings ``ids`` on the ``measured`` worlds replaced or added: the saved
    run's description, references and geometry kept, this run recorded under ``info["added"]`` and per world."""
    done = {(w, sid) for w in measured for sid in ids}
    rows = [r for r in saved["rows"] if (r["world"], r["setting"]) not in done]
    for w, m in measured.items():
        rows += m["rows"]
        wd = saved["worlds"].setdefault(w, {k: v for k, v in m.items() if k != "rows"})
        if wd.get("seconds") != m["seconds"]:  # a world already saved: this run's cost recorded beside its own
            wd.setdefault("added", []).append({"settings": len(ids), "seconds": m["seconds"],
                                               "evaluations": m["evaluations"], "errors": m["errors"]})  # fmt: skip
    known = {s["id"] for s in saved["settings"]} | set(ids)
    saved["settings"] = [s for s in grid() if s["id"] in known]
    saved["info"].setdefault("added", []).append({k: info[k] for k in ("command", "code", "started", "wall_s", "kinds")}
                                                 | {"settings": len(ids), "worlds": list(measured)})  # fmt: skip
    saved["info"]["grid"] = info["grid"]
    saved["worlds"] = {n: saved["worlds"][n] for n in W.world_names() if n in saved["worlds"]}
    saved["rows"] = sorted(rows, key=lambda r: list(saved["worlds"]).index(r["world"]))
    return saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a few settings, one world, one adapter (minutes)")
    ap.add_argument("--render", action="store_true", help="recompute scores and redraw .md/.png from the saved .json")
    ap.add_argument("--worlds", help="comma-separated worlds (default: all shipped; --quick: the default world)")
    ap.add_argument("--jobs", type=int, default=1, help="worlds measured in parallel processes")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--settings", help="comma-separated glob patterns of setting ids: measure only those (with "
                    "--merge: replace or add their rows, keep every other row of the saved json)")
    ap.add_argument("--kinds", default=",".join(W.KINDS),
                    help="comma-separated adapter kinds to measure (full fine-tunes only with all of them)")
    ap.add_argument("--merge", action="store_true", help="keep the saved json's other worlds, replace these")
    ap.add_argument("--out", type=Path, help="output stem (default docs/safety_benchmark; --quick: a temp folder)")
    args = ap.parse_args()
    default_out = Path(tempfile.gettempdir()) / "csulora-bench-quick" / "safety_benchmark" if args.quick else (
        REPO / "docs" / "safety_benchmark")  # fmt: skip
    out = args.out or default_out
    if args.render:
        result = json.loads(out.with_suffix(".json").read_text())
        result["info"]["rendered_by"] = _code()
        write_outputs(result, out)
        print(summary(result))
        print(f"redrew {out}.md and the plots from {out}.json")
        return
    names = args.worlds.split(",") if args.worlds else [W.DEFAULT_WORLD] if args.quick else W.world_names()
    for n in names:
        W.world_dir(n)  # an unknown world fails here, before anything runs
    ids = QUICK if args.quick else None
    if args.settings:
        patterns = args.settings.split(",")
        ids = [s["id"] for s in grid() if any(fnmatch(s["id"], p) for p in patterns) and s["id"] in (ids or [s["id"]])]
        if not ids:
            raise SystemExit(f"--settings {args.settings!r}: no setting of the grid matches")
    kinds = tuple(k for k in W.KINDS if k in args.kinds.split(","))
    if not kinds:
        raise SystemExit(f"--kinds {args.kinds!r}: expected some of {', '.join(W.KINDS)}")
    started = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    print(f"worlds {', '.join(names)}; {len(ids) if ids else len(grid())} settings; {args.jobs} job(s)", flush=True)
    t0 = time.perf_counter()
    # the biggest world first, so that parallel jobs finish together
    todo = sorted(names, key=lambda n: -W.world_info(W.world_dir(n))["model"].get("hidden_size", 0))
    if args.jobs > 1 and len(todo) > 1:
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            futures = {n: pool.submit(run_world, n, ids, args.quick, args.threads, kinds=kinds) for n in todo}
            measured = {n: f.result() for n, f in futures.items()}
    else:
        measured = {n: run_world(n, ids, args.quick, args.threads, kinds=kinds) for n in todo}
    wall = time.perf_counter() - t0
    command = "python scripts/bench_safety.py " + shlex.join(sys.argv[1:])
    code = _code()
    result = {"schema": SCHEMA,
              "info": {"command": command.strip(), "code": code, "machine": _machine(args.threads, args.jobs),
                       "started": started, "wall_s": round(wall, 1), "jobs": args.jobs, "threads": args.threads,
                       "eval_n": EVAL_N, "eval_seed": EVAL_SEED, "quick": args.quick, "kinds": list(kinds),
                       "grid": {m: {k: [_num(x) if isinstance(x, float) else x for x in v] for k, v in g.items()}
                                for m, g in GRID.items()},
                       "wide": {m: {k: [_num(x) if isinstance(x, float) else x for x in v] for k, v in g.items()}
                                for m, g in WIDE.items()}},
              "settings": [s for s in grid() if ids is None or s["id"] in ids], "worlds": {}, "rows": []}  # fmt: skip
    if args.merge and args.settings and out.with_suffix(".json").is_file():
        result = _merge_settings(json.loads(out.with_suffix(".json").read_text()), measured, ids, result["info"])
    else:
        if args.merge and out.with_suffix(".json").is_file():
            saved = json.loads(out.with_suffix(".json").read_text())
            result["worlds"] = {w: v for w, v in saved["worlds"].items() if w not in measured}
            result["rows"] = [r for r in saved["rows"] if r["world"] not in measured]
            result["info"]["merged_from"] = {w: saved["info"]["code"] for w in result["worlds"]}
        for n in [n for n in W.world_names() if n in measured or n in result["worlds"]]:  # world order, not run order
            wd = result["worlds"].get(n) or {k: v for k, v in measured[n].items() if k != "rows"}
            result["worlds"][n] = wd
            if n in measured:
                result["rows"] += measured[n]["rows"]
        result["worlds"] = {n: result["worlds"][n] for n in W.world_names() if n in result["worlds"]}
        result["rows"].sort(key=lambda r: list(result["worlds"]).index(r["world"]))
    write_outputs(result, out)
    print(summary(result))
    size = out.with_suffix(".json").stat().st_size
    print(f"wrote {out}.md, {out}.json ({size / 1e6:.2f} MB) and the plots; {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
