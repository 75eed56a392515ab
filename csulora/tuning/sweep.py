"""``csulora sweep``: a ladder of sanitized candidates of one adapter, each measured by the user's own evaluation,
and the point that meets their rule (DESIGN.md §8).

Every point is written by ``api.sanitize`` into ``OUT/<id>/`` and all points draw their subspaces from one
``SubspaceSource`` (the disk cache, or a temporary one with ``--no-cache``): a ladder costs one cold run plus
warm ones. ``OUT/sweep.json`` is rewritten after every point, so a killed sweep resumes with ``--skip-existing``.
"""

from __future__ import annotations

import json
import math
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from ..api import Progress, check_inputs, sanitize
from ..batch import is_complete
from ..cache import SubspaceSource
from ..errors import CsuloraError
from ..io.outputs import replace_file, write_folder
from ..methods import METHODS, validate
from ..models import check_model_inputs, sanitize_model
from ..settings import Settings
from .sweep_render import write_pictures
from .sweep_result import Rule, SweepResult, pick

EVAL_FILE, EVAL_STDERR = "eval.json", "eval.stderr.txt"
STDERR_TAIL = 8192  # bytes of an evaluation's stderr kept in the point's folder
# the grid's fields by their names in point ids and sweep.json settings
GRID_NAMES = {"lam": "lambda", "beta": "beta", "threshold": "tau", "gamma": "gamma"}


@dataclass(frozen=True)
class Point:
    id: str
    method: str
    settings: Settings  # resolved
    grid: dict[str, float | str]  # the grid values of this point, by their sweep.json names (∞ as "inf")


def _number(x: float) -> str:
    return "inf" if math.isinf(x) else f"{x:g}"


def plan(methods: list[str], base: Settings, grids: dict[str, list[float]]) -> list[Point]:
    """The ladder: each method crossed with the grid values that apply to it (``Method.grid``); a grid left
    empty takes the method's default. Points are in the order given, duplicates dropped."""
    points, seen = [], set()
    for name in dict.fromkeys(methods):
        if name not in METHODS:
            raise CsuloraError(f"--method {name!r} is not available; use one of {', '.join(METHODS)}")
        combos: list[dict[str, float | None]] = [{}]
        for f in METHODS[name].grid:
            combos = [{**c, f: v} for c in combos for v in (grids.get(f) or [None])]
        for combo in combos:
            settings = replace(base, method=name, **combo).resolved()
            validate(settings)
            values = {GRID_NAMES[f]: getattr(settings, f) for f in METHODS[name].grid}
            point_id = "-".join([name, *(f"{k}{_number(v)}" for k, v in values.items())])
            grid = {k: "inf" if math.isinf(v) else v for k, v in values.items()}  # as the report writes λ = ∞
            if point_id not in seen:
                seen.add(point_id)
                points.append(Point(point_id, name, settings, grid))
    return points


def point_command(source: Path, aligned: str | None, base: str | None, point: Point, out: Path, model: bool = False,
                  target_modules: str | None = None, allow_swapped: bool = False,
                  pack: str | None = None) -> list[str]:  # fmt: skip
    """The ``csulora sanitize`` command that writes this point's folder by itself (its model card says it)."""
    s = point.settings
    what = ["--model", str(source), *(["--target-modules", target_modules] if target_modules else [])] if model else [
        "--adapter", str(source)]  # fmt: skip
    pair = ["--aligned", aligned] if aligned is not None else ["--subspace", pack]  # DESIGN.md §11: from a pack
    command = ["csulora", "sanitize", *what, *pair, *(["--base", base] if base else []),
               "--method", s.method, *([] if model else ["--form", s.form])]  # fmt: skip
    if "lam" in METHODS[s.method].grid:
        command += ["--lambda", _number(s.lam)]
    if "beta" in METHODS[s.method].grid:
        command += ["--beta", _number(s.beta)]
    if "gamma" in METHODS[s.method].grid:
        command += ["--gamma", _number(s.gamma)]
    if s.method == "safe-lora":
        command += ["--top-n", str(s.top_n)] if s.top_n is not None else ["--threshold", _number(s.threshold)]
    rule = (["--subspace-rank", str(s.subspace_rank)] if s.subspace_rank else
            ["--subspace-energy", f"{s.subspace_energy:g}"])  # fmt: skip
    command += [*rule, "--max-subspace-rank", str(s.max_subspace_rank), "--seed", str(s.seed)]
    return command + (["--exact-svd"] if s.exact_svd else []) + (["--allow-swapped"] if allow_swapped else []) + [
        "-o", str(out)]  # fmt: skip


@dataclass
class Evaluation:
    status: str  # "ok" or "failed"
    metrics: dict[str, float]
    message: str = ""


def evaluate(command: str, folder: Path, timeout: float | None = None) -> tuple[Evaluation, str]:
    """Run ``command`` with ``{adapter}`` replaced by the (shell-quoted) folder; the last non-empty line of its
    stdout must be one JSON object of numbers. Returns the evaluation and the tail of its stderr."""
    cmd = command.replace("{adapter}", shlex.quote(str(folder))).replace("{model}", shlex.quote(str(folder)))
    try:
        proc = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        stderr = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return Evaluation("failed", {}, f"evaluation timed out after {timeout:g} s"), stderr[-STDERR_TAIL:]
    tail = proc.stderr[-STDERR_TAIL:]
    if proc.returncode != 0:
        last = next((ln for ln in reversed(proc.stderr.splitlines()) if ln.strip()), "")
        return Evaluation("failed", {}, f"evaluation exited {proc.returncode}: {last.strip()[:300]}"), tail
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    try:
        metrics = json.loads(lines[-1]) if lines else None
    except ValueError:
        metrics = None
    ok = isinstance(metrics, dict) and metrics and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in metrics.values()
    )  # fmt: skip
    if not ok:
        shown = lines[-1][:200] if lines else "(no output)"
        return Evaluation("failed", {}, f"the last stdout line is not one JSON object of numbers: {shown}"), tail
    return Evaluation("ok", {k: float(v) for k, v in metrics.items()}), tail


def run_sweep(
    adapter: str | Path,
    aligned: str | None,
    base: str | None,
    out: str | Path,
    points: list[Point],
    *,
    eval_cmd: str | None = None,
    eval_timeout: float | None = None,
    rules: list[Rule] | None = None,
    maximize: str | None = None,
    skip_existing: bool = False,
    force: bool = False,
    trust_pickle: bool = False,
    subspaces: SubspaceSource | None = None,
    progress: Progress | None = None,
    plot: tuple[str, str] | None = None,
    jobs: int | None = None,
    model: bool = False,
    target_modules: str | None = None,
    notice: Callable[[str], None] | None = None,
    allow_swapped: bool = False,
) -> SweepResult:
    """Write every point (resuming with ``skip_existing``), evaluate it, pick, and write ``OUT/sweep.json``,
    ``OUT/picked/`` and the pictures. Failures of one point are recorded, not raised. ``model``: the first
    argument is a full fine-tune or merged model (``sanitize_model``), and every point is a whole model: a point
    costs the model's size on disk, which must be free before the first one is written; ``notice`` hears what the
    sweep will take, before it starts."""
    rules = rules or []
    if rules and maximize is None:
        raise CsuloraError("--pick needs --maximize METRIC: which qualifying point is best")
    if force and skip_existing:
        raise CsuloraError("--force and --skip-existing contradict each other; pass one")
    adapter, out = Path(adapter), Path(out)
    if out.exists() and not out.is_dir():
        raise CsuloraError(f"{out}: exists and is not a folder; choose another -o")
    existing = [name for name in ["sweep.json", *(p.id for p in points)] if (out / name).exists()]
    if existing and not (skip_existing or force):
        raise CsuloraError(f"{out}: holds a sweep already ({existing[0]}); pass --skip-existing to resume it or "
                           "--force to redo it")  # fmt: skip
    if model:  # bad input is one error, not N failed points
        if any(p.settings.form != "factored" or p.settings.top_n is not None for p in points):
            raise CsuloraError("--form block and --top-n do not apply to --model: a full model is corrected by each "
                               "method's exact form, Safe LoRA by --thresholds")  # fmt: skip
        size = check_model_inputs(adapter, aligned, base, target_modules, allow_swapped)
        todo = [p for p in points if force or not (skip_existing and is_complete(out / p.id))]
        free = shutil.disk_usage(out if out.exists() else out.parent if out.parent.exists() else Path.cwd()).free
        need = f"{len(todo)} points × {_size(size)} (the model's size) = {_size(size * len(todo))}"
        if size * len(todo) > free:
            raise CsuloraError(f"{out}: {need} needed, and {_size(free)} are free; sweep fewer points or choose "
                               "another -o")  # fmt: skip
        if notice:
            notice(f"every point is a whole model: {need} under {out}")
    else:
        check_inputs(adapter, aligned, base, trust_pickle, subspaces, allow_swapped)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CsuloraError(f"{out}: cannot create it ({e.strerror or e}); check permissions") from e
    result = SweepResult(out, [], rules=rules, maximize=maximize)
    with tempfile.TemporaryDirectory(prefix="csulora-sweep-cache-") as scratch:
        source = subspaces if subspaces is not None else SubspaceSource.open()
        if source.cache is None:  # --no-cache: still one subspace pass for the whole ladder
            source = SubspaceSource.open(scratch)
        write = _writer(adapter, aligned, base, model, target_modules, force or skip_existing, trust_pickle, source,
                        progress, jobs, allow_swapped)  # fmt: skip
        for i, point in enumerate(points):
            if progress:
                progress("points", i, len(points), point.id)
            result.points.append(_point(point, out, write, eval_cmd, eval_timeout, skip_existing))
            _write_json(out, result)
        if progress:
            progress("points", len(points), len(points), "")
    if maximize is not None:
        result.picked = pick(result.points, rules, maximize)
        if result.picked is not None:
            chosen = out / result.picked
            write_folder(out / "picked", lambda tmp: _copy(chosen, tmp), replace=True)
        elif (out / "picked").is_dir():  # a picked/ of an earlier run no longer meets the rule
            shutil.rmtree(out / "picked")
    _write_json(out, result)

    result.notes = write_pictures(result, plot)
    return result


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _writer(source_path, aligned, base, model, target_modules, force, trust_pickle, subspaces, progress, jobs,
            allow_swapped):  # fmt: skip
    """What writes one point's folder: ``sanitize`` of the adapter, or ``sanitize_model`` of the model, with the
    ladder's shared inputs and subspace source."""

    def write(point: Point, folder: Path) -> None:
        command = point_command(source_path, aligned, base, point, folder, model, target_modules, allow_swapped,
                                getattr(getattr(subspaces, "pack", None), "spec", None))
        common = dict(settings=point.settings, force=force, command=command, progress=progress, subspaces=subspaces,
                      jobs=jobs, allow_swapped=allow_swapped)  # fmt: skip
        if model:
            sanitize_model(source_path, aligned, base, folder, target_modules=target_modules, **common)
        else:
            sanitize(source_path, aligned, base, folder, trust_pickle=trust_pickle, **common)

    return write


def _point(point: Point, out: Path, write, eval_cmd: str | None, eval_timeout: float | None,
           skip_existing: bool) -> dict:  # fmt: skip
    folder = out / point.id
    record = {"id": point.id, "method": point.method, "settings": point.grid, "path": point.id, "status": "ok",
              "metrics": {}, "totals": None, "message": ""}  # fmt: skip
    done = skip_existing and is_complete(folder)
    if not done:
        try:
            write(point, folder)
        except CsuloraError as e:
            return {**record, "status": "failed", "message": str(e)}
        except Exception as e:  # an unexpected failure of one point must not lose the others (as in a batch)
            return {**record, "status": "failed", "message": f"internal error: {type(e).__name__}: {e}"}
    record["totals"] = json.loads((folder / "csulora_report.json").read_text())["totals"]
    if eval_cmd is None:
        return record
    saved = folder / EVAL_FILE
    evaluation = _saved_evaluation(saved) if done else None  # a resumed sweep keeps what succeeded, retries failures
    if evaluation is None:
        evaluation, stderr = evaluate(eval_cmd, folder, eval_timeout)
        try:  # kept with the point: what the evaluation said, and the end of its stderr
            replace_file(folder / EVAL_STDERR, lambda tmp: tmp.write_text(stderr))
            # the evaluator's order of metrics, not sorted: a resumed sweep shows its columns as the first run did
            replace_file(saved, lambda tmp: tmp.write_text(json.dumps(vars(evaluation)) + "\n"))
        except OSError as e:
            raise CsuloraError(f"{folder}: cannot write the evaluation ({e.strerror or e})") from e
    return {**record, "status": evaluation.status, "metrics": evaluation.metrics, "message": evaluation.message}


def _saved_evaluation(path: Path) -> Evaluation | None:
    """The successful evaluation a finished point kept, or ``None`` (absent, failed or unreadable: evaluate again)."""
    try:
        evaluation = Evaluation(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return None
    return evaluation if evaluation.status == "ok" else None


def _copy(src: Path, dst: Path) -> None:
    for f in sorted(src.iterdir()):
        shutil.copy2(f, dst / f.name)


def _write_json(out: Path, result: SweepResult) -> None:
    text = json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n"
    try:
        replace_file(out / "sweep.json", lambda tmp: tmp.write_text(text))
    except OSError as e:
        raise CsuloraError(f"{out / 'sweep.json'}: cannot write it ({e.strerror or e}); check space") from e
