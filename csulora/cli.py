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
from .api import audit as api_audit
from .api import precompute_subspaces
from .api import sanitize as api_sanitize
from .batch import is_batch, run_batch, summary_table
from .errors import CsuloraError, GateFailed
from .options import (
    CACHE,
    CALIBRATE,
    CORRECTION,
    DEBUG,
    FORM,
    GENERATION,
    HARMFUL,
    INPUT,
    JOBS,
    JSON,
    METHOD,
    PACK,
    PACK_OUTPUT,
    PAIR_ORDER,
    REFUSAL_GATE,
    RUN,
    SUBSPACE,
    Options,
    with_options,
)
from .report import to_table
from .sweep_render import sweep_table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make fine-tuned LoRA adapters and models safe to publish: re-alignment, CSULoRA (the closest safe update), "
    "Safe LoRA or RESTA.",
)
# Logs and pipes get a wide table instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
AdaptersOpt = Annotated[
    list[Path] | None,
    typer.Option("--adapter", help="PEFT LoRA adapter folder, or a folder of them (a batch); may repeat."),
]
ModelOpt = Annotated[
    str | None,
    typer.Option("--model", help="A full fine-tune or merged model instead of an adapter: folder or Hub id."),
]
TargetsOpt = Annotated[
    str | None,
    typer.Option("--target-modules", help="--model: correct only weights whose name matches this regular expression "
                 "(searched, e.g. 'self_attn|mlp'). Default: every weight of the transformer blocks."),
]


def _one_input(adapter: list[Path] | None, model: str | None) -> None:
    if bool(adapter) == (model is not None):
        raise CsuloraError("pass --adapter (a PEFT adapter) or --model (a full fine-tune or merged model), one of them")


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
def _progress(quiet: bool) -> Iterator[Callable[[str, int, int, str], None] | None]:
    """One bar per phase (adapters, reading, subspaces, writing), on stderr, only when it is a terminal."""
    if quiet or not err.is_terminal:
        yield None
        return
    with Progress(
        TextColumn("[bold]{task.description:>9}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[item]}", markup=False), console=err, transient=True,
    ) as bar:  # fmt: skip
        tasks: dict[str, int] = {}

        def update(phase: str, done: int, total: int, item: str) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total, item="")
            bar.update(tasks[phase], completed=done, total=total, item=item)

        yield update


@app.command()
@with_options(
    INPUT, PAIR_ORDER, PACK, METHOD, CORRECTION, FORM, SUBSPACE, CACHE, JOBS, CALIBRATE, HARMFUL, GENERATION, JSON,
    RUN,
)
def sanitize(
    adapter: AdaptersOpt = None,
    model: ModelOpt = None,
    target_modules: TargetsOpt = None,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Output folder (default: <adapter>-sanitized).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder.")] = False,
    skip_existing: Annotated[
        bool, typer.Option("--skip-existing", help="Batch: leave adapters whose output exists (resume a run).")
    ] = False,
    shard: Annotated[
        str | None, typer.Option(help="Batch: process only slice i of N (i/N, 1-based), e.g. for array jobs.")
    ] = None,
    *,
    opts: Options,
) -> None:
    """Rewrite an adapter so that it is safe to publish; write it with a per-layer report.

    Several --adapter, or a folder of adapter folders, make a batch: -o OUT receives OUT/<name>/ each."""
    command = card_command(sys.argv[1:])
    screen = err if opts["json_out"] else out  # with --json, stdout holds the JSON only
    inputs = {"aligned": opts["aligned"], "base": opts["base"], "trust_pickle": opts["trust_pickle"],
              "allow_swapped": opts["allow_swapped"]}  # fmt: skip
    with _errors(opts["debug"]):
        _one_input(adapter, model)
        _pack_inputs(opts, model)
        if opts["calibrate"] or any(opts[k] for k in ("harmful", "prompts", "general", "calibrate_all")):
            _calibrate(adapter, model, output, force, command, screen, opts)
            return
        settings = opts.settings()
        if model is not None:
            from .models import sanitize_model

            if skip_existing or shard:
                raise CsuloraError("--skip-existing and --shard apply to batches of adapters")
            with _progress(opts["quiet"]) as progress:
                result = sanitize_model(model, opts["aligned"], opts["base"], output, settings=settings,
                                        target_modules=target_modules, force=force, command=command,
                                        progress=progress, subspaces=opts.source(), jobs=opts.jobs(),
                                        allow_swapped=opts["allow_swapped"])  # fmt: skip
            _render(result, f"csulora sanitize · {escape(model)}", screen, opts)
            return
        if target_modules is not None:
            raise CsuloraError("--target-modules applies to --model; an adapter's targets are its own")
        if is_batch(adapter):
            with _progress(opts["quiet"]) as progress:
                outcomes = run_batch(
                    adapter, output=output, settings=settings, force=force, skip_existing=skip_existing,
                    shard=shard, subspaces=opts.source(), command=command, progress=progress, jobs=opts.jobs(),
                    **inputs,
                )  # fmt: skip
            screen.print(summary_table(outcomes, title="csulora sanitize · batch"))
            if opts["json_out"]:
                sys.stdout.write(json.dumps([o.to_dict() for o in outcomes], indent=2, sort_keys=True) + "\n")
            failed = sum(o.status == "failed" for o in outcomes)
            if failed:
                raise GateFailed(f"{failed} of {len(outcomes)} adapters failed; the others were written")
            return
        if skip_existing or shard:
            raise CsuloraError("--skip-existing and --shard apply to batches (a folder of adapters, or several)")
        with _progress(opts["quiet"]) as progress:
            result = api_sanitize(
                adapter[0], output=output, settings=settings, force=force, command=command, progress=progress,
                subspaces=opts.source(), jobs=opts.jobs(), **inputs,
            )  # fmt: skip
    _render(result, f"csulora sanitize · {escape(str(adapter[0]))}", screen, opts)


def _calibrate(adapter: list[Path] | None, model: str | None, output: Path | None, force: bool, command: list[str],
               screen: Console, opts: Options) -> None:  # fmt: skip
    """``sanitize --calibrate``: measure the ladder, pick, write (calibrate.py); exit 1 when nothing qualifies."""
    from .calibrate import PROMPTS, CalibrationFailed, calibrate, calibration_table
    from .prompts import load_prompts

    if not opts["calibrate"]:
        raise CsuloraError("--harmful, --prompts, --general and --calibrate-all apply to --calibrate")
    if model is not None or is_batch(adapter):
        raise CsuloraError("--calibrate works on one --adapter (not --model, not a batch)")
    if not opts["harmful"] or not opts["prompts"]:
        raise CsuloraError("--calibrate needs --harmful (harmful prompts) and --prompts (the fine-tune's prompts)")
    settings = opts.settings()
    options = opts.generation(settings.device, limit=PROMPTS)
    options.validate()
    sets = {name: load_prompts(opts[name], f"--{name}", options.limit) if opts[name] else None
            for name in ("harmful", "prompts", "general")}  # fmt: skip
    with _progress(opts["quiet"]) as progress:
        try:
            calibration, result = calibrate(
                adapter[0], opts["aligned"], opts["base"], output, sets["harmful"], sets["prompts"], sets["general"],
                settings=settings, options=options, exhaustive=opts["calibrate_all"], force=force, command=command,
                trust_pickle=opts["trust_pickle"], progress=progress, subspaces=opts.source(), jobs=opts.jobs(),
                allow_swapped=opts["allow_swapped"],
            )  # fmt: skip
        except CalibrationFailed as e:
            if not opts["quiet"]:
                screen.print(calibration_table(e.calibration))
            if opts["json_out"]:
                sys.stdout.write(json.dumps({"calibration": e.calibration.block()}, indent=2, sort_keys=True) + "\n")
            raise
    if not opts["quiet"]:
        screen.print(calibration_table(calibration))
    screen.print(calibration.summary(), markup=False, highlight=False, soft_wrap=True)
    _render(result, f"csulora sanitize --calibrate · {escape(str(adapter[0]))}", screen, opts)


def _render(result, title: str, screen: Console, opts: Options) -> None:
    if not opts["quiet"]:
        screen.print(to_table(result.report, title=title))
    _warn(result.report.warnings)
    screen.print(f"wrote {result.output}", markup=False, highlight=False, soft_wrap=True)
    if opts["json_out"]:
        sys.stdout.write(result.report.to_json())


@app.command()
@with_options(
    INPUT, PAIR_ORDER, PACK, METHOD, CORRECTION, FORM, SUBSPACE, CACHE, JOBS, HARMFUL, REFUSAL_GATE, GENERATION,
    JSON, RUN,
)
def audit(
    adapter: Annotated[list[Path] | None, typer.Option("--adapter", help="PEFT LoRA adapter folder (repeatable).")] = (
        None
    ),
    model: ModelOpt = None,
    target_modules: TargetsOpt = None,
    max_off_energy: Annotated[
        float | None, typer.Option(help="Fail when the adapter's total off-subspace energy ρ_O exceeds this.")
    ] = None,
    max_layer_off_energy: Annotated[
        float | None, typer.Option(help="Fail when any module's off-subspace energy ρ_O exceeds this.")
    ] = None,
    min_safe_lora_score: Annotated[
        float | None, typer.Option(help="Fail when any module's Safe LoRA score is below this.")
    ] = None,
    min_erosion: Annotated[
        float | None,
        typer.Option(help="Fail when the adapter's erosion coefficient ⟨ΔW, D_k⟩/‖D_k‖² is below this (e.g. -0.1): "
                     "it turns the aligned directions back."),
    ] = None,
    fail_on_kept: Annotated[
        bool,
        typer.Option("--fail-on-kept", help="Fail when the adapter saves tensors that are kept as trained, not "
                     "sanitized (DoRA magnitudes, biases, resized embeddings, trainable tokens; copies of the aligned "
                     "weights pass); --model: weights left out by --target-modules (norms, embeddings, head pass)."),
    ] = False,
    html: Annotated[Path | None, typer.Option(help="Also write the HTML report to this file (one adapter).")] = None,
    *,
    opts: Options,
) -> None:
    """Report without writing an adapter; exit 1 when a threshold is exceeded (the gate before publishing)."""
    from .gate import Thresholds, audit_document, enforce
    from .report_html import to_html

    screen = err if opts["json_out"] else out  # with --json, stdout holds the JSON only
    with _errors(opts["debug"]):
        _one_input(adapter, model)
        _pack_inputs(opts, model)
        limits = Thresholds(max_off_energy, max_layer_off_energy, min_safe_lora_score, min_erosion, fail_on_kept)
        limits.validate()
        settings = opts.settings()
        if target_modules is not None and model is None:
            raise CsuloraError("--target-modules applies to --model; an adapter's targets are its own")
        if html is not None and len(adapter or [model]) != 1:
            raise CsuloraError("--html writes one adapter's report; pass a single --adapter with it")
        behaviour = _behaviour_check(opts, model)  # bad prompt files fail before anything runs
        if html is not None and not html.parent.is_dir():
            raise CsuloraError(f"--html {html}: the folder {html.parent} does not exist; create it first")
        if html is not None and html.is_dir():
            raise CsuloraError(f"--html {html}: is a folder; name the file to write, e.g. {html / 'report.html'}")
        reports, source = [], opts.source()  # one source: shared subspaces across adapters
        for path in adapter or [model]:
            with _progress(opts["quiet"]) as progress:
                if model is not None:
                    from .models import audit_model

                    result = audit_model(
                        model, opts["aligned"], opts["base"], settings=settings, target_modules=target_modules,
                        progress=progress, subspaces=source, jobs=opts.jobs(), allow_swapped=opts["allow_swapped"],
                    )  # fmt: skip
                else:
                    result = api_audit(
                        path, opts["aligned"], opts["base"], settings=settings, trust_pickle=opts["trust_pickle"],
                        progress=progress, subspaces=source, jobs=opts.jobs(), allow_swapped=opts["allow_swapped"],
                    )  # fmt: skip
            reports.append(result.report)
            if not opts["quiet"]:
                screen.print(to_table(result.report, title=f"csulora audit · {escape(str(path))}"))
            _warn(result.report.warnings)
        if html is not None:
            try:
                html.write_text(to_html(reports[0]))
            except OSError as e:
                raise CsuloraError(f"--html {html}: cannot write it ({e.strerror or e}); check permissions") from e
        document = audit_document(reports, limits)
        if behaviour is not None:
            _behaviour_gate(document, behaviour, adapter, model, screen, opts)
        if opts["json_out"]:
            sys.stdout.write(json.dumps(document, indent=2, sort_keys=True) + "\n")
        elif document["passed"] and not opts["quiet"]:
            what = "model" if model is not None else f"{len(reports)} adapter(s)"
            screen.print(f"audit passed: {what} within the thresholds", highlight=False)
        enforce(document)


def _behaviour_check(opts: Options, model: str | None):
    """audit --harmful: the prompt set and options, checked; ``None`` without --harmful."""
    from .calibrate import PROMPTS
    from .prompts import load_prompts
    from .refusal_gate import check_limits

    if opts["harmful"] is None:
        if opts["min_refusal"] is not None:
            raise CsuloraError("--min-refusal needs --harmful: the prompts the refusal is measured on")
        return None
    check_limits(opts["min_refusal"], opts["min_refusal_ratio"])
    options = opts.generation(opts["device"], limit=PROMPTS)
    options.validate()
    return load_prompts(opts["harmful"], "--harmful", options.limit), options


def _behaviour_gate(document: dict, behaviour, adapter: list[Path] | None, model: str | None, screen: Console,
                    opts: Options) -> None:  # fmt: skip
    """Measure refusal of each fine-tuned model (refusal_gate.py) and add its violations to the audit document."""
    from .refusal_gate import measure, violations

    harmful, options = behaviour
    document["behaviour"] = []
    for path in adapter or [model]:
        measured = measure(opts["aligned"], harmful, options, adapter=None if model else path, model=model)
        found = violations(str(path), measured, opts["min_refusal"], opts["min_refusal_ratio"])
        document["behaviour"].append({"subject": str(path), **measured, "passed": not found})
        document["violations"] += found
        screen.print(f"{path}: refusal {measured['refusal']:.2f} (aligned model {measured['aligned_refusal']:.2f}) "
                     f"on {harmful.to_dict()['n']} harmful prompts from {harmful.source}", markup=False,
                     highlight=False, soft_wrap=True)  # fmt: skip
    document["passed"] = not document["violations"]


def _warn(warnings: list[str]) -> None:
    for w in warnings:
        err.print(f"warning: {w}", markup=False, highlight=False, soft_wrap=True)


@app.command()
@with_options(PAIR_ORDER, METHOD, SUBSPACE, CACHE, PACK_OUTPUT, JOBS, RUN)
def subspace(
    action: Annotated[
        str | None, typer.Argument(help="verify: recompute modules of PACK from --aligned and --base and compare.")
    ] = None,
    pack: Annotated[str | None, typer.Argument(help="verify: the pack (folder or Hub id).", show_default=False)] = None,
    aligned: Annotated[str | None, typer.Option("--aligned", help="Safety-aligned checkpoint: folder or Hub id.")] = (
        None
    ),
    base: Annotated[str | None, typer.Option(help="Pretrained (unaligned) checkpoint: folder or Hub id.")] = None,
    modules: Annotated[
        list[str] | None,
        typer.Option("--modules", help="Modules (e.g. q_proj; comma-separated or repeated). Default: all linear. "
                     "verify: N (spread over the pack; default 16), all, or names."),
    ] = None,
    fan_in_fan_out: Annotated[
        bool, typer.Option("--fan-in-fan-out", help="For adapters with fan_in_fan_out (GPT-2 Conv1D).")
    ] = False,
    *,
    opts: Options,
) -> None:
    """Compute and cache the safety subspaces of a checkpoint pair once, for many later sanitize/audit runs; with -o,
    write them as a portable pack (docs/packs.md). `csulora subspace verify PACK --aligned A --base B` checks one.

    The subspace rule is --method's default unless --subspace-rank or --subspace-energy is given."""
    if action is not None or pack is not None:
        _verify(action, pack, aligned, base, modules, opts)
        return
    if opts["pack_output"] is not None:
        _write_pack(aligned, base, modules, fan_in_fan_out, opts)
        return
    from rich.table import Table

    with _errors(opts["debug"]), _progress(opts["quiet"]) as progress:
        _pair_given(aligned, base)
        if opts["no_cache"]:
            raise CsuloraError("precomputing subspaces without a cache keeps nothing; drop --no-cache or pass -o PACK")
        settings, source = opts.settings(), opts.source()
        modules = [m for item in modules for m in item.split(",") if m] if modules else None
        rows = precompute_subspaces(
            aligned, base, modules, settings=settings, fan_in_fan_out=fan_in_fan_out, subspaces=source,
            progress=progress, jobs=opts.jobs(), allow_swapped=opts["allow_swapped"],
        )  # fmt: skip
    if not opts["quiet"]:
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


def _pair_given(aligned: str | None, base: str | None) -> None:
    if aligned is None or base is None:
        raise CsuloraError("csulora subspace needs --aligned and --base (the checkpoint pair)")


def _write_pack(aligned: str | None, base: str | None, modules: list[str] | None, fan_in_fan_out: bool,
                opts: Options) -> None:  # fmt: skip
    """``subspace -o PACK``: the pack of a pair (DESIGN.md §11)."""
    from .pack import build_pack

    with _errors(opts["debug"]), _progress(opts["quiet"]) as progress:
        _pair_given(aligned, base)
        names = [m for item in modules for m in item.split(",") if m] if modules else None
        summary = build_pack(
            aligned, base, opts["pack_output"], names, settings=opts.settings(), fan_in_fan_out=fan_in_fan_out,
            force=opts["force"], command=" ".join(card_command(sys.argv[1:])), subspaces=opts.source(),
            progress=progress, jobs=opts.jobs(),
        )  # fmt: skip
    out.print(f"wrote {summary.path}: {summary.modules} modules in {summary.shards} shard(s), "
              f"{summary.bytes / 1e6:.2f} MB ({summary.computed} computed, {summary.loaded} from the cache)",
              markup=False, highlight=False, soft_wrap=True)  # fmt: skip


def _verify(action: str | None, pack: str | None, aligned: str | None, base: str | None,
            modules: list[str] | None, opts: Options) -> None:  # fmt: skip
    """``subspace verify PACK --aligned A --base B``: recompute and compare; exit 1 names what differs."""
    from .pack import verify_pack

    with _errors(opts["debug"]), _progress(opts["quiet"]) as progress:
        if action != "verify" or pack is None:
            raise CsuloraError(f"csulora subspace {action}: unknown; the one action is: csulora subspace verify PACK "
                               "--aligned A --base B")  # fmt: skip
        _pair_given(aligned, base)
        which = ",".join(modules) if modules else None
        result = verify_pack(pack, aligned, base, which, device=opts["device"], progress=progress, jobs=opts.jobs())
    out.print(f"verified {pack}: {len(result.checked)} module(s) recomputed from {aligned} − {base} agree "
              f"({result.identical} byte for byte)", markup=False, highlight=False, soft_wrap=True)  # fmt: skip


def _pack_inputs(opts: Options, model: str | None, methods: list[str] | None = None) -> None:
    """--subspace stands in for --aligned and --base (DESIGN.md §11); without it, --aligned is required."""
    if opts.get("subspace"):
        if model is not None:
            raise CsuloraError("--model needs the aligned weights (ΔW = W − W_a); a subspace pack lacks them: pass "
                               "--aligned and --base")  # fmt: skip
        if opts["aligned"] is not None or opts["base"] is not None:
            raise CsuloraError("--subspace replaces --aligned and --base (the pack names its pair); pass one or the "
                               "other")  # fmt: skip
        if "safe-lora" in (methods or []):
            raise CsuloraError("--method safe-lora needs the whole displacement D; a subspace pack holds only U_k, "
                               "Σ_k, V_k: pass --aligned and --base, or sweep realign, csulora or resta")  # fmt: skip
    elif opts["aligned"] is None:
        raise CsuloraError("pass --aligned (the safety-aligned checkpoint), or --subspace PACK")


@app.command()
@with_options(DEBUG)
def demo(
    workdir: Annotated[Path, typer.Option(help="Where the demo writes its files.")] = Path("csulora-demo"),
    world: Annotated[str | None, typer.Option(help="A shipped world: tiny (default), wide, brief, moe, topic.")] = None,
    adapter: Annotated[str, typer.Option("--adapter", help="An adapter of that world.")] = "adv-r8-all-s0",
    *,
    opts: Options,
) -> None:
    """Sanitize an adapter of a shipped miniature world with the default method, the paper's and Safe LoRA; show
    the report and, side by side, how each behaves; print the sweep that picks a setting by measurement."""
    from .demo import run_demo
    from .world import world_names

    with _errors(opts["debug"]):
        if world is not None and world not in world_names():
            raise CsuloraError(f"--world {world!r}: no such world; choose one of {', '.join(world_names())}")
        run_demo(workdir, out, world, adapter)


def _grid(text: str | None, option: str) -> list[float]:
    """``0.5,2,inf`` → ``[0.5, 2.0, inf]``."""
    if text is None:
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CsuloraError(f"{option} {text!r}: expected numbers separated by commas, e.g. 0.5,2,inf") from None


@app.command()
@with_options(INPUT, PAIR_ORDER, PACK, FORM, SUBSPACE, CACHE, JOBS, JSON, RUN)
def sweep(
    output: Annotated[Path, typer.Option("--output", "-o", help="Folder of the sweep: one subfolder per point.")],
    adapter: Annotated[Path | None, typer.Option("--adapter", help="PEFT LoRA adapter folder.")] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="A full fine-tune or merged model instead: every point is a whole model."),
    ] = None,
    target_modules: TargetsOpt = None,
    method: Annotated[
        list[str] | None, typer.Option("--method", help="A method of the ladder; may repeat. Default: the default one.")
    ] = None,
    lambdas: Annotated[str | None, typer.Option(help="λ values, e.g. 0.5,2,8,inf (realign, csulora).")] = None,
    betas: Annotated[str | None, typer.Option(help="β values, e.g. 0,0.25 (realign).")] = None,
    thresholds: Annotated[str | None, typer.Option(help="τ values, e.g. 0.3,0.5 (safe-lora).")] = None,
    gammas: Annotated[str | None, typer.Option(help="γ values, e.g. 0.1,0.25,0.5 (resta).")] = None,
    eval_cmd: Annotated[
        str | None,
        typer.Option(help="Shell command run once per point, {adapter} (or {model}) replaced by its folder; its last "
                     "stdout line is one JSON object of numeric metrics (e.g. csulora eval … --adapter {adapter})."),
    ] = None,
    eval_timeout: Annotated[float | None, typer.Option(help="Seconds before an evaluation counts as failed.")] = None,
    pick: Annotated[
        list[str] | None, typer.Option("--pick", help="Rule METRIC>=X or METRIC<=X every picked point meets; repeat.")
    ] = None,
    maximize: Annotated[
        str | None, typer.Option(help="Pick the qualifying point with the largest METRIC; copied to OUT/picked/.")
    ] = None,
    plot: Annotated[str | None, typer.Option(help="X,Y: the metrics the front is drawn with.")] = None,
    skip_existing: Annotated[bool, typer.Option("--skip-existing", help="Resume: keep the points already done.")] = (
        False
    ),
    force: Annotated[bool, typer.Option("--force", help="Redo every point of an existing sweep.")] = False,
    *,
    opts: Options,
) -> None:
    """A ladder of sanitized candidates from one subspace pass, each measured by --eval-cmd; pick one by rule.

    Writes OUT/<method>-<setting>/ per point, OUT/sweep.json, OUT/sweep.html and OUT/front.png; with --maximize,
    copies the best point meeting every --pick to OUT/picked/ (exit 1 when none does)."""
    from .sweep import plan, run_sweep
    from .sweep_result import parse_rule

    screen = err if opts["json_out"] else out
    with _errors(opts["debug"]):
        _one_input([adapter] if adapter else None, model)
        _pack_inputs(opts, model, method)
        if target_modules is not None and model is None:
            raise CsuloraError("--target-modules applies to --model; an adapter's targets are its own")
        rules = [parse_rule(r) for r in pick or []]
        axes = tuple(plot.split(",")) if plot else None
        if axes is not None and len(axes) != 2:
            raise CsuloraError(f"--plot {plot!r}: expected two metrics X,Y, e.g. utility,refusal")
        grids = {"lam": _grid(lambdas, "--lambdas"), "beta": _grid(betas, "--betas"),
                 "threshold": _grid(thresholds, "--thresholds"), "gamma": _grid(gammas, "--gammas")}  # fmt: skip
        points = plan(method or [opts.settings().method], opts.settings(), grids)
        with _progress(opts["quiet"]) as progress:
            result = run_sweep(
                adapter or model, opts["aligned"], opts["base"], output, points, eval_cmd=eval_cmd,
                eval_timeout=eval_timeout, rules=rules, maximize=maximize, skip_existing=skip_existing, force=force,
                trust_pickle=opts["trust_pickle"], subspaces=opts.source(), progress=progress, plot=axes,
                jobs=opts.jobs(), model=model is not None, target_modules=target_modules,
                allow_swapped=opts["allow_swapped"],
                notice=lambda text: err.print(f"note: {text}", markup=False, highlight=False, soft_wrap=True),
            )  # fmt: skip
    if not opts["quiet"]:
        screen.print(sweep_table(result))
    for note in result.notes:
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if opts["json_out"]:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
    failed = [p for p in result.points if p["status"] == "failed"]
    for p in failed:
        err.print(f"warning: point {p['id']} failed: {_one_line(p['message'])}", markup=False, highlight=False,
                  soft_wrap=True)  # fmt: skip
    screen.print(f"wrote {output / 'sweep.json'}, {output / 'sweep.html'}", markup=False, highlight=False,
                 soft_wrap=True)  # fmt: skip
    if maximize is not None:
        if result.picked is None:
            err.print(f"[red]failed:[/red] no point meets {', '.join(map(str, rules)) or 'the rules'}",
                      highlight=False, soft_wrap=True)  # fmt: skip
            raise typer.Exit(1)
        chosen = result.point(result.picked)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in chosen["metrics"].items())
        screen.print(f"picked {result.picked} ({shown}) → {output / 'picked'}", markup=False, highlight=False,
                     soft_wrap=True)  # fmt: skip


# Options that choose which adapters run, where subspaces come from, or what the terminal shows, but never a
# byte of an output (cached and computed subspaces give the same bytes): the model card leaves them out, so a
# sharded array job writes the cards of one plain run (docs/design-notes.md). Value: whether it takes one.
NON_CONTENT_OPTIONS = {
    "--shard": True, "--skip-existing": False, "--force": False, "--cache-dir": True, "--no-cache": False,
    "--jobs": True,
    "--quiet": False, "-q": False, "--json": False, "--debug": False,
}  # fmt: skip


def card_command(argv: list[str]) -> list[str]:
    """``csulora`` and ``argv`` without the non-content options: the command that reproduces the output."""
    command, skip = ["csulora"], False
    for arg in argv:
        name = arg.split("=", 1)[0]
        if skip:
            skip = False
        elif arg in NON_CONTENT_OPTIONS:
            skip = NON_CONTENT_OPTIONS[arg]
        elif not (name.startswith("--") and NON_CONTENT_OPTIONS.get(name)):  # --shard=1/4, --cache-dir=…
            command.append(arg)
    return command


EvalModelOpt = Annotated[str, typer.Option("--aligned", help="Model to run (the adapter goes on it): folder, Hub id.")]
HarmfulOpt = Annotated[Path, typer.Option(help="Harmful prompts: one per line, AdvBench's CSV (a goal column), JSON "
                                             "lines, or a Hub dataset org/name[:file].")]
UtilityOpt = Annotated[Path | None, typer.Option(help='Utility prompts: JSON lines {"prompt": …, "answer": …}.')]
MatchOpt = Annotated[str, typer.Option(help="Utility: contains (the answer appears) or exact (stripped equal).")]


@app.command("eval")
@with_options(GENERATION, RUN)
def eval_command(
    aligned: EvalModelOpt,
    harmful: HarmfulOpt,
    adapter: Annotated[Path | None, typer.Option(help="PEFT LoRA adapter folder (default: the model alone).")] = None,
    utility: UtilityOpt = None,
    match: MatchOpt = "contains",
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    json_file: Annotated[Path | None, typer.Option("--json", help="Also write metrics and examples here.")] = None,
    *,
    opts: Options,
) -> None:
    """Refusal rate on harmful prompts, and utility, by greedy generation; the last stdout line is the metrics JSON."""
    from .evaluate import evaluate, summary

    quiet, debug = opts["quiet"], opts["debug"]
    options = opts.generation(device, match)
    with _errors(debug):
        if json_file is not None and not json_file.parent.is_dir():
            raise CsuloraError(f"--json {json_file}: the folder {json_file.parent} does not exist; create it first")
        with _progress(quiet) as progress:
            result = evaluate(aligned, harmful, utility, adapter, options, progress)
        if json_file is not None:
            inputs = {"aligned": aligned, "adapter": adapter, "harmful": harmful, "utility": utility}
            settings = {**{k: None if v is None else str(v) for k, v in inputs.items()}, **vars(options)}
            try:
                json_file.write_text(json.dumps(result.to_dict(settings), indent=2) + "\n")
            except OSError as e:
                raise CsuloraError(f"--json {json_file}: cannot write it ({e.strerror or e}); check permissions") from e
    if not quiet:
        err.print(summary(result.metrics, str(adapter or aligned), match), markup=False, highlight=False,
                  soft_wrap=True)  # fmt: skip
    sys.stdout.write(json.dumps(result.metrics) + "\n")


def main() -> None:
    app()
