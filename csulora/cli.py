"""The ``csulora`` command: parse, call the public API, render. Known errors become one line here."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from . import __version__
from .api import Settings
from .api import audit as api_audit
from .api import sanitize as api_sanitize
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
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)  # paths may hold [..]
        raise typer.Exit(2) from None
    except GateFailed as e:
        err.print(f"[red]failed:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            raise
        what = escape(f"{type(e).__name__}: {e}")
        err.print(f"[red]internal error:[/red] {what} (rerun with --debug for a traceback)")
        raise typer.Exit(1) from None


@contextmanager
def _progress(quiet: bool) -> Iterator[Callable[[int, int, str], None] | None]:
    if quiet or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[module]}"), console=err, transient=True,
    ) as bar:  # fmt: skip
        task = bar.add_task("modules", total=None, module="")

        def update(done: int, total: int, module: str) -> None:
            bar.update(task, completed=done, total=total, module=module)

        yield update


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
    adapter: AdapterOpt,
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
    trust_pickle: PickleOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rewrite an adapter so that what leaves the safety subspace is attenuated; write it with a report."""
    with _errors(debug), _progress(quiet) as progress:
        settings = _settings(lam, subspace_rank, subspace_energy, max_subspace_rank, exact_svd, seed, device)
        result = api_sanitize(
            adapter, aligned, base, output, settings=settings, force=force, trust_pickle=trust_pickle,
            command=["csulora", *sys.argv[1:]], progress=progress,
        )  # fmt: skip
    if not quiet:
        out.print(to_table(result.report, title=f"csulora sanitize · {adapter}"))
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
    trust_pickle: PickleOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Print the per-layer report without writing an adapter."""
    with _errors(debug), _progress(quiet) as progress:
        settings = _settings(lam, subspace_rank, subspace_energy, max_subspace_rank, exact_svd, seed, device)
        result = api_audit(adapter, aligned, base, settings=settings, trust_pickle=trust_pickle, progress=progress)
    out.print(to_table(result.report, title=f"csulora audit · {adapter}"))


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
