"""Batch runs: many adapters against one base/aligned pair; one failing adapter never stops the rest.

Subspaces are computed once for the whole batch: every adapter draws them from one ``SubspaceSource``
backed by the disk cache (a temporary one with ``--no-cache``), so the first adapter that targets a
module computes its subspace and the others load it. Memory stays that of one adapter run.
"""

from __future__ import annotations

import itertools
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from rich.table import Table

from .api import Progress, Result, Settings, audit, default_output, sanitize
from .cache import SubspaceSource
from .errors import CsuloraError, OutputExists
from .io.adapters import CONFIG, WEIGHTS
from .io.checkpoints import parse_ref
from .methods import validate
from .pair_order import check_pair_order
from .parallel import default_workers, ordered
from .reports.report import Report, erosion_words, ratio

_SHARD = re.compile(r"(\d+)/(\d+)")


@dataclass
class Outcome:
    name: str
    adapter: Path
    status: str  # "ok", "skipped" (output already there) or "failed"
    output: Path
    message: str = ""
    report: Report | None = None

    def to_dict(self) -> dict:
        return {
            "name": self.name, "adapter": str(self.adapter), "status": self.status, "output": str(self.output),
            "message": self.message, "totals": self.report.totals() if self.report else None,
        }  # fmt: skip


def is_batch(adapters: list[Path]) -> bool:
    """Several ``--adapter``s, or one folder that holds adapter folders rather than being one."""
    return len(adapters) > 1 or (
        len(adapters) == 1 and adapters[0].is_dir() and not (adapters[0] / CONFIG).is_file()
        and any((d / CONFIG).is_file() for d in adapters[0].iterdir())
    )  # fmt: skip


def find_adapters(paths: list[Path]) -> list[tuple[str, Path]]:
    """``(name, folder)`` per adapter, sorted by name: each path is an adapter folder, or a folder whose
    subfolders holding an ``adapter_config.json`` are adapters. A path that is neither still counts
    (it will fail and be reported) unless it is an existing folder with no adapters at all."""
    found: list[tuple[str, Path]] = []
    for path in paths:
        if path.is_dir() and not (path / CONFIG).is_file():
            subs = sorted(d for d in path.iterdir() if d.is_dir() and (d / CONFIG).is_file())
            if not subs:
                raise CsuloraError(f"{path}: neither an adapter folder (no {CONFIG}) nor a folder of adapter folders")
            found += [(d.name, d) for d in subs]
        else:
            found.append((path.resolve().name, path))
    names = [name for name, _ in found]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise CsuloraError(f"two adapters are named {duplicate!r}; outputs are OUT/<name>, so rename one")
    return sorted(found)


def parse_shard(spec: str | None) -> tuple[int, int]:
    """``i/N`` (1 ≤ i ≤ N) → ``(i, N)``; none means the whole batch, ``(1, 1)``."""
    if spec is None:
        return 1, 1
    m = _SHARD.fullmatch(spec.strip())
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        raise CsuloraError(f"--shard {spec!r}: expected i/N with 1 ≤ i ≤ N, e.g. 1/4 (first of four slices)")
    return int(m[1]), int(m[2])


def select_shard(items: list[tuple[str, Path]], index: int, count: int) -> list[tuple[str, Path]]:
    """The ``index``-th of ``count`` deterministic slices: every ``count``-th adapter in name order."""
    return [item for j, item in enumerate(sorted(items)) if j % count == index - 1]


def default_batch_output(adapters: list[Path]) -> Path:
    if len(adapters) == 1:
        return default_output(adapters[0])
    raise CsuloraError("several --adapter folders: pass -o OUT, which receives one OUT/<name> folder per adapter")


def is_complete(out: Path) -> bool:
    """Output folders appear whole (temp folder, then rename): these two files mean a finished run."""
    return (out / WEIGHTS).is_file() and (out / "csulora_report.json").is_file()


def run_batch(
    adapters: list[Path],
    aligned: str,
    base: str | None,
    output: Path | None,
    *,
    settings: Settings | None = None,
    force: bool = False,
    skip_existing: bool = False,
    shard: str | None = None,
    trust_pickle: bool = False,
    subspaces: SubspaceSource | None = None,
    command: list[str] | None = None,
    progress: Progress | None = None,
    jobs: int | None = None,
    allow_swapped: bool = False,
) -> list[Outcome]:
    """Sanitize each adapter into ``output/<name>/``; failures are recorded in the outcomes, not raised."""
    settings = settings or Settings()
    validate(settings)
    if force and skip_existing:
        raise CsuloraError("--force and --skip-existing contradict each other; pass one")
    index, count = parse_shard(shard)
    _check_pair(aligned, base, allow_swapped)
    items = select_shard(find_adapters(adapters), index, count)
    root = output if output is not None else default_batch_output(adapters)
    present = [name for name, _ in items if (root / name).exists()]
    if present and not (force or skip_existing):  # a rerun: one error up front, not N failed adapters
        more = f" and {len(present) - 1} more" if len(present) > 1 else ""
        raise CsuloraError(f"{root}: holds outputs of this batch already ({present[0]}{more}); pass --skip-existing "
                           "to resume it or --force to replace them")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="csulora-cache-") as scratch:
        source = subspaces if subspaces is not None else SubspaceSource.open()
        if source.cache is None:  # --no-cache: still compute each subspace once for the batch
            source = SubspaceSource.open(scratch)
        outcomes = []
        for i, (name, path) in enumerate(items):
            if progress:
                progress("adapters", i, len(items), name)
            outcomes.append(_one(name, path, root / name, aligned, base, settings, force, skip_existing,
                                 trust_pickle, source, command, progress, jobs, allow_swapped))  # fmt: skip
        if progress:
            progress("adapters", len(items), len(items), "")
    return outcomes


def audit_each(paths: list[Path], aligned: str | None, base: str | None = None, *, jobs: int | None = None,
               progress: Progress | None = None, **kw) -> Iterator[tuple[Path, Result]]:
    """``api.audit`` of each adapter, in order, with one subspace source (``subspaces``, as ``audit`` takes it, shared
    by all). Several adapters: the first alone (it fills the cache the others share), then ``jobs`` (default: the
    usable cores) side by side, one thread each: the same reports, more adapters a minute (BENCHMARKS.md, packs).
    ``progress`` sees the first adapter's phases, then one step per adapter."""
    kw.setdefault("subspaces", SubspaceSource.open())
    workers = min(len(paths), jobs or default_workers(kw.get("settings", Settings()).device))
    if workers <= 1:
        for path in paths:
            yield path, audit(path, aligned, base, progress=progress, jobs=jobs, **kw)
        return
    first = audit(paths[0], aligned, base, progress=progress, jobs=jobs, **kw)
    rest = ordered(lambda p: audit(p, aligned, base, jobs=1, **kw), paths[1:], workers)
    for i, (path, result) in enumerate(itertools.chain([(paths[0], first)], rest)):
        if progress:
            progress("adapters", i + 1, len(paths), str(path))
        yield path, result


def _check_pair(aligned: str, base: str | None, allow_swapped: bool) -> None:
    """A swapped pair the checkpoints' own cards reveal is one error for the batch (exit 2), not N failed adapters;
    what each adapter's config says is checked per adapter."""
    if base is None:
        return
    try:
        refs = parse_ref(aligned), parse_ref(base)
    except CsuloraError:
        return  # each adapter reports it
    check_pair_order(*refs, "--base", allow_swapped=allow_swapped)


def _one(name, path, out, aligned, base, settings, force, skip_existing, trust_pickle, source, command, progress,
         jobs, allow_swapped):  # fmt: skip
    if skip_existing and is_complete(out):
        return Outcome(name, path, "skipped", out, "output exists")
    try:
        result = sanitize(
            path, aligned, base, out, settings=settings, force=force, trust_pickle=trust_pickle,
            command=command, progress=progress, subspaces=source, jobs=jobs, allow_swapped=allow_swapped,
        )  # fmt: skip
    except OutputExists as e:
        if skip_existing and is_complete(out):  # a concurrent batch finished this one first
            return Outcome(name, path, "skipped", out, "written by another run")
        return Outcome(name, path, "failed", out, str(e))
    except CsuloraError as e:
        return Outcome(name, path, "failed", out, str(e))
    except Exception as e:  # an unexpected failure of one adapter must not lose the others
        return Outcome(name, path, "failed", out, f"internal error: {type(e).__name__}: {e}")
    return Outcome(name, path, "ok", out, report=result.report)


def summary_table(outcomes: list[Outcome], title: str | None = None, wide: bool = False) -> Table:
    """One row per adapter: what happened, how the erosion moved, the norm kept, where it went (or why not);
    ``wide`` adds the module count and the energy leaving the subspace."""
    more = ("modules", "leaving before → after") if wide else ()
    table = Table(title=title)
    for col in ("adapter", "status", *more, "erosion", "retained"):
        table.add_column(col, justify="left" if col in ("adapter", "status") else "right", no_wrap=True)
    table.add_column("output / error", overflow="fold")  # an error message is worth its every word
    for o in outcomes:
        if o.report is not None:
            t = o.report.totals()
            extra = [str(t["modules"]), f"{t['leaving_energy_before']:.1%} → {t['leaving_energy_after']:.1%}"]
            cells = [*(extra if wide else []), erosion_words(t["erosion_before"], t["erosion_after"]),
                     ratio(t["retained_norm"]), str(o.output)]  # fmt: skip
        else:
            cells = [*([""] * len(more)), "", "", o.message if o.status == "failed" else f"{o.output} ({o.message})"]
        style = {"ok": "green", "skipped": "yellow", "failed": "red"}[o.status]
        table.add_row(o.name, f"[{style}]{o.status}[/{style}]", *cells)
    return table
