"""The ``csulora`` command: parse, call the public API, render. Known errors become one line here."""

from __future__ import annotations

import json
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
FormOpt = Annotated[str, typer.Option(help="factored (same rank and config) or block (exact, rank 2r).")]
MethodOpt = Annotated[str, typer.Option(help="csulora, or the safe-lora baseline.")]
ThresholdOpt = Annotated[
    float | None, typer.Option(help="safe-lora: project modules with score ≤ this (default 0.5).")
]
TopNOpt = Annotated[int | None, typer.Option("--top-n", help="safe-lora: project the n lowest-scoring modules.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print the report as JSON on stdout, nothing else there.")]
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


def _one_line(e: BaseException) -> str:
    """A message from a library may span lines; the user gets one."""
    return " ".join(str(e).split())


@contextmanager
def _errors(debug: bool) -> Iterator[None]:
    """The one place where known failures become one line and an exit code."""
    try:
        yield
    except CsuloraError as e:
        if debug:
            raise
        # escape: paths such as run[lr=1e-4] or x[/y] are not rich markup
        err.print(f"[red]error:[/red] {escape(_one_line(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except GateFailed as e:
        err.print(f"[red]failed:[/red] {escape(_one_line(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted; nothing was written")
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            raise
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {escape(_one_line(e))} "
            "(rerun with --debug for a traceback)",
            highlight=False,
            soft_wrap=True,
        )
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


def _settings(
    lam, subspace_rank, subspace_energy, max_subspace_rank, exact_svd, seed, device,
    form="factored", method="csulora", threshold=None, top_n=None,
) -> Settings:  # fmt: skip
    if threshold is not None and top_n is not None:
        raise CsuloraError("--threshold and --top-n are two ways to choose modules for safe-lora; pass one")
    if method != "safe-lora" and (threshold is not None or top_n is not None):
        raise CsuloraError("--threshold and --top-n apply to --method safe-lora only")
    return Settings(
        form=form,
        method=method,
        threshold=0.5 if threshold is None else threshold,
        top_n=top_n,
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
    form: FormOpt = "factored",
    method: MethodOpt = "csulora",
    threshold: ThresholdOpt = None,
    top_n: TopNOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    trust_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Rewrite an adapter so that what leaves the safety subspace is attenuated; write it with a report."""
    with _errors(debug), _progress(quiet) as progress:
        settings = _settings(
            lam, subspace_rank, subspace_energy, max_subspace_rank, exact_svd, seed, device, form, method, threshold,
            top_n,
        )  # fmt: skip
        result = api_sanitize(
            adapter, aligned, base, output, settings=settings, force=force, trust_pickle=trust_pickle,
            command=["csulora", *sys.argv[1:]], progress=progress,
        )  # fmt: skip
    screen = err if json_out else out  # with --json, stdout holds the JSON only
    if not quiet:
        screen.print(to_table(result.report, title=f"csulora sanitize · {escape(str(adapter))}"))
    _warn(result.report.warnings)
    screen.print(f"wrote {result.output}", markup=False, highlight=False, soft_wrap=True)
    if json_out:
        sys.stdout.write(result.report.to_json())


@app.command()
def audit(
    adapter: Annotated[list[Path], typer.Option("--adapter", help="PEFT LoRA adapter folder (repeatable).")],
    aligned: AlignedOpt,
    base: BaseOpt = None,
    lam: LambdaOpt = 1.0,
    subspace_rank: RankOpt = None,
    subspace_energy: EnergyOpt = 0.5,
    max_subspace_rank: MaxRankOpt = 256,
    exact_svd: ExactOpt = False,
    seed: SeedOpt = 0,
    device: DeviceOpt = "cpu",
    form: FormOpt = "factored",
    method: MethodOpt = "csulora",
    threshold: ThresholdOpt = None,
    top_n: TopNOpt = None,
    max_off_energy: Annotated[
        float | None, typer.Option(help="Fail when the adapter's total off-subspace energy ρ_O exceeds this.")
    ] = None,
    max_layer_off_energy: Annotated[
        float | None, typer.Option(help="Fail when any module's off-subspace energy ρ_O exceeds this.")
    ] = None,
    min_safe_lora_score: Annotated[
        float | None, typer.Option(help="Fail when any module's Safe LoRA score is below this.")
    ] = None,
    html: Annotated[Path | None, typer.Option(help="Also write the HTML report to this file (one adapter).")] = None,
    trust_pickle: PickleOpt = False,
    json_out: JsonOpt = False,
    quiet: QuietOpt = False,
    debug: DebugOpt = False,
) -> None:
    """Report without writing an adapter; exit 1 when a threshold is exceeded (the gate before publishing)."""
    from .gate import Thresholds, audit_document, enforce
    from .report_html import to_html

    screen = err if json_out else out  # with --json, stdout holds the JSON only
    with _errors(debug):
        limits = Thresholds(max_off_energy, max_layer_off_energy, min_safe_lora_score)
        limits.validate()
        settings = _settings(
            lam, subspace_rank, subspace_energy, max_subspace_rank, exact_svd, seed, device, form, method, threshold,
            top_n,
        )  # fmt: skip
        if html is not None and len(adapter) != 1:
            raise CsuloraError("--html writes one adapter's report; pass a single --adapter with it")
        if html is not None and not html.parent.is_dir():
            raise CsuloraError(f"--html {html}: the folder {html.parent} does not exist; create it first")
        reports = []
        for path in adapter:
            with _progress(quiet) as progress:
                result = api_audit(path, aligned, base, settings=settings, trust_pickle=trust_pickle, progress=progress)
            reports.append(result.report)
            if not quiet:
                screen.print(to_table(result.report, title=f"csulora audit · {escape(str(path))}"))
            _warn(result.report.warnings)
        if html is not None:
            html.write_text(to_html(reports[0]))
        document = audit_document(reports, limits)
        if json_out:
            sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        elif document["passed"] and not quiet:
            screen.print(f"audit passed: {len(reports)} adapter(s) within the thresholds", highlight=False)
        enforce(document)


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)


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
