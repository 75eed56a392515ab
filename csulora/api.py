"""The public Python API: ``sanitize()`` and ``audit()``. The CLI is a thin layer over these."""

from __future__ import annotations

import math
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .cache import Held, SubspaceSource
from .correction import product_energy
from .determinism import fixed_threads
from .errors import CsuloraError
from .io.adapters import CONFIG, Adapter, DenseModule, Kept, LoraModule, read_adapter, write_adapter
from .io.checkpoints import Checkpoint, CheckpointPair, CheckpointRef, card_base_model, parse_ref, refuse_adapter
from .io.outputs import check_output, write_folder
from .io.targets import Plan, bind
from .methods import METHODS, Corrected, block_config, validate
from .methods.base import DenseUpdate, summary_warnings
from .methods.realign import by_size, size_ratio, size_rule_applies
from .pack import PackPair, PackSource, pack_targets
from .pair_order import check_pair_order, names_checkpoint, weight_hint
from .parallel import default_workers, ordered
from .reports.card import model_card
from .reports.report import Report, to_markdown
from .reports.report_html import to_html
from .settings import Settings
from .subspace import rank_cut

# (phase, done, total, item): phases "reading" (adapter and headers), "subspaces" (one step per module:
# read W_a, W_b and take the SVD, or load the cached subspace; then correct), "writing"
Progress = Callable[[str, int, int, str], None]


@dataclass
class Result:
    report: Report
    output: Path | None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass
class _Inputs:
    adapter: Adapter
    plan: Plan
    pair: CheckpointPair
    base_source: str
    order: dict = field(default_factory=dict)  # what the metadata said of the pair's order (pair_order.py)

    @property
    def aligned(self) -> Checkpoint:
        return self.pair.aligned

    @property
    def base(self) -> Checkpoint:
        return self.pair.base

    def describe(self) -> dict:
        return {
            "adapter": {
                "path": str(self.adapter.path),
                "resolved_path": str(self.adapter.path.resolve()),  # symlinks followed: what was read
                "weights_sha256": self.adapter.weights_sha256,
                "base_model_name_or_path": self.adapter.base_model,
            },
            "aligned": {**_describe(self.aligned), "source": "subspace pack" if isinstance(self.pair, PackPair)
                        else "--aligned"},  # fmt: skip
            "base": {**_describe(self.base), "source": self.base_source},
            **({"pair_order": self.order} if self.order else {}),  # a pack's pair is checked by the pack
            **({"subspace": self.pair.pack.describe()} if isinstance(self.pair, PackPair) else {}),
        }


def _describe(ckpt: Checkpoint) -> dict:
    described = {"ref": ckpt.ref.spec, "revision": ckpt.revision, "fingerprint": ckpt.fingerprint()}
    if ckpt.ref.path is not None:
        described["resolved_path"] = str(ckpt.ref.path)  # parse_ref resolved symlinks
    return described


def sanitize(
    adapter: str | Path,
    aligned: str | None,
    base: str | None = None,
    output: str | Path | None = None,
    *,
    settings: Settings = Settings(),
    force: bool = False,
    trust_pickle: bool = False,
    command: list[str] | None = None,
    progress: Progress | None = None,
    subspaces: SubspaceSource | None = None,
    jobs: int | None = None,
    allow_swapped: bool = False,
    calibration: dict | None = None,
) -> Result:
    """Sanitize one adapter and write the result folder (``<adapter>-sanitized`` by default).

    ``subspaces``: where module subspaces come from; default the disk cache at ``default_cache_dir()``
    (``SubspaceSource.open(enabled=False)`` computes everything afresh, ``open(dir)`` picks the folder;
    ``pack.PackSource.open(PACK)`` serves them from a subspace pack, with ``aligned`` and ``base`` None).
    ``jobs``: modules processed at once (default: the usable cores); the output is the same for any value.
    ``allow_swapped``: run even when the metadata says aligned and base are swapped (``pair_order.py``).
    ``calibration``: what ``--calibrate`` measured and chose (calibrate.py), kept in the report and the card.
    """
    asked, settings = settings, _served(settings, subspaces)
    validate(settings)
    adapter_path = Path(adapter)
    out = Path(output) if output is not None else default_output(adapter_path)
    check_output(out, force, [adapter_path])
    t0 = time.perf_counter()
    _phase(progress, "reading", 0, str(adapter_path))
    inputs = _load(adapter_path, aligned, base, trust_pickle, subspaces, allow_swapped)
    check_output(out, force, [adapter_path, *(c.folder for c in (inputs.aligned, inputs.base))])
    _phase(progress, "reading", 1, str(adapter_path))
    t1 = time.perf_counter()
    settings, rule, source = _settle(inputs, asked, settings, subspaces, jobs)
    report, tensors, config = _run(inputs, settings, progress, source, jobs or default_workers(settings.device))
    report.calibration, report.size_rule = calibration, rule
    t2 = time.perf_counter()
    _phase(progress, "writing", 0, str(out))
    metadata = {
        "csulora_version": __version__,
        **{f"csulora_{k}": str(v) for k, v in settings.to_dict().items()},
    }
    command_line = shlex.join(command) if command else _api_call(adapter, aligned, base, settings)

    def fill(tmp: Path) -> None:
        write_adapter(tmp, inputs.adapter, tensors, metadata, config)
        form_words = METHODS[settings.method].form_words(report.rank_changed)
        (tmp / "README.md").write_text(model_card(report, inputs.adapter.base_model, command_line, form_words))
        (tmp / "csulora_report.json").write_text(report.to_json())
        (tmp / "csulora_report.md").write_text(to_markdown(report))
        (tmp / "csulora_report.html").write_text(to_html(report))

    write_folder(out, fill, replace=force)
    _phase(progress, "writing", 1, str(out))
    t3 = time.perf_counter()
    return Result(report, out, {"load_s": t1 - t0, "compute_s": t2 - t1, "write_s": t3 - t2})


def audit(
    adapter: str | Path,
    aligned: str | None,
    base: str | None = None,
    *,
    settings: Settings = Settings(),
    trust_pickle: bool = False,
    progress: Progress | None = None,
    subspaces: SubspaceSource | None = None,
    jobs: int | None = None,
    allow_swapped: bool = False,
    before_only: bool = False,
) -> Result:
    """Compute the same decomposition and report as ``sanitize()`` without writing anything.

    ``before_only``: the adapter as it is, without running the method (every gate statistic is a "before" value):
    the report has no "after" values, and an audit costs a fraction of a run (BENCHMARKS.md, packs)."""
    asked, settings = settings, _served(settings, subspaces)
    validate(settings)
    t0 = time.perf_counter()
    _phase(progress, "reading", 0, str(adapter))
    inputs = _load(Path(adapter), aligned, base, trust_pickle, subspaces, allow_swapped)
    _phase(progress, "reading", 1, str(adapter))
    t1 = time.perf_counter()
    if before_only:  # no method runs: no setting to choose
        rule, source = None, subspaces or SubspaceSource.open()
    else:  # what sanitize would do, its choice of setting included
        settings, rule, source = _settle(inputs, asked, settings, subspaces, jobs)
    report, _, _ = _run(inputs, settings, progress, source, jobs or default_workers(settings.device), before_only)
    report.size_rule = rule
    return Result(report, None, {"load_s": t1 - t0, "compute_s": time.perf_counter() - t1})


def _settle(inputs: _Inputs, asked: Settings, settings: Settings, subspaces: SubspaceSource | PackSource | None,
            jobs: int | None) -> tuple[Settings, dict | None, SubspaceSource | Held]:  # fmt: skip
    """The settings to run and where their subspaces come from: ``settings`` as given, or, under the default's size
    rule (``realign.by_size``), chosen from the adapter's ``‖ΔW‖ / ‖D_8‖``, measured by a first pass over the
    modules that corrects nothing; what that pass read or computed is held for the second (``Held``)."""
    source = subspaces or SubspaceSource.open()
    if not size_rule_applies(asked, settings):
        return settings, None, source
    source, pair = Held(source), inputs.pair
    work = sorted([*inputs.plan.modules, *inputs.plan.dense], key=lambda m: (pair.shard(m.target), m.name))
    with fixed_threads():
        terms = [t for _, t in ordered(lambda m: _size_terms(m, pair, settings, source), work,
                                       jobs or default_workers(settings.device)) if t is not None]  # fmt: skip
    return *by_size(settings, size_ratio([u for u, _ in terms], [d for _, d in terms])), source


def _size_terms(module: LoraModule | DenseModule, pair: CheckpointPair, settings: Settings,
                source: SubspaceSource) -> tuple[float, float] | None:  # fmt: skip
    """``(‖ΔW‖, ‖D_k‖)`` of one module as its report row has them: a LoRA module's from its factors and its
    subspace, a dense one's from its row; ``None`` for a dense copy of the aligned weight (no row)."""
    if isinstance(module, DenseModule):
        done, _ = correct_module(module, pair, settings, source, before_only=True)
        return None if isinstance(done, Kept) else (done.row.update_norm, done.row.subspace_norm)
    with fixed_threads():
        sub, _ = source.get(pair, module.target, settings.subspace_params(), settings.torch_device())
        A, B = module.A.to(sub.U.device, torch.float64), module.B.to(sub.U.device, torch.float64)
        return math.sqrt(product_energy(module.scaling * B, A)), float(torch.linalg.vector_norm(sub.S.double()))


def _phase(progress: Progress | None, phase: str, done: int, item: str) -> None:
    if progress:
        progress(phase, done, 1, item)


def default_output(adapter_path: Path) -> Path:
    """``./out`` → ``./out-sanitized``, beside the input."""
    resolved = adapter_path.resolve()
    return resolved.with_name(resolved.name + "-sanitized")


def _api_call(adapter, aligned, base, settings: Settings) -> str:
    return f"csulora.sanitize({str(adapter)!r}, {aligned!r}, base={base!r}, settings={settings!r})"


def check_inputs(adapter: str | Path, aligned: str | None, base: str | None = None, trust_pickle: bool = False,
                 subspaces: SubspaceSource | PackSource | None = None,
                 allow_swapped: bool = False) -> None:  # fmt: skip
    """Read the adapter and both checkpoints' headers (or the pack's manifest) as ``sanitize()`` does first: bad
    input fails here."""
    _load(Path(adapter), aligned, base, trust_pickle, subspaces, allow_swapped).pair.close()


def _served(settings: Settings, subspaces: SubspaceSource | PackSource | None) -> Settings:
    """Resolved settings; from a pack, its subspace rule where none is given (refused when it cannot serve them)."""
    return (subspaces.serve(settings) if isinstance(subspaces, PackSource) else settings).resolved()


def _load(adapter_path: Path, aligned: str | None, base: str | None, trust_pickle: bool,
          subspaces: SubspaceSource | PackSource | None = None, allow_swapped: bool = False) -> _Inputs:  # fmt: skip
    adapter = read_adapter(adapter_path, trust_pickle)
    if isinstance(subspaces, PackSource):  # DESIGN.md §11: the pack stands in for both checkpoints
        if aligned is not None or base is not None:
            raise CsuloraError("--subspace replaces --aligned and --base (the pack names its pair); pass one or the "
                               "other")  # fmt: skip
        pair = subspaces.bind_pair(adapter)
        plan = bind(adapter, pair.aligned)
        pair.prepare([m.target for m in plan.modules])
        return _Inputs(adapter, plan, pair, "subspace pack")
    if aligned is None:
        raise CsuloraError("pass --aligned (the safety-aligned checkpoint), or --subspace PACK")
    aligned_ref = parse_ref(aligned)
    if aligned_ref.path is not None:  # before the base is looked for: that message would mislead
        refuse_adapter(aligned_ref.path, "--aligned")
    base_ref, source = resolve_base(adapter, aligned_ref, base)
    order = check_pair_order(aligned_ref, base_ref, source, trained_on=adapter.base_model,
                             allow_swapped=allow_swapped)  # fmt: skip
    aligned_ckpt = Checkpoint.open(aligned_ref)
    plan = bind(adapter, aligned_ckpt)
    pair = CheckpointPair(aligned_ckpt, Checkpoint.open(base_ref))
    pair.prepare([m.target for m in plan.modules] + [d.target for d in plan.dense])
    return _Inputs(adapter, plan, pair, source, order)


def resolve_base(adapter: Adapter, aligned: CheckpointRef, base: str | None) -> tuple[CheckpointRef, str]:
    """``--base``, else the adapter's base model, else — when that is the aligned model — its card's ``base_model``."""
    if base is not None:
        ref, source = parse_ref(base), "--base"
    else:
        named = adapter.base_model
        if named is None:
            raise CsuloraError(f"{adapter.path / CONFIG}: names no base_model_name_or_path; pass --base")
        if names_checkpoint(named, aligned):
            card_base = card_base_model(aligned)
            if card_base is None:
                raise CsuloraError(
                    f"{adapter.path}: was trained on the aligned model {aligned}, whose model card names no "
                    "base_model; pass --base with the pretrained (unaligned) checkpoint"
                )
            ref, source = parse_ref(card_base), "aligned model card"
        else:
            try:
                ref, source = parse_ref(named), "adapter config"
            except CsuloraError as e:
                raise CsuloraError(
                    f"{adapter.path / CONFIG}: base model {named!r} cannot be found ({e}); pass --base"
                ) from e
    if ref.same_as(aligned):
        raise CsuloraError(
            f"base {ref} is the aligned checkpoint itself, so there is no displacement; "
            "pass the pretrained (unaligned) checkpoint as --base"
        )
    return ref, source


def _run(
    inputs: _Inputs, settings: Settings, progress: Progress | None, subspaces: SubspaceSource, jobs: int,
    before_only: bool = False,
) -> tuple[Report, dict[str, torch.Tensor], dict | None]:
    """Stream the modules one at a time, shard by shard: read (or load the cached subspace), correct, free.

    Returns the report, the tensors to write, and the new ``adapter_config.json`` (``None``: unchanged);
    ``before_only``: measure the modules as they are, correct nothing (the report and no tensors)."""
    method = METHODS[settings.method]
    plan, pair = inputs.plan, inputs.pair
    if settings.form == "block" and any(k.kind == "resized" and ".lora_" in k.key for k in plan.kept):
        raise CsuloraError(f"{inputs.adapter.path}: an embedding LoRA kept as trained (resized vocabulary) cannot "
                           "keep its scaling in the block form's config; use --form factored")  # fmt: skip
    work = sorted([*plan.modules, *plan.dense], key=lambda m: (pair.shard(m.target), m.name))
    results: dict[str, Corrected] = {}
    kept, warnings = list(plan.kept), []
    try:
        with fixed_threads():  # once for every worker: each module's math on one thread (determinism.py)
            steps = ordered(lambda m: correct_module(m, pair, settings, subspaces, before_only), work, jobs)
            for i, (module, (done, warning)) in enumerate(steps):
                if progress:
                    progress("subspaces", i + 1, len(work), module.name)
                warnings += [warning] if warning else []
                if isinstance(done, Kept):
                    kept.append(done)
                else:
                    results[module.name] = done
    finally:
        pair.close()
    if progress:
        progress("subspaces", len(work), len(work), "")
    if not before_only:
        method.finish(results, settings)
    rows = [results[name].row for name in sorted(results)]
    warnings += summary_warnings(rows)
    if results and all(r.displacement_norm == 0 for r in rows):
        raise CsuloraError(
            f"base {inputs.base.ref} and aligned {inputs.aligned.ref} are identical in every targeted tensor; "
            "pass the pretrained (unaligned) checkpoint as --base"
        )
    tensors, ranks = assemble(inputs.adapter, plan, results) if not before_only else ({}, {})
    for row in rows:
        if row.kind == "expert":  # the layer's stacked factors hold every expert at the largest rank
            row.rank_after = ranks[row.module.rpartition("[")[0]] if row.output_rank != row.rank else None
    report = Report(
        tool_version=__version__,
        method=settings.method,
        form=settings.form,
        settings=settings.to_dict(),
        inputs=inputs.describe(),
        modules=rows,
        warnings=warnings,
        description=method.words(settings.to_dict(), settings.form),
        kept=sorted(kept, key=lambda k: k.key),
        before_only=before_only,
    )
    hint = weight_hint(inputs.order, report.totals()["erosion_before"], full_model=False)
    report.warnings += [hint] if hint else []
    config = None
    if report.rank_changed:
        written = [r.output_rank for r in rows if r.rank is not None]
        config = block_config(inputs.adapter, ranks, method.block_rank(written, inputs.adapter.config))
    return report, tensors, config


def correct_module(
    module: LoraModule | DenseModule, pair: CheckpointPair, settings: Settings, subspaces: SubspaceSource,
    before_only: bool = False,
) -> tuple[Corrected | Kept, str | None]:
    """One module through its method: its subspace (cached, or from ``D``, read when the method needs it), the
    correction, freed after; and a warning, if any. A dense module identical to the aligned weight is no update:
    kept, unchanged. ``before_only``: the module measured as it is, no correction (``Method.before``). Safe to run
    for several modules at once (``parallel.ordered``)."""
    method, device = METHODS[settings.method], settings.torch_device()
    with fixed_threads():  # same bytes whatever the caller's thread count (determinism.py)
        update, W_a = None, None
        if isinstance(module, DenseModule):
            read = pair.aligned.read(pair.sources(module.target)[0])
            if torch.equal(read, module.W):  # e.g. the base layer PEFT saves beside an embedding LoRA
                copy = Kept(module.key, list(module.W.shape), "aligned-copy",
                            "identical to the aligned weight: written back unchanged", identical=True)  # fmt: skip
                return copy, None
            update = DenseUpdate.of(module, read, device)
            W_a = update.W_a  # widened exactly: D is formed from it, not from a second read
            del read
        needs_D = method.dense_reads_displacement if update is not None else method.reads_displacement
        found = pair.displacement(module.target, device, W_a) if needs_D else None  # D itself, not its subspace
        sub, _ = subspaces.get(pair, module.target, settings.subspace_params(), device, found, aligned=W_a)
        D = found[0] if found else None
        if before_only:
            done = method.before_dense(update, sub, D) if update is not None else method.before(module, sub, D)
        elif update is not None:
            done = method.correct_dense(update, sub, settings, D)
        else:
            done = method.correct(module, sub, settings, D)
        done.row.k_requested = rank_cut(sub.k, done.row.shape, settings.subspace_rank, settings.max_subspace_rank)
        if done.row.k_requested is not None:
            done.row.notes.append(f"subspace rank cut: k = {sub.k} of the {done.row.k_requested} asked for, at the "
                                  "numerical rank of D")  # fmt: skip
    if sub.total_energy > 0:
        return done, None
    what = ("the whole update counts as off-subspace and is attenuated" if settings.method == "csulora"
            else "the module is left unchanged")  # fmt: skip
    return done, f"{module.name}: base and aligned weights are equal; empty subspace, so {what}"


def assemble(
    adapter: Adapter, plan: Plan, results: dict[str, Corrected]
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """Every tensor of the adapter, the corrected ones replaced: a layer's factors, an expert stack's (each
    expert's factors in PEFT's layout, zero-padded to the largest rank), a dense module's full weight.
    Also returns each layer's written rank by its pattern name (the block form's config)."""
    tensors = dict(adapter.tensors)
    ranks: dict[str, int] = {}
    by_layer: dict[str, list[LoraModule]] = {}
    for m in plan.modules:
        by_layer.setdefault(m.layer.a_key, []).append(m)
    for group in by_layer.values():
        first = group[0]
        done = [results[m.name] for m in sorted(group, key=lambda m: m.target.expert or 0)]
        if first.kind != "expert":
            tensors[first.key("A")], tensors[first.key("B")] = done[0].A, done[0].B
            ranks[first.pattern_name] = done[0].A.shape[0]
            continue
        r = max(res.A.shape[0] for res in done)
        A = torch.cat([_pad(res.A, r, 0) for res in done])
        B = torch.stack([_pad(res.B, r, 1) for res in done], dim=2).reshape(first.B.shape[0], -1)
        tensors[first.key("A")], tensors[first.key("B")], ranks[first.pattern_name] = A, B, r
    for d in plan.dense:
        if d.name in results:
            tensors[d.key] = results[d.name].W
    return tensors, ranks


def _pad(x: torch.Tensor, rank: int, dim: int) -> torch.Tensor:
    """Factors of rank ``rank``: zero rows (``A``, dim 0) or columns (``B``, dim 1) add nothing to ``B A``."""
    missing = rank - x.shape[dim]
    if missing == 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


@dataclass
class SubspaceRow:
    module: str
    shape: list[int]
    k: int
    captured: float
    cached: bool  # loaded from the cache rather than computed


def precompute_subspaces(
    aligned: str,
    base: str,
    modules: list[str] | None = None,
    *,
    settings: Settings = Settings(),
    fan_in_fan_out: bool = False,
    subspaces: SubspaceSource | None = None,
    progress: Progress | None = None,
    jobs: int | None = None,
    allow_swapped: bool = False,
) -> list[SubspaceRow]:
    """Compute (or find in the cache) the subspace of each linear module of a checkpoint pair, for later runs.

    ``modules``: names matched as PEFT matches a ``target_modules`` list (the full name, or its last
    dotted parts, e.g. ``q_proj``); default every 2-D weight but embeddings and the output head.
    """
    settings = settings.resolved()
    validate(settings)
    source = subspaces or SubspaceSource.open()
    if source.cache is None:
        raise CsuloraError("precomputing subspaces without a cache keeps nothing; drop --no-cache")
    aligned_ref, base_ref = parse_ref(aligned), parse_ref(base)
    if base_ref.same_as(aligned_ref):
        raise CsuloraError(f"base {base} is the aligned checkpoint itself; pass the pretrained checkpoint as --base")
    check_pair_order(aligned_ref, base_ref, "--base", allow_swapped=allow_swapped)
    _phase(progress, "reading", 0, aligned)
    aligned_ckpt = Checkpoint.open(aligned_ref)
    targets = pack_targets(aligned_ckpt, modules, fan_in_fan_out)  # the modules a pack of the pair would hold
    pair = CheckpointPair(aligned_ckpt, Checkpoint.open(base_ref))
    pair.prepare(targets)  # both shapes checked
    targets.sort(key=lambda t: (pair.shard(t), t.id))  # shard by shard
    _phase(progress, "reading", 1, aligned)
    params, device, rows = settings.subspace_params(), settings.torch_device(), []
    try:
        with fixed_threads():
            found = ordered(lambda t: source.get(pair, t, params, device), targets,
                            jobs or default_workers(settings.device))  # fmt: skip
            for i, (target, (sub, cached)) in enumerate(found):
                if progress:
                    progress("subspaces", i + 1, len(targets), target.id)
                name = target.param.removesuffix(".weight") + ("" if target.expert is None else f"[{target.expert}]")
                rows.append(SubspaceRow(name, list(pair.aligned.shape(pair.sources(target)[0])), sub.k,
                                        sub.captured_fraction, cached))  # fmt: skip
    finally:
        pair.close()
    if progress:
        progress("subspaces", len(targets), len(targets), "")
    return sorted(rows, key=lambda r: r.module)
