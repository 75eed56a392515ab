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

from . import __version__
from .errors import CsuloraError, GateFailed, one_line
from .help import Command, Group, before_command, entered, interrupted
from .options import (
    ADAPTERS,
    BATCH,
    CACHE,
    CALIBRATE,
    CORRECTION,
    DEBUG,
    DEMO,
    EVAL,
    FORM,
    GATE,
    GENERATION,
    HARMFUL,
    INPUT,
    JOBS,
    JSON,
    METHOD,
    PACK,
    PACK_OUTPUT,
    PAIR,
    PAIR_ORDER,
    REFUSAL_GATE,
    RUN,
    SUBSPACE,
    SWEEP,
    SWEEP_INPUT,
    WIDE,
    WRITE,
    Options,
    with_options,
)  # fmt: skip

# The API (and torch, seconds to import) loads inside the commands: `--help`, `--version` and shell completion
# stay fast, and a Ctrl-C during that import is a command's one line, not a traceback.
app = typer.Typer(
    cls=Group,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Make fine-tuned LoRA adapters and models safe to publish: re-alignment, CSULoRA (the closest safe update), "
    "Safe LoRA or RESTA.\n\nShell completion: csulora --install-completion, then open a new shell.",
)
# Logs and pipes get a wide table instead of rich's 80-column default.
out = Console(width=None if sys.stdout.isatty() else 160)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
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


NOTHING_WRITTEN = "nothing was written"


@contextmanager
def _errors(debug: bool, kept: Callable[[], str] = lambda: NOTHING_WRITTEN) -> Iterator[None]:
    """The one place where known failures become one line and an exit code; ``kept`` says, on Ctrl-C, what the
    interrupted run leaves behind (outputs appear whole or not at all)."""
    entered()
    try:
        yield
    except CsuloraError as e:
        if debug:
            raise
        # escape: paths such as run[lr=1e-4] or x[/y] are not rich markup
        err.print(f"[red]error:[/red] {escape(one_line(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except GateFailed as e:
        err.print(f"[red]failed:[/red] {escape(one_line(e))}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        interrupted(f"interrupted; {kept()}")
        raise typer.Exit(130) from None
    except Exception as e:
        if debug:
            raise
        err.print(
            f"[red]internal error:[/red] {type(e).__name__}: {escape(one_line(e))} "
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
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

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


@app.command(cls=Command)
@with_options(
    ADAPTERS, INPUT, PAIR_ORDER, PACK, METHOD, CORRECTION, FORM, SUBSPACE, CALIBRATE, HARMFUL, GENERATION, WRITE,
    WIDE, JSON, BATCH, CACHE, JOBS, RUN,
)
def sanitize(
    adapter: list[Path] | None = None,
    model: str | None = None,
    target_modules: str | None = None,
    output: Path | None = None,
    force: bool = False,
    skip_existing: bool = False,
    shard: str | None = None,
    *,
    opts: Options,
) -> None:
    """Rewrite an adapter so that it is safe to publish; write it with a per-layer report.

    Several --adapter, or a folder of adapter folders, make a batch: -o OUT receives OUT/<name>/ each."""
    command = card_command(sys.argv[1:])
    screen = err if opts["json_out"] else out  # with --json, stdout holds the JSON only
    inputs = {"aligned": opts["aligned"], "base": opts["base"], "trust_pickle": opts["trust_pickle"],
              "allow_swapped": opts["allow_swapped"]}  # fmt: skip
    batch, written = False, None

    def kept() -> str:
        if written is not None:
            return f"{written} was written whole"
        return "the adapters finished are kept: rerun with --skip-existing to resume" if batch else NOTHING_WRITTEN

    with _errors(opts["debug"], kept):
        from .api import sanitize as api_sanitize  # torch: seconds, inside the handler that answers a Ctrl-C
        from .batch import is_batch, run_batch, summary_table

        batch = bool(adapter) and is_batch(adapter)
        _one_input(adapter, model)
        _pack_inputs(opts, model)
        if opts["calibrate"] or any(opts[k] for k in ("harmful", "prompts", "general", "calibrate_all")):
            if skip_existing or shard:
                raise CsuloraError("--skip-existing and --shard apply to batches of adapters, not to --calibrate")
            _calibrate(adapter, model, target_modules, output, force, command, screen, opts)
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
            written = result.output
            _render(result, f"csulora sanitize · {escape(model)}", screen, opts)
            return
        if target_modules is not None:
            raise CsuloraError("--target-modules applies to --model; an adapter's targets are its own")
        if batch:
            with _progress(opts["quiet"]) as progress:
                outcomes = run_batch(
                    adapter, output=output, settings=settings, force=force, skip_existing=skip_existing,
                    shard=shard, subspaces=opts.source(), command=command, progress=progress, jobs=opts.jobs(),
                    **inputs,
                )  # fmt: skip
            if not opts["quiet"]:
                _show(screen, summary_table(outcomes, title="csulora sanitize · batch", wide=opts["wide"]))
            if opts["json_out"]:
                sys.stdout.write(json.dumps([o.to_dict() for o in outcomes], indent=2, sort_keys=True) + "\n")
            failed = [o.name for o in outcomes if o.status == "failed"]
            if failed:
                raise GateFailed(f"{len(failed)} of {len(outcomes)} adapters failed ({', '.join(failed)}); the others "
                                 "were written")  # fmt: skip
            return
        if skip_existing or shard:
            raise CsuloraError("--skip-existing and --shard apply to batches (a folder of adapters, or several)")
        with _progress(opts["quiet"]) as progress:
            result = api_sanitize(
                adapter[0], output=output, settings=settings, force=force, command=command, progress=progress,
                subspaces=opts.source(), jobs=opts.jobs(), **inputs,
            )  # fmt: skip
    _render(result, f"csulora sanitize · {escape(str(adapter[0]))}", screen, opts)


def _calibrate(adapter: list[Path] | None, model: str | None, target_modules: str | None, output: Path | None,
               force: bool, command: list[str], screen: Console, opts: Options) -> None:  # fmt: skip
    """``sanitize --calibrate``: measure the ladder, pick, write (calibrate.py; one --adapter or a --model, whose
    candidates are whole models); exit 1 when nothing qualifies."""
    from .batch import is_batch
    from .prompts import load_prompts
    from .tuning.calibrate import PROMPTS, CalibrationFailed, calibrate, calibration_table

    if not opts["calibrate"]:
        raise CsuloraError("--harmful, --prompts, --general and --calibrate-all apply to --calibrate")
    if model is None and is_batch(adapter):
        raise CsuloraError("--calibrate works on one --adapter or one --model, not a batch")
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
                model or adapter[0], opts["aligned"], opts["base"], output, sets["harmful"], sets["prompts"],
                sets["general"], model=model is not None, target_modules=target_modules, settings=settings,
                options=options, exhaustive=opts["calibrate_all"], force=force, command=command,
                trust_pickle=opts["trust_pickle"], progress=progress, subspaces=opts.source(), jobs=opts.jobs(),
                allow_swapped=opts["allow_swapped"],
            )  # fmt: skip
        except CalibrationFailed as e:
            if not opts["quiet"]:
                _show(screen, calibration_table(e.calibration))
            if opts["json_out"]:
                sys.stdout.write(json.dumps({"calibration": e.calibration.block()}, indent=2, sort_keys=True) + "\n")
            raise
    if not opts["quiet"]:
        _show(screen, calibration_table(calibration))
    screen.print(calibration.summary(), markup=False, highlight=False, soft_wrap=True)
    _render(result, f"csulora sanitize --calibrate · {escape(str(model or adapter[0]))}", screen, opts)


def _show(screen: Console, table) -> None:
    """A table at the terminal's width; piped or logged, at the width it needs (no cut headers or values)."""
    if screen.is_terminal:
        screen.print(table)
    else:
        need = screen.measure(table, options=screen.options.update_width(10_000)).maximum
        width, screen.width = screen.width, max(screen.width, need)  # print(width=) is capped at the console's
        try:
            screen.print(table)
        finally:
            screen.width = width


def _render(result, title: str, screen: Console, opts: Options) -> None:
    from .reports.report import to_table

    if not opts["quiet"]:
        _show(screen, to_table(result.report, title=title, wide=opts["wide"]))
    _warn(result.report.warnings)
    screen.print(f"wrote {result.output}", markup=False, highlight=False, soft_wrap=True)
    if opts["json_out"]:
        sys.stdout.write(result.report.to_json())


@app.command(cls=Command)
@with_options(
    ADAPTERS, INPUT, PAIR_ORDER, PACK, METHOD, CORRECTION, FORM, SUBSPACE, GATE, REFUSAL_GATE, HARMFUL, GENERATION,
    WIDE, JSON, CACHE, JOBS, RUN,
)
def audit(
    adapter: list[Path] | None = None,
    model: str | None = None,
    target_modules: str | None = None,
    max_off_energy: float | None = None,
    max_layer_off_energy: float | None = None,
    min_safe_lora_score: float | None = None,
    min_erosion: float | None = None,
    fail_on_kept: bool = False,
    html: Path | None = None,
    before_only: bool = False,
    *,
    opts: Options,
) -> None:
    """Report without writing an adapter; exit 1 when a threshold is exceeded (the gate before publishing).

    Several --adapter, or a folder of adapter folders, audit each."""
    screen = err if opts["json_out"] else out  # with --json, stdout holds the JSON only
    with _errors(opts["debug"]):
        from .batch import audit_each, find_adapters, is_batch
        from .reports.gate import Thresholds, audit_document, enforce
        from .reports.report import to_table
        from .reports.report_html import to_html

        _one_input(adapter, model)
        _pack_inputs(opts, model)
        limits = Thresholds(max_off_energy, max_layer_off_energy, min_safe_lora_score, min_erosion, fail_on_kept)
        limits.validate()
        settings = opts.settings()
        if target_modules is not None and model is None:
            raise CsuloraError("--target-modules applies to --model; an adapter's targets are its own")
        if adapter and is_batch(adapter):
            adapter = [path for _, path in find_adapters(adapter)]
        if before_only and model is not None:
            raise CsuloraError("--before-only audits adapters; drop it for --model")
        if before_only and html is not None:
            raise CsuloraError("--html shows what the method does; drop --before-only to write it")
        if html is not None and len(adapter or [model]) != 1:
            raise CsuloraError("--html writes one adapter's report; pass a single --adapter with it")
        behaviour = _behaviour_check(opts, model)  # bad prompt files fail before anything runs
        if html is not None and not html.parent.is_dir():
            raise CsuloraError(f"--html {html}: the folder {html.parent} does not exist; create it first")
        if html is not None and html.is_dir():
            raise CsuloraError(f"--html {html}: is a folder; name the file to write, e.g. {html / 'report.html'}")
        reports, source = [], opts.source()  # one source: shared subspaces across adapters
        with _progress(opts["quiet"]) as progress:
            if model is not None:
                from .models import audit_model

                done = [(model, audit_model(
                    model, opts["aligned"], opts["base"], settings=settings, target_modules=target_modules,
                    progress=progress, subspaces=source, jobs=opts.jobs(), allow_swapped=opts["allow_swapped"],
                ))]  # fmt: skip
            else:
                done = audit_each(
                    adapter, opts["aligned"], opts["base"], jobs=opts.jobs(), progress=progress, settings=settings,
                    trust_pickle=opts["trust_pickle"], subspaces=source, allow_swapped=opts["allow_swapped"],
                    before_only=before_only,
                )  # fmt: skip
            for path, result in done:
                reports.append(result.report)
                if not opts["quiet"]:
                    _show(screen, to_table(result.report, title=f"csulora audit · {escape(str(path))}",
                                           wide=opts["wide"]))  # fmt: skip
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
    from .prompts import load_prompts
    from .refusal_gate import check_limits
    from .tuning.calibrate import PROMPTS

    if opts["harmful"] is None:
        if opts["min_refusal"] is not None:
            raise CsuloraError("--min-refusal needs --harmful: the prompts the refusal is measured on")
        return None
    if opts.get("subspace"):
        raise CsuloraError("--harmful runs the model: pass --aligned (a subspace pack has no weights to run)")
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


@app.command(cls=Command)
@with_options(PAIR, PAIR_ORDER, METHOD, SUBSPACE, PACK_OUTPUT, CACHE, JOBS, RUN)
def subspace(
    action: Annotated[
        str | None, typer.Argument(metavar="verify", help="verify: recompute modules of PACK from --aligned and "
                                   "--base and compare.", show_default=False)
    ] = None,
    pack: Annotated[
        str | None, typer.Argument(metavar="PACK", help="verify: the pack (folder or Hub id).", show_default=False)
    ] = None,
    aligned: str | None = None,
    base: str | None = None,
    modules: list[str] | None = None,
    fan_in_fan_out: bool = False,
    *,
    opts: Options,
) -> None:
    """Compute and cache the safety subspaces of a checkpoint pair once, for many later sanitize/audit runs; with
    -o, write them as a portable pack (docs/packs.md). csulora subspace verify PACK --aligned A --base B checks one.

    The subspace rule is --method's default unless --subspace-rank or --subspace-energy is given."""
    if action is not None or pack is not None:
        _verify(action, pack, aligned, base, modules, opts)
        return
    if opts["pack_output"] is not None:
        _write_pack(aligned, base, modules, fan_in_fan_out, opts)
        return
    from rich.table import Table

    kept = "the subspaces computed so far are cached"
    with _errors(opts["debug"], lambda: kept), _progress(opts["quiet"]) as progress:
        from .api import precompute_subspaces

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
        _show(out, table)
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
    with _errors(opts["debug"]), _progress(opts["quiet"]) as progress:
        from .pack import build_pack

        _pair_given(aligned, base)
        names = [m for item in modules for m in item.split(",") if m] if modules else None
        summary = build_pack(
            aligned, base, opts["pack_output"], names, settings=opts.settings(), fan_in_fan_out=fan_in_fan_out,
            force=opts["force"], command=" ".join(card_command(sys.argv[1:])), subspaces=opts.source(),
            progress=progress, jobs=opts.jobs(), allow_swapped=opts["allow_swapped"],
        )  # fmt: skip
    out.print(f"wrote {summary.path}: {summary.modules} modules in {summary.shards} shard(s), "
              f"{summary.bytes / 1e6:.2f} MB ({summary.computed} computed, {summary.loaded} from the cache)",
              markup=False, highlight=False, soft_wrap=True)  # fmt: skip


def _verify(action: str | None, pack: str | None, aligned: str | None, base: str | None,
            modules: list[str] | None, opts: Options) -> None:  # fmt: skip
    """``subspace verify PACK --aligned A --base B``: recompute and compare; exit 1 names what differs."""
    with _errors(opts["debug"]), _progress(opts["quiet"]) as progress:
        from .pack import verify_pack

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
        if "safe-lora" in (methods or []):  # a sweep's methods; one method's settings: PackSource.serve says it
            raise CsuloraError("--method safe-lora needs the whole displacement D; a subspace pack holds only U_k, "
                               "Σ_k, V_k: pass --aligned and --base, or use realign, csulora or resta")  # fmt: skip
    elif opts["aligned"] is None:
        raise CsuloraError("pass --aligned (the safety-aligned checkpoint), or --subspace PACK")


@app.command(cls=Command)
@with_options(DEMO, DEBUG)
def demo(
    workdir: Path = Path("csulora-demo"),
    world: str | None = None,
    adapter: str | None = None,
    *,
    opts: Options,
) -> None:
    """Sanitize an adapter of a shipped miniature world with three methods and compare how each behaves.

    The default method, the paper's and Safe LoRA: the report, the behaviour side by side, and the sweep that
    picks a setting by measurement."""
    with _errors(opts["debug"]):
        from .demo import ADAPTER, run_demo
        from .world import world_names

        if world is not None and world not in world_names():
            raise CsuloraError(f"--world {world!r}: no such world; choose one of {', '.join(world_names())}")
        run_demo(workdir, out, world, adapter or ADAPTER)


def _grid(text: str | None, option: str) -> list[float]:
    """``0.5,2,inf`` → ``[0.5, 2.0, inf]``."""
    if text is None:
        return []
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CsuloraError(f"{option} {text!r}: expected numbers separated by commas, e.g. 0.5,2,inf") from None


@app.command(cls=Command)
@with_options(SWEEP_INPUT, INPUT, PAIR_ORDER, PACK, SWEEP, FORM, SUBSPACE, WIDE, JSON, CACHE, JOBS, RUN)
def sweep(
    output: Path,
    adapter: Path | None = None,
    model: str | None = None,
    target_modules: str | None = None,
    method: list[str] | None = None,
    lambdas: str | None = None,
    betas: str | None = None,
    thresholds: str | None = None,
    gammas: str | None = None,
    eval_cmd: str | None = None,
    eval_timeout: float | None = None,
    pick: list[str] | None = None,
    maximize: str | None = None,
    plot: str | None = None,
    skip_existing: bool = False,
    force: bool = False,
    *,
    opts: Options,
) -> None:
    """A ladder of sanitized candidates from one subspace pass, each measured by --eval-cmd; pick one by rule.

    Writes OUT/<method>-<setting>/ per point, OUT/sweep.json, OUT/sweep.html and OUT/front.png; with --maximize,
    copies the best point meeting every --pick to OUT/picked/. Exit 1 when no point meets the rules, 2 when the
    evaluation failed on every point (a broken --eval-cmd)."""
    screen = err if opts["json_out"] else out

    def kept() -> str:
        if not (output / "sweep.json").is_file():
            return NOTHING_WRITTEN
        return (f"the points done and {output / 'sweep.json'} are kept: rerun with --skip-existing to resume "
                "(--force to start again)")  # fmt: skip

    with _errors(opts["debug"], kept):
        from .tuning.sweep import plan, run_sweep
        from .tuning.sweep_render import sweep_table
        from .tuning.sweep_result import parse_rule
        from .tuning.sweep_result import shown as metric_names

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
        _show(screen, sweep_table(result, wide=opts["wide"]))
    for note in result.notes:
        err.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)
    if opts["json_out"]:
        sys.stdout.write(json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n")
    broken = _broken_evaluation(result.points, output) if eval_cmd is not None else None
    failed = [p for p in result.points if p["status"] == "failed"]
    for p in failed if broken is None else []:  # a broken evaluator is one error below, not a warning per point
        err.print(f"warning: point {p['id']} failed: {one_line(p['message'])}", markup=False, highlight=False,
                  soft_wrap=True)  # fmt: skip
    wrote = [output / name for name in ("sweep.json", "sweep.html", "front.png") if (output / name).is_file()]
    screen.print(f"wrote {', '.join(map(str, wrote))}", markup=False, highlight=False, soft_wrap=True)
    if broken is not None:
        err.print(f"[red]error:[/red] {escape(broken)}", highlight=False, soft_wrap=True)
        raise typer.Exit(2)
    if maximize is not None:
        if result.picked is None:
            err.print(f"[red]failed:[/red] no point meets {', '.join(map(str, rules)) or 'the rules'}",
                      highlight=False, soft_wrap=True)  # fmt: skip
            raise typer.Exit(1)
        chosen = result.point(result.picked)
        shown = ", ".join(f"{k}={chosen['metrics'][k]:.4g}" for k in metric_names([chosen]))
        screen.print(f"picked {result.picked} ({shown}) → {output / 'picked'}", markup=False, highlight=False,
                     soft_wrap=True)  # fmt: skip


def _broken_evaluation(points: list[dict], output: Path) -> str | None:
    """When --eval-cmd measured no point and failed on one it ran, the evaluator (or its setup) is broken: a bad
    input (exit 2), not a rule that measured and failed (exit 1). The message names its error."""
    if any(p["status"] == "ok" for p in points):
        return None
    ran = [p for p in points if p.get("totals") is not None]  # written, then evaluated and failed
    if not ran:
        return None
    from .tuning.sweep import EVAL_STDERR

    first = ran[0]
    return (f"the evaluation failed on every point ({len(ran)}), so nothing was measured: {one_line(first['message'])} "
            f"(its stderr: {output / first['path'] / EVAL_STDERR}); check --eval-cmd")


# Options that choose which adapters run, where subspaces come from, or what the terminal shows, but never a
# byte of an output (cached and computed subspaces give the same bytes): the model card leaves them out, so a
# sharded array job writes the cards of one plain run (docs/design-notes.md). Value: whether it takes one.
NON_CONTENT_OPTIONS = {
    "--shard": True, "--skip-existing": False, "--force": False, "--cache-dir": True, "--no-cache": False,
    "--jobs": True,
    "--quiet": False, "-q": False, "--json": False, "--debug": False, "--wide": False,
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


@app.command("eval", cls=Command)
@with_options(EVAL, GENERATION, JSON, RUN)
def eval_command(
    aligned: str,
    harmful: str,
    adapter: Path | None = None,
    utility: Path | None = None,
    match: str = "contains",
    device: str = "auto",
    json_file: Path | None = None,
    *,
    opts: Options,
) -> None:
    """Refusal rate on harmful prompts, and utility, by greedy generation; the last stdout line is the metrics JSON.

    With --json, stdout holds instead the whole result (metrics, settings and example completions) as one JSON
    document, as --json-out FILE writes it."""
    quiet, debug = opts["quiet"], opts["debug"]
    with _errors(debug):
        from .evaluate import evaluate, summary

        options = opts.generation(device, match)
        if json_file is not None and not json_file.parent.is_dir():
            raise CsuloraError(f"--json-out {json_file}: the folder {json_file.parent} does not exist; create it first")
        with _progress(quiet) as progress:
            result = evaluate(aligned, harmful, utility, adapter, options, progress)
        inputs = {"aligned": aligned, "adapter": adapter, "harmful": harmful, "utility": utility}
        settings = {**{k: None if v is None else str(v) for k, v in inputs.items()}, **vars(options)}
        document = json.dumps(result.to_dict(settings), indent=2) + "\n"
        if json_file is not None:
            try:
                json_file.write_text(document)
            except OSError as e:
                raise CsuloraError(f"--json-out {json_file}: cannot write it ({e.strerror or e}); check "
                                   "permissions") from e
    if not quiet:
        err.print(summary(result.metrics, str(adapter or aligned), match), markup=False, highlight=False,
                  soft_wrap=True)  # fmt: skip
    sys.stdout.write(document if opts["json_out"] else json.dumps(result.metrics) + "\n")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:  # between commands' own handling: typer's set-up or the end of an output
        interrupted(before_command())
        sys.exit(130)
