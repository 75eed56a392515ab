"""The ``csulora`` command: parse, call the public API, render. Known errors become one line here."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .api import Settings, precompute_subspaces
from .api import audit as api_audit
from .api import sanitize as api_sanitize
from .batch import is_batch, run_batch, summary_table
from .cache import SubspaceSource
from .errors import CsuloraError, GateFailed
from .report import to_table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make fine-tuned LoRA adapters safe to publish: CSULoRA, the closest safe update.",
)
# Logs and pipes get a wide table instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)

AdapterOpt = Annotated[Path, typer.Option("--adapter", help="PEFT LoRA adapter folder.")]
AdaptersOpt = Annotated[
    list[Path],
    typer.Option("--adapter", help="PEFT LoRA adapter folder, or a folder of them (a batch); may repeat."),
]
AlignedOpt = Annotated[str, typer.Option("--aligned", help="Safety-aligned checkpoint: folder or Hub id org/name@rev.")]
BaseOpt = Annotated[
    str | None,
    typer.Option(help="Pretrained (unaligned) checkpoint. Default: the adapter's base model, or the aligned card's."),
]
OutputOpt = Annotated[Path | None, typer.Option("--output", "-o", help="Output folder (default: <adapter>-sanitized).")]
LambdaOpt = Annotated[float, typer.Option("--lambda", help="Attenuation strength λ ≥ 0 (0 = unchanged).")]
RankOpt = Annotated[int | None, typer.Option(help="Fixed subspace rank k (overrides --subspace-energy).")]
EnergyOpt = Annotated[float, typer.Option(help="Choose k to hold this fraction η of ‖D‖².")]
MaxRankOpt = Annotated[int, typer.Option(help="Cap on the subspace rank.")]
ExactOpt = Annotated[bool, typer.Option("--exact-svd", help="Exact SVD instead of the seeded randomized one.")]
SeedOpt = Annotated[int, typer.Option(help="Seed of the randomized SVD.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu or cuda.")]
PickleOpt = Annotated[bool, typer.Option("--trust-pickle", help="Allow adapter_model.bin (loaded weights-only).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no table.")]
CacheDirOpt = Annotated[
    Path | None,
    typer.Option(help="Subspace cache folder (default $CSULORA_CACHE, $XDG_CACHE_HOME/csulora, ~/.cache/csulora)."),
]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the subspace cache.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _version(value: bool) -> None:
    if value:
        out.print(f"csulora {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")] = (
        False
    ),
) -> None:
    pass


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """The one place where known failures become one line and an exit code."""
    try:
        yield
    except CsuloraError as e:
        if debug:
            raise
        err.print(f"[red]error:[/red] {e}", markup=True, highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except GateFailed as e:
        err.print(f"[red]failed:[/red] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            raise
        err.print(f"[red]internal error:[/red] {type(e).__name__}: {e} (rerun with --debug for a traceback)")
        raise typer.Exit(1) from None


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int, str], None] | None]:
    """One bar per phase (adapters, reading, subspaces, writing), on stderr, only when it is a terminal."""
    if quiet or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[item]}"), console=err, transient=True,
    ) as bar:  # fmt: skip
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int, item: str) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, item="")
            bar.update(tasks[phase], completed=done, total=total, item=item)

        yield update


def _source(cache_dir: Path | None, no_cache: bool) -> SubspaceSource:
    return SubspaceSource.open(cache_dir, enabled=not no_cache)


def _settings(lam, subspace_rank, subspace_energy, max_subspace_rank, exact_svd, seed, device) -> Settings:
    return Settings(
        lam=lam,
        subspace_rank=subspace_rank,
        subspace_energy=subspace_energy,
        max_subspace_rank=max_subspace_rank,
        exact_svd=exact_svd,
        seed=seed,
        device=device,
    )


@app.command()
def sanitize(
    adapter: AdaptersOpt,
    aligned: AlignedOpt,
    base: BaseOpt = None,
    output: OutputOpt = None,
    lam: LambdaOpt = 1.0,
    subspace_rank: RankOpt = None,
    subspace_energy: EnergyOpt = 0.5,
    max_subspace_rank: MaxRankOpt = 256,
    exact_svd: ExactOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Batch: leave adapters whose output exists (resume a run).")
    ] = False,
    shard: Annotated[
        str | None, typer.Option(help="Batch: process only slice i of N (i/N, 1-based), e.g. for array jobs.")
    ] = None,
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    trust_pickle: PickleOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rewrite an adapter so that what leaves the safety subspace is attenuated; write it with a report.

    Several --adapter, or a folder of adapter folders, make a batch: -o OUT receives OUT/<name>/ each."""
    command = ["csulora", *sys.argv[1:]]
    with _errors(debug):
        settings = _settings(lam, subspace_rank, subspace_energy, max_subspace_rank, exact_svd, seed, device)
        if is_batch(adapter):
            with _progress(quiet) as progress:
                outcomes = run_batch(
                    adapter, aligned, base, output, settings=settings, force=force, skip_existing=skip_existing,
                    shard=shard, trust_pickle=trust_pickle, subspaces=_source(cache_dir, no_cache),
                    command=command, progress=progress,
                )  # fmt: skip
            out.print(summary_table(outcomes, title="csulora sanitize · batch"))
            failed = sum(o.status == "failed" for o in outcomes)
            if failed:
                raise GateFailed(f"{failed} of {len(outcomes)} adapters failed; the others were written")
            return
        if skip_existing or shard:
            raise CsuloraError("--skip-existing and --shard apply to batches (a folder of adapters, or several)")
        with _progress(quiet) as progress:
            result = api_sanitize(
                adapter[0], aligned, base, output, settings=settings, force=force, trust_pickle=trust_pickle,
                command=command, progress=progress, subspaces=_source(cache_dir, no_cache),
            )  # fmt: skip
    if not quiet:
        out.print(to_table(result.report, title=f"csulora sanitize · {adapter[0]}"))
    out.print(f"wrote {result.output}", highlight=False, soft_wrap=True)


@app.command()
def audit(
    adapter: AdapterOpt,
    aligned: AlignedOpt,
    base: BaseOpt = None,
    lam: LambdaOpt = 1.0,
    subspace_rank: RankOpt = None,
    subspace_energy: EnergyOpt = 0.5,
    max_subspace_rank: MaxRankOpt = 256,
    exact_svd: ExactOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    cache_dir: CacheDirOpt = None,
    no_cache: NoCacheOpt = False,
    trust_pickle: PickleOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print the per-layer report without writing an adapter."""
    with _errors(debug), _progress(quiet) as progress:
        settings = _settings(lam, subspace_rank, subspace_energy, max_subspace_rank, exact_svd, seed, device)
        result = api_audit(
            adapter, aligned, base, settings=settings, trust_pickle=trust_pickle, progress=progress,
            subspaces=_source(cache_dir, no_cache),
        )  # fmt: skip
    out.print(to_table(result.report, title=f"csulora audit · {adapter}"))


@app.command()
def subspace(
    aligned: AlignedOpt,
    base: Annotated[str, typer.Option(help="Pretrained (unaligned) checkpoint: folder or Hub id.")],
    modules: Annotated[
        list[str] | None,
        typer.Option("--modules", help="Modules (e.g. q_proj; comma-separated or repeated). Default: all linear."),
    ] = None,
    cache_dir: CacheDirOpt = None,
    subspace_rank: RankOpt = None,
    subspace_energy: EnergyOpt = 0.5,
    max_subspace_rank: MaxRankOpt = 256,
    exact_svd: ExactOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    fan_in_fan_out: Annotated[
        bool, typer.Option("--fan-in-fan-out", help="For adapters with fan_in_fan_out (GPT-2 Conv1D).")
    ] = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Compute and cache the safety subspaces of a checkpoint pair once, for many later sanitize/audit runs."""
    from rich.table import Table

    with _errors(debug), _progress(quiet) as progress:
        settings = _settings(1.0, subspace_rank, subspace_energy, max_subspace_rank, exact_svd, seed, device)
        source = _source(cache_dir, False)
        modules = [m for item in modules for m in item.split(",") if m] if modules else None
        rows = precompute_subspaces(
            aligned, base, modules, settings=settings, fan_in_fan_out=fan_in_fan_out, subspaces=source,
            progress=progress,
        )  # fmt: skip
    if not quiet:
        table = Table(title=f"csulora subspace · {aligned} − {base}")
        for col in ("module", "shape", "k", "captured", "source"):
            table.add_column(col, justify="left" if col == "module" else "right")
        for r in rows:
            table.add_row(r.module, "×".join(map(str, r.shape)), str(r.k), f"{r.captured:.1%}",
                          "cache" if r.cached else "computed")  # fmt: skip
        out.print(table)
    cached = sum(r.cached for r in rows)
    out.print(f"{len(rows)} subspaces in {source.cache.root} ({len(rows) - cached} computed, {cached} already cached)",
              highlight=False, soft_wrap=True)  # fmt: skip
    for problem in source.cache.write_errors[:3]:
        err.print(f"[yellow]warning:[/yellow] could not write the cache: {problem}", highlight=False, soft_wrap=True)


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path("csulora-demo"),
    debug: DebugOpt = False,
) -> None:
    """Run the whole pipeline on a small generated Llama-shaped model pair and adapter."""
    from .demo import run_demo

    with _errors(debug):
        run_demo(workdir, out)


def main() -> None:
    app()
