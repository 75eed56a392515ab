"""Full fine-tunes and merged models (DESIGN.md §10): ``sanitize_model()`` and ``audit_model()``.

Every weight of the transformer blocks that the model, the aligned and the base checkpoints all hold with one
shape is a dense module (``ΔW = W − W_a``, §6b) corrected by its method's exact form, in float32, and cast
once to its dtype; a 3-D expert stack is one module per expert. Every other tensor is copied bit for bit. The
output keeps the input's shard files, index, dtypes and config, is written shard by shard, one tensor at a time,
into a temp folder that is renamed when complete (``outputs.write_folder``).
"""

from __future__ import annotations

import re
import shlex
import shutil
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import __version__
from .api import Progress, Result, _describe, _phase, correct_module, default_output
from .cache import SubspaceSource
from .determinism import fixed_threads
from .errors import CsuloraError
from .io.adapters import CONFIG, OUTSIDE_METHOD, DenseModule, Kept
from .io.checkpoints import Checkpoint, CheckpointPair, CheckpointRef, card_base_model, parse_ref, public_name
from .io.layouts import Target, is_block_weight
from .io.outputs import check_output, write_folder
from .io.tensorfile import READABLE_DTYPES, rewrite
from .methods import METHODS, validate
from .methods.base import summary_warnings
from .pair_order import check_pair_order, weight_hint
from .parallel import default_workers, ordered
from .reports.card import model_card
from .reports.report import Report, to_markdown
from .reports.report_html import to_html
from .settings import Settings

# Files never copied from a model folder: weights in other formats hold the unsanitized model again.
WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".npz", ".ot", ".tflite",
                   ".safetensors", ".pkl")  # fmt: skip


@dataclass
class ModelInputs:
    model: Checkpoint
    pair: CheckpointPair
    targets: dict[str, list[Target]]  # model tensor → its modules (one; one per expert of a 3-D stack)
    base_source: str
    skipped: list[str] = field(default_factory=list)  # files of the model folder not copied, and why
    order: dict = field(default_factory=dict)  # what the metadata said of the pair's order (pair_order.py)

    def describe(self) -> dict:
        return {
            "model": {**_describe(self.model), "path": self.model.ref.spec},
            "aligned": {**_describe(self.pair.aligned), "source": "--aligned"},
            "base": {**_describe(self.pair.base), "source": self.base_source},
            "pair_order": self.order,
        }


def sanitize_model(
    model: str | Path,
    aligned: str,
    base: str | None = None,
    output: str | Path | None = None,
    *,
    settings: Settings = Settings(),
    target_modules: str | None = None,
    force: bool = False,
    command: list[str] | None = None,
    progress: Progress | None = None,
    subspaces: SubspaceSource | None = None,
    jobs: int | None = None,
    allow_swapped: bool = False,
    calibration: dict | None = None,
) -> Result:
    """Sanitize a full fine-tune or merged model and write it (``<model>-sanitized`` by default).
    ``calibration``: what ``--calibrate`` measured and chose (calibrate.py), kept in the report and the card."""
    settings = model_settings(settings)
    ref = parse_ref(str(model))
    out = Path(output) if output is not None else default_output(ref.path if ref.path else Path(ref.repo_id))
    if ref.path is not None:
        check_output(out, force, [ref.path])
    t0 = time.perf_counter()
    _phase(progress, "reading", 0, str(model))
    inputs = _load(ref, aligned, base, target_modules, allow_swapped)
    check_output(out, force, [inputs.model.folder, inputs.pair.aligned.folder, inputs.pair.base.folder])
    _phase(progress, "reading", 1, str(model))
    command_line = shlex.join(command) if command else f"csulora.sanitize_model({str(model)!r}, {aligned!r}, ...)"
    found: dict = {}

    def fill(tmp: Path) -> None:
        found["report"] = _stream(inputs, settings, progress, subspaces or SubspaceSource.open(), tmp,
                                  jobs or default_workers(settings.device))  # fmt: skip
        report = found["report"]
        report.calibration = calibration
        for f in _copied(inputs.model.folder):
            shutil.copyfile(f, tmp / f.name)
        (tmp / "README.md").write_text(model_card(report, inputs.pair.aligned.ref.spec, command_line, _form_words()))
        (tmp / "csulora_report.json").write_text(report.to_json())
        (tmp / "csulora_report.md").write_text(to_markdown(report))
        (tmp / "csulora_report.html").write_text(to_html(report))

    try:
        write_folder(out, fill, replace=force)
    finally:
        inputs.model.close()
        inputs.pair.close()
    return Result(found["report"], out, {"total_s": time.perf_counter() - t0})


def check_model_inputs(model: str | Path, aligned: str, base: str | None = None,
                       target_modules: str | None = None, allow_swapped: bool = False) -> int:  # fmt: skip
    """Read the model's and both checkpoints' headers as ``sanitize_model()`` does first (bad input fails here);
    the bytes of the model's shards, what each sanitized copy takes on disk."""
    inputs = _load(parse_ref(str(model)), aligned, base, target_modules, allow_swapped)
    inputs.model.close()
    inputs.pair.close()
    return sum((inputs.model.folder / s).stat().st_size for s in set(inputs.model.weight_map.values()))


def audit_model(
    model: str | Path,
    aligned: str,
    base: str | None = None,
    *,
    settings: Settings = Settings(),
    target_modules: str | None = None,
    progress: Progress | None = None,
    subspaces: SubspaceSource | None = None,
    jobs: int | None = None,
    allow_swapped: bool = False,
) -> Result:
    """The report of ``sanitize_model()`` without writing anything."""
    settings = model_settings(settings)
    t0 = time.perf_counter()
    inputs = _load(parse_ref(str(model)), aligned, base, target_modules, allow_swapped)
    try:
        report = _stream(inputs, settings, progress, subspaces or SubspaceSource.open(), None,
                         jobs or default_workers(settings.device))  # fmt: skip
    finally:
        inputs.model.close()
        inputs.pair.close()
    return Result(report, None, {"total_s": time.perf_counter() - t0})


def _copied(folder: Path) -> list[Path]:
    """The small files of a model folder that the output keeps (config, index, tokenizer, generation config …):
    every file but the model card (replaced) and weights (the shards are rewritten; other formats are dropped)."""
    return [f for f in sorted(folder.iterdir()) if f.is_file() and f.name != "README.md"
            and not f.name.endswith(WEIGHT_SUFFIXES)]  # fmt: skip


def _not_copied(model: Checkpoint) -> list[str]:
    """What of the model folder the output leaves out, in words: weights in other formats, subfolders."""
    shards = set(model.weight_map.values())
    return [f"{f.name}{'/' if f.is_dir() else ''}: not copied ("
            + ("a folder" if f.is_dir() else "weights in another format, which would hold the unsanitized model")
            + ")" for f in sorted(model.folder.iterdir())
            if f.is_dir() or (f.name.endswith(WEIGHT_SUFFIXES) and f.name not in shards)]  # fmt: skip


def model_settings(settings: Settings) -> Settings:
    """``settings`` resolved and checked for a full model (exact forms only; no --top-n)."""
    settings = settings.resolved()
    validate(settings)
    if settings.form != "factored":
        raise CsuloraError("--form applies to adapters; a full model is corrected by each method's exact form")
    if settings.top_n is not None:
        raise CsuloraError("--top-n needs every module's score before the first is written; with --model use "
                           "--threshold")  # fmt: skip
    return settings


def _form_words() -> str:
    return ("every weight of the transformer blocks was corrected by the method's exact form as a dense update "
            "ΔW = W − W_aligned; every other tensor, the shard files, the index and config.json are as they were.")


def _load(ref: CheckpointRef, aligned: str, base: str | None, target_modules: str | None,
          allow_swapped: bool = False) -> ModelInputs:  # fmt: skip
    if ref.path is not None and (ref.path / CONFIG).is_file():
        raise CsuloraError(f"{ref.path}: is a PEFT adapter folder ({CONFIG}); pass it with --adapter, not --model")
    model = Checkpoint.open(ref)
    model.require(sorted(model.weight_map))  # every shard present and sound, before anything is written
    aligned_ref = parse_ref(aligned)
    if ref.same_as(aligned_ref):
        raise CsuloraError(f"--model {ref} is the aligned checkpoint itself; pass the fine-tuned model")
    base_ref, source = _base(aligned_ref, base)
    order = check_pair_order(aligned_ref, base_ref, source, trained_on=card_base_model(ref),
                             trained_on_what=f"the base_model of {public_name(ref.spec)}'s card",
                             allow_swapped=allow_swapped)  # fmt: skip
    pair = CheckpointPair(Checkpoint.open(aligned_ref), Checkpoint.open(base_ref))
    try:
        pattern = re.compile(target_modules) if target_modules else None
    except re.error as e:
        raise CsuloraError(f"--target-modules {target_modules!r} is not a valid regular expression ({e})") from e
    targets: dict[str, list[Target]] = {}
    for key in sorted(model.weight_map, key=lambda k: (model.weight_map[k], k)):
        info = model.info(key)
        if info.dtype not in ("F32", "F16", "BF16", "F64") or len(info.shape) not in (2, 3) or not is_block_weight(key):
            continue
        if pattern is not None and pattern.search(key) is None:
            continue
        experts = [None] if len(info.shape) == 2 else list(range(info.shape[0]))
        targets[key] = [Target(key, e) for e in experts]
    if not targets:
        raise CsuloraError(f"{ref}: holds no weight of the transformer blocks"
                           + (f" matching --target-modules {target_modules!r}" if pattern else "")
                           + "; is this a full model checkpoint?")  # fmt: skip
    pair.prepare([t for ts in targets.values() for t in ts])  # the aligned and base hold every one, one shape
    for key, ts in targets.items():
        for t in ts:
            stored, expected = model.shape(model.source(t)), pair.aligned.shape(pair.sources(t)[0])
            if stored != expected:
                raise CsuloraError(f"{key}: {ref} has shape {list(stored)} but the aligned {aligned_ref} has "
                                   f"{list(expected)}; the model is not a fine-tune of the aligned model")  # fmt: skip
    return ModelInputs(model, pair, targets, source, order=order)


def _base(aligned: CheckpointRef, base: str | None) -> tuple[CheckpointRef, str]:
    """``--base``, else the ``base_model`` of the aligned model's card."""
    if base is not None:
        ref, source = parse_ref(base), "--base"
    else:
        named = card_base_model(aligned)
        if named is None:
            raise CsuloraError(f"the aligned model {aligned}'s card names no base_model; pass --base with the "
                               "pretrained (unaligned) checkpoint")  # fmt: skip
        ref, source = parse_ref(named), "aligned model card"
    if ref.same_as(aligned):
        raise CsuloraError(f"base {ref} is the aligned checkpoint itself, so there is no displacement; "
                           "pass the pretrained (unaligned) checkpoint as --base")  # fmt: skip
    return ref, source


def _stream(
    inputs: ModelInputs, settings: Settings, progress: Progress | None, subspaces: SubspaceSource, out: Path | None,
    jobs: int,
) -> Report:
    """Every tensor of the model, shard by shard in file order: a target corrected (its experts one by one, by
    ``jobs`` workers ahead of the writer), any other compared with the aligned tensor of its name and copied.
    Writes the shards into ``out`` if given."""
    model, pair, method = inputs.model, inputs.pair, METHODS[settings.method]
    rows, kept, warnings = [], [], _not_copied(model) if out is not None else []
    metadata = {"format": "pt", "csulora_version": __version__,
                **{f"csulora_{k}": str(v) for k, v in settings.to_dict().items()}}  # fmt: skip
    shards = sorted(set(model.weight_map.values()))
    order = {s: sorted(model.header(s).tensors, key=lambda k: model.header(s).tensors[k].start) for s in shards}
    targets = [t for s in shards for key in order[s] for t in inputs.targets.get(key, [])]

    def work(target: Target):
        weight = model.read(model.source(target))
        name = target.id.removesuffix(".weight") if target.expert is None else target.id
        return correct_module(DenseModule(name, target.param, weight, target), pair, settings, subspaces)

    with fixed_threads():  # once for every worker: each module's math on one thread (determinism.py)
        results = ordered(work, targets, jobs)
        done = 0

        def produce(key: str) -> torch.Tensor | Iterator[torch.Tensor | None] | None:
            info = model.info(key)
            if key not in inputs.targets:
                if info.dtype not in READABLE_DTYPES:
                    kind = "not-targeted" if is_block_weight(key) and len(info.shape) in (2, 3) else OUTSIDE_METHOD
                    kept.append(Kept(key, list(info.shape), kind,
                                     f"dtype {info.dtype}: copied byte for byte, not sanitized"))  # fmt: skip
                    return None
                W = model.get(key)
                kept.extend(_compare(key, W, pair.aligned))
                return W
            if inputs.targets[key][0].expert is None:
                return take(inputs.targets[key][0])
            return (take(t) for t in inputs.targets[key])  # a stack: one expert in memory at a time

        def take(target: Target) -> torch.Tensor | None:
            """The next worker's result, ``target``'s: its corrected weight, or the weight as it was."""
            nonlocal done
            found, (result, warning) = next(results)
            assert found == target, (found, target)  # the workers' order is the file's
            done += 1
            if progress:
                progress("modules", done, len(targets), target.id)
            warnings.extend([warning] if warning else [])
            if isinstance(result, Kept):  # identical to the aligned weight: nothing to correct
                return None if target.expert is None else model.read(model.source(target))
            method.finish({result.row.module: result}, settings)  # Safe LoRA's τ needs no other score
            rows.append(result.row)
            return result.W

        for shard in shards:
            if out is not None:
                rewrite(model.folder / shard, out / shard, produce, metadata)
            else:
                for key in order[shard]:
                    produced = produce(key)
                    if produced is not None and not isinstance(produced, torch.Tensor):
                        deque(produced, maxlen=0)  # a stack's experts, one by one
    rows.sort(key=lambda r: r.module)
    warnings.extend(summary_warnings(rows))
    if rows and all(r.displacement_norm == 0 for r in rows):
        raise CsuloraError(f"base {pair.base.ref} and aligned {pair.aligned.ref} are identical in every targeted "
                           "tensor; pass the pretrained (unaligned) checkpoint as --base")  # fmt: skip
    report = Report(
        tool_version=__version__, method=settings.method, form="exact", settings=settings.to_dict(),
        inputs=inputs.describe(), modules=rows, warnings=warnings,
        description=method.words(settings.to_dict(), "exact"), kept=sorted(kept, key=lambda k: k.key),
    )  # fmt: skip
    hint = weight_hint(inputs.order, report.totals()["erosion_before"], full_model=True)
    report.warnings += [hint] if hint else []
    return report


def _compare(key: str, W: torch.Tensor, aligned: Checkpoint) -> list[Kept]:
    """A tensor copied as it is: nothing to report when it equals the aligned tensor of its name, else kept."""
    if key not in aligned.weight_map:
        return [Kept(key, list(W.shape), "not-in-aligned", f"the aligned checkpoint has no {key}: copied as it is")]
    aligned.require([key])
    if tuple(aligned.info(key).shape) == tuple(W.shape) and torch.equal(aligned.get(key), W):
        return []
    if not is_block_weight(key) or W.ndim not in (2, 3):
        return [Kept(key, list(W.shape), OUTSIDE_METHOD, "not a weight of the transformer blocks (embedding, head, "
                     "norm, bias), which no method corrects: copied as trained")]  # fmt: skip
    return [Kept(key, list(W.shape), "not-targeted", "excluded by --target-modules: copied as trained, not sanitized")]

