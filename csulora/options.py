"""The command-line options, each declared once, and the decorator that gives a command a group of them.

Every option of every command is declared here, in a ``Group`` (parameter name → annotated type and default),
with its help panel (``rich_help_panel``, one of ``PANELS``), a conventional metavar (``PATH``, ``REF`` for a
folder or Hub id, ``FLOAT``, the choices) and a short help. ``@with_options(INPUT, METHOD, ...)`` gives a command
the groups' parameters (typer reads ``__signature__``) and hands it their values as one ``Options`` mapping.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, get_args

import typer

from .errors import CsuloraError
from .settings import DEFAULT_METHOD, METHOD_DEFAULTS, Settings

if TYPE_CHECKING:
    from .cache import SubspaceSource
    from .evaluate import EvalOptions
    from .pack import PackSource

DEFAULTS = Settings()  # the one place defaults live; the options below show them

# The help panels, in the order a command's help shows them (a command shows those it has options in).
PANELS = ("Inputs", "Method", "Subspace", "Calibration", "Evaluation", "Gate", "Output", "Batch", "Runtime")


def _per_method(key: str) -> str:
    """``realign 4, csulora 64``: each method's default of one setting, for that setting's own help."""
    return ", ".join(f"{m} {d[key]:g}" for m, d in METHOD_DEFAULTS.items() if key in d)


def _choices(values) -> str:
    return "[" + "|".join(values) + "]"


Group = dict[str, tuple[Any, Any]]  # parameter name → (Annotated type, default)

# A command's own inputs (what it reads); each command takes one of these groups.
ADAPTERS: Group = {
    "adapter": (Annotated[list[Path] | None, typer.Option(
        "--adapter", metavar="PATH", rich_help_panel="Inputs",
        help="PEFT LoRA adapter folder, or a folder of them (a batch); may repeat.")], None),
    "model": (Annotated[str | None, typer.Option(
        "--model", metavar="REF", rich_help_panel="Inputs",
        help="A full fine-tune or merged model instead of an adapter: folder or Hub id.")], None),
    "target_modules": (Annotated[str | None, typer.Option(
        "--target-modules", metavar="REGEX", rich_help_panel="Inputs",
        help="--model: correct only weights whose name matches this regular expression (searched, e.g. "
             "'self_attn|mlp'). Default: every weight of the transformer blocks.")], None),
}  # fmt: skip
SWEEP_INPUT: Group = {
    "adapter": (Annotated[Path | None, typer.Option(
        "--adapter", metavar="PATH", rich_help_panel="Inputs", help="PEFT LoRA adapter folder.")], None),
    "model": (Annotated[str | None, typer.Option(
        "--model", metavar="REF", rich_help_panel="Inputs",
        help="A full fine-tune or merged model instead: every point is a whole model.")], None),
    "target_modules": ADAPTERS["target_modules"],
}  # fmt: skip
INPUT: Group = {
    "aligned": (Annotated[str | None, typer.Option(
        "--aligned", metavar="REF", rich_help_panel="Inputs",
        help="Safety-aligned checkpoint: folder or Hub id org/name@rev (or --subspace PACK instead).")], None),
    "base": (Annotated[str | None, typer.Option(metavar="REF", rich_help_panel="Inputs",
                                                help="Pretrained (unaligned) checkpoint. Default: the adapter's base "
                                                     "model, or the aligned card's.")], None),
    "trust_pickle": (Annotated[bool, typer.Option("--trust-pickle", rich_help_panel="Inputs",
                                                  help="Allow adapter_model.bin (loaded weights-only).")], False),
}  # fmt: skip
PAIR: Group = {  # `subspace`: the checkpoint pair alone
    "aligned": (Annotated[str | None, typer.Option("--aligned", metavar="REF", rich_help_panel="Inputs",
                                                   help="Safety-aligned checkpoint: folder or Hub id.")], None),
    "base": (Annotated[str | None, typer.Option(metavar="REF", rich_help_panel="Inputs",
                                                help="Pretrained (unaligned) checkpoint: folder or Hub id.")], None),
    "modules": (Annotated[list[str] | None, typer.Option(
        "--modules", metavar="NAMES", rich_help_panel="Inputs",
        help="Modules (e.g. q_proj; comma-separated or repeated). Default: all linear. verify: N (spread over the "
             "pack; default 16), all, or names.")], None),
    "fan_in_fan_out": (Annotated[bool, typer.Option("--fan-in-fan-out", rich_help_panel="Inputs",
                                                    help="For adapters with fan_in_fan_out (GPT-2 Conv1D).")], False),
}  # fmt: skip

SUBSPACE: Group = {
    "subspace_rank": (Annotated[int | None, typer.Option(
        metavar="INT", rich_help_panel="Subspace",
        help=f"Fixed subspace rank k (overrides the energy rule). Default: {_per_method('subspace_rank')}; the "
             f"others choose k by energy.")], None),
    "subspace_energy": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Subspace",
        help=f"Choose k to hold this fraction η of ‖D‖². Default: {_per_method('subspace_energy')}.")], None),
    "max_subspace_rank": (Annotated[int, typer.Option(metavar="INT", rich_help_panel="Subspace",
                                                      help="Cap on the subspace rank.")], DEFAULTS.max_subspace_rank),
    "exact_svd": (Annotated[bool, typer.Option("--exact-svd", rich_help_panel="Subspace",
                                               help="Exact SVD instead of the seeded randomized one.")],
                  DEFAULTS.exact_svd),
    "seed": (Annotated[int, typer.Option(metavar="INT", rich_help_panel="Subspace",
                                         help="Seed of the randomized SVD.")], DEFAULTS.seed),
    "device": (Annotated[str, typer.Option(metavar=_choices(("auto", "cpu", "cuda")), rich_help_panel="Runtime",
                                           help="Where the arithmetic runs.")], DEFAULTS.device),
}  # fmt: skip
FORM: Group = {
    "form": (Annotated[str, typer.Option(metavar=_choices(("factored", "block")), rich_help_panel="Method",
                                         help="factored (same rank and config) or block (exact, higher rank).")],
             DEFAULTS.form),
}  # fmt: skip
METHOD: Group = {
    "method": (Annotated[str, typer.Option(metavar="NAME", rich_help_panel="Method",
                                           help="realign, csulora (the paper's method), safe-lora or resta (the "
                                                "baselines); docs/defaults.md.")], DEFAULT_METHOD),
}  # fmt: skip
CORRECTION: Group = {
    "lam": (Annotated[float | None, typer.Option(
        "--lambda", metavar="FLOAT", rich_help_panel="Method",
        help=f"Strength λ ≥ 0 (0 = unchanged; inf allowed). Default: {_per_method('lam')}; realign with λ and β "
             "both left out (factored, k = 8): inf and β 0.5 where the adapter is small against the alignment "
             "(‖ΔW‖/‖D_8‖ ≤ 1.7, docs/defaults.md).")], None),
    "beta": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Method",
        help=f"realign: pull the in-subspace part toward β·D_k (0: erase it). Default: {_per_method('beta')}.")],
        None),
    "threshold": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Method",
        help=f"safe-lora: project modules with score ≤ τ. Default: {_per_method('threshold')} (the paper's "
             "0.5).")], None),
    "top_n": (Annotated[int | None, typer.Option(
        "--top-n", metavar="INT", rich_help_panel="Method",
        help="safe-lora: project the n lowest-scoring modules instead.")], None),
    "gamma": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Method",
        help=f"resta: add γ times the safety displacement (D, or D_k on adapters). Default: "
             f"{_per_method('gamma')}.")], None),
}  # fmt: skip
WRITE: Group = {
    "output": (Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="PATH", rich_help_panel="Output",
        help="Output folder (default: <adapter>-sanitized).")], None),
    "force": (Annotated[bool, typer.Option("--force", rich_help_panel="Output",
                                           help="Replace an existing output folder.")], False),
}  # fmt: skip
BATCH: Group = {
    "skip_existing": (Annotated[bool, typer.Option(
        "--skip-existing", rich_help_panel="Batch",
        help="Leave adapters whose output exists (resume a run).")], False),
    "shard": (Annotated[str | None, typer.Option(
        metavar="I/N", rich_help_panel="Batch",
        help="Process only slice i of N (1-based), e.g. for array jobs.")], None),
}  # fmt: skip
GATE: Group = {  # `audit`: the thresholds that make it exit 1
    "max_off_energy": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Gate",
        help="Fail when the adapter's total off-subspace energy ρ_O exceeds this.")], None),
    "max_layer_off_energy": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Gate",
        help="Fail when any module's off-subspace energy ρ_O exceeds this.")], None),
    "min_safe_lora_score": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Gate", help="Fail when any module's Safe LoRA score is below this.")], None),
    "min_erosion": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Gate",
        help="Fail when the adapter's erosion coefficient ⟨ΔW, D_k⟩/‖D_k‖² is below this (e.g. -0.113): it turns "
             "the aligned directions back. A pre-check only (docs/audit.md).")], None),
    "fail_on_kept": (Annotated[bool, typer.Option(
        "--fail-on-kept", rich_help_panel="Gate",
        help="Fail when the adapter saves tensors kept as trained, not sanitized (DoRA magnitudes, biases, resized "
             "embeddings, trainable tokens; copies of the aligned weights pass); --model: weights left out by "
             "--target-modules (norms, embeddings, head pass).")], False),
    "html": (Annotated[Path | None, typer.Option(
        metavar="PATH", rich_help_panel="Output",
        help="Also write the HTML report to this file (one adapter).")], None),
    "before_only": (Annotated[bool, typer.Option(
        "--before-only", rich_help_panel="Gate",
        help="Measure each adapter as it is, without running the method: every threshold above is a \"before\" "
             "value, and a folder of adapters is audited several times faster; the report has no \"after\" values. "
             "Adapters only.")], False),
}  # fmt: skip
SWEEP: Group = {
    "output": (Annotated[Path, typer.Option("--output", "-o", metavar="PATH", rich_help_panel="Output",
                                            help="Folder of the sweep: one subfolder per point.")], ...),
    "method": (Annotated[list[str] | None, typer.Option(
        "--method", metavar="NAME", rich_help_panel="Method",
        help="realign, csulora, safe-lora or resta: a method of the ladder; may repeat. Default: realign.")], None),
    "lambdas": (Annotated[str | None, typer.Option(metavar="FLOATS", rich_help_panel="Method",
                                                   help="λ values, e.g. 0.5,2,8,inf (realign, csulora).")], None),
    "betas": (Annotated[str | None, typer.Option(metavar="FLOATS", rich_help_panel="Method",
                                                 help="β values, e.g. 0,0.25 (realign).")], None),
    "thresholds": (Annotated[str | None, typer.Option(metavar="FLOATS", rich_help_panel="Method",
                                                      help="τ values, e.g. 0.3,0.5 (safe-lora).")], None),
    "gammas": (Annotated[str | None, typer.Option(metavar="FLOATS", rich_help_panel="Method",
                                                  help="γ values, e.g. 0.1,0.25,0.5 (resta).")], None),
    "eval_cmd": (Annotated[str | None, typer.Option(
        metavar="TEXT", rich_help_panel="Evaluation",
        help="Shell command run once per point, {adapter} (or {model}) replaced by its folder; its last stdout line "
             "is one JSON object of numeric metrics (e.g. csulora eval … --adapter {adapter}).")], None),
    "eval_timeout": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Evaluation", help="Seconds before an evaluation counts as failed.")], None),
    "pick": (Annotated[list[str] | None, typer.Option(
        "--pick", metavar="RULE", rich_help_panel="Evaluation",
        help="Rule METRIC>=X or METRIC<=X every picked point meets; repeat.")], None),
    "maximize": (Annotated[str | None, typer.Option(
        metavar="METRIC", rich_help_panel="Evaluation",
        help="Pick the qualifying point with the largest METRIC; copied to OUT/picked/.")], None),
    "plot": (Annotated[str | None, typer.Option(metavar="X,Y", rich_help_panel="Output",
                                                help="The metrics the front is drawn with.")], None),
    "skip_existing": (Annotated[bool, typer.Option("--skip-existing", rich_help_panel="Output",
                                                   help="Resume: keep the points already done.")], False),
    "force": (Annotated[bool, typer.Option("--force", rich_help_panel="Output",
                                           help="Redo every point of an existing sweep.")], False),
}  # fmt: skip
DEMO: Group = {
    "workdir": (Annotated[Path, typer.Option(metavar="PATH", rich_help_panel="Output",
                                             help="Where the demo writes its files.")], Path("csulora-demo")),
    "world": (Annotated[str | None, typer.Option(
        metavar="NAME", rich_help_panel="Inputs",
        help="A shipped miniature world: tiny (default), wide, brief, moe or topic.")], None),
    "adapter": (Annotated[str | None, typer.Option(
        "--adapter", metavar="NAME", rich_help_panel="Inputs",
        help="An adapter of that world. Default: adv-r8-all-s0 (moe: adv-r8-all-linear-s0).")], None),
}  # fmt: skip
EVAL: Group = {
    "aligned": (Annotated[str, typer.Option("--aligned", metavar="REF", rich_help_panel="Inputs",
                                            help="Model to run (the adapter goes on it): folder or Hub id.")], ...),
    "harmful": (Annotated[str, typer.Option(
        metavar="PATH|REF", rich_help_panel="Inputs",
        help="Harmful prompts: a file (one per line, AdvBench's CSV, JSON lines) or a Hub dataset "
             "org/name[:file].")], ...),
    "adapter": (Annotated[Path | None, typer.Option(
        metavar="PATH", rich_help_panel="Inputs", help="PEFT LoRA adapter folder (default: the model alone).")], None),
    "utility": (Annotated[Path | None, typer.Option(
        metavar="PATH", rich_help_panel="Inputs", help='Utility prompts: JSON lines {"prompt": …, "answer": …}.')],
        None),
    "match": (Annotated[str, typer.Option(
        metavar="[contains|exact]", rich_help_panel="Evaluation",
        help="Utility: contains (the answer appears) or exact (stripped equal).")], "contains"),
    "device": (Annotated[str, typer.Option(metavar=_choices(("auto", "cpu", "cuda")), rich_help_panel="Runtime",
                                           help="Where the model runs.")], "auto"),
    "json_file": (Annotated[Path | None, typer.Option(
        "--json-out", metavar="PATH", rich_help_panel="Output",
        help="Also write the metrics and example completions to this file.")], None),
}  # fmt: skip
# A swapped --aligned/--base pair is refused on the metadata's word (pair_order.py); this lets a user overrule it.
PAIR_ORDER: Group = {
    "allow_swapped": (Annotated[bool, typer.Option(
        "--allow-swapped", rich_help_panel="Inputs",
        help="Run even when the metadata says --aligned and --base are swapped.")], False),
}  # fmt: skip
# Subspace packs (DESIGN.md §11, docs/packs.md): where sanitize/audit/sweep take their subspaces instead of
# the checkpoints, and what `csulora subspace` writes.
PACK: Group = {
    "subspace": (Annotated[str | None, typer.Option(
        "--subspace", metavar="PATH|REF", rich_help_panel="Inputs",
        help="Subspace pack (folder or Hub id org/name@rev) instead of --aligned and --base: realign, csulora, "
             "resta.")], None),
    "accept_pack_mismatch": (Annotated[bool, typer.Option(
        "--accept-pack-mismatch", rich_help_panel="Inputs",
        help="Use the pack although the adapter's base model names neither of its references.")], False),
}  # fmt: skip
PACK_OUTPUT: Group = {
    "pack_output": (Annotated[Path | None, typer.Option(
        "--output", "-o", metavar="PATH", rich_help_panel="Output",
        help="Write a subspace pack to this folder (publishable as a Hub repo), not only the cache.")], None),
    "force": (Annotated[bool, typer.Option("--force", rich_help_panel="Output",
                                           help="Replace an existing pack folder.")], False),
}  # fmt: skip
# How a model is run: the generation options of `csulora eval`, shared by `sanitize --calibrate` and
# `audit --harmful` (the same machinery: evaluate.py). The device is each command's own --device.
GENERATION: Group = {
    "dtype": (Annotated[str, typer.Option(
        metavar="TEXT", rich_help_panel="Evaluation",
        help="auto (the checkpoint's on GPU, float32 on CPU), float32, bfloat16 …")], "auto"),
    "batch_size": (Annotated[int, typer.Option(metavar="INT", rich_help_panel="Evaluation",
                                               help="Prompts per generation batch.")], 16),
    "max_new_tokens": (Annotated[int, typer.Option(metavar="INT", rich_help_panel="Evaluation",
                                                   help="Tokens generated per prompt (greedy).")], 64),
    "harmful_tokens": (Annotated[int | None, typer.Option(
        metavar="INT", rich_help_panel="Evaluation",
        help="Tokens per harmful prompt, if fewer: refusals show early (default: as above).")], None),
    "limit": (Annotated[int | None, typer.Option(
        metavar="INT", rich_help_panel="Evaluation",
        help="Use only the first N prompts of each set (default: eval all; --calibrate and audit --harmful "
             "64).")], None),
}  # fmt: skip
HARMFUL: Group = {
    "harmful": (Annotated[str | None, typer.Option(
        metavar="PATH|REF", rich_help_panel="Evaluation",
        help="Harmful prompts: a file (one per line, AdvBench's CSV, JSON lines) or a Hub dataset "
             "org/name[:file], e.g. walledai/AdvBench.")], None),
}  # fmt: skip
CALIBRATE: Group = {
    "calibrate": (Annotated[bool, typer.Option(
        "--calibrate", rich_help_panel="Calibration",
        help="Pick realign's setting by measuring a ladder of candidates with the model: one --adapter, or a "
             "--model whose candidates are whole models (docs/calibration.md).")],
        False),
    "prompts": (Annotated[str | None, typer.Option(
        metavar="PATH|REF", rich_help_panel="Calibration",
        help="The fine-tune's own prompts, no answers (a file as --harmful).")], None),
    "general": (Annotated[str | None, typer.Option(
        metavar="PATH|REF", rich_help_panel="Calibration",
        help="Everyday prompts the aligned model must keep answering as it did (optional).")], None),
    "calibrate_all": (Annotated[bool, typer.Option(
        "--calibrate-all", rich_help_panel="Calibration",
        help="Measure every rung of the ladder instead of bisecting.")], False),
}  # fmt: skip
REFUSAL_GATE: Group = {
    "min_refusal": (Annotated[float | None, typer.Option(
        metavar="FLOAT", rich_help_panel="Gate",
        help="--harmful: fail when the fine-tuned model refuses fewer than this share.")], None),
    "min_refusal_ratio": (Annotated[float, typer.Option(
        metavar="FLOAT", rich_help_panel="Gate",
        help="--harmful: fail when it refuses less than this fraction of the aligned model's refusal.")], 0.9),
}  # fmt: skip
CACHE: Group = {
    "cache_dir": (Annotated[Path | None, typer.Option(
        metavar="PATH", rich_help_panel="Runtime",
        help="Subspace cache folder (default $CSULORA_CACHE, $XDG_CACHE_HOME/csulora, ~/.cache/csulora).")], None),
    "no_cache": (Annotated[bool, typer.Option("--no-cache", rich_help_panel="Runtime",
                                              help="Neither read nor write the subspace cache.")], False),
}  # fmt: skip
JOBS: Group = {
    "jobs": (Annotated[int | None, typer.Option(
        metavar="INT", rich_help_panel="Runtime",
        help="Modules processed at once; audit of several adapters: adapters at once (default: the usable cores, "
             "at most 8). The output is the same for any value.")], None),
}  # fmt: skip
WIDE: Group = {
    "wide": (Annotated[bool, typer.Option("--wide", rich_help_panel="Output",
                                          help="Every column of the table (the JSON and the HTML always have "
                                               "them).")], False),
}  # fmt: skip
DEBUG: Group = {"debug": (Annotated[bool, typer.Option("--debug", rich_help_panel="Runtime",
                                                       help="Show tracebacks.")], False)}  # fmt: skip
RUN: Group = {
    "quiet": (Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel="Runtime",
                                           help="No progress bars and no table.")], False),
    **DEBUG,
}  # fmt: skip
JSON: Group = {
    "json_out": (Annotated[bool, typer.Option("--json", rich_help_panel="Output",
                                              help="Print the result as JSON on stdout, nothing else there.")], False),
}  # fmt: skip


class Options(dict):
    """The values of a command's shared options, with what they build."""

    def settings(self, **override) -> Settings:
        """``Settings`` from the subspace, form and method options (``override`` for a sweep point)."""
        values = {**self, **override}
        method = values.get("method", DEFAULT_METHOD)
        if values.get("threshold") is not None and values.get("top_n") is not None:
            raise CsuloraError("--threshold and --top-n are two ways to choose modules for safe-lora; pass one")
        if method != "safe-lora" and (values.get("threshold") is not None or values.get("top_n") is not None):
            raise CsuloraError("--threshold and --top-n apply to --method safe-lora only")
        if method != "realign" and values.get("beta") is not None:
            raise CsuloraError("--beta applies to --method realign only")
        if method != "resta" and values.get("gamma") is not None:
            raise CsuloraError("--gamma applies to --method resta only")
        names = ("lam", "beta", "gamma", "subspace_rank", "subspace_energy", "max_subspace_rank", "exact_svd", "seed",
                 "device", "form", "top_n")
        fields = {f: values[f] for f in names if f in values}
        settings = Settings(method=method, threshold=values.get("threshold"), **fields)
        if values.get("subspace"):
            settings = self.source().serve(settings)  # the pack's rule, or a refusal saying what it serves
        from .methods import validate

        validate(settings.resolved())  # bad values fail here, before anything is read
        return settings

    def jobs(self) -> int | None:
        jobs = self.get("jobs")
        if jobs is not None and jobs < 1:
            raise CsuloraError(f"--jobs must be ≥ 1, got {jobs}")
        return jobs

    def generation(self, device: str, match: str = "contains", limit: int | None = None) -> EvalOptions:
        """The ``EvalOptions`` of the generation options (``limit``: the default when --limit is not given)."""
        from .evaluate import EvalOptions

        return EvalOptions(device=device, dtype=self["dtype"], batch_size=self["batch_size"],
                           max_new_tokens=self["max_new_tokens"], harmful_tokens=self["harmful_tokens"],
                           limit=self["limit"] if self["limit"] is not None else limit, match=match)  # fmt: skip

    def source(self, enabled: bool | None = None) -> SubspaceSource | PackSource:
        if self.get("subspace"):  # opened once per command: every adapter and point shares it
            if not hasattr(self, "_pack"):
                from .pack import PackSource

                self._pack = PackSource.open(self["subspace"], self.get("accept_pack_mismatch", False))
            return self._pack
        from .cache import SubspaceSource

        return SubspaceSource.open(self.get("cache_dir"), enabled=not self.get("no_cache") if enabled is None else
                                   enabled)  # fmt: skip


def _panel_order(p: inspect.Parameter) -> int:
    info = next((a for a in get_args(p.annotation)[1:] if hasattr(a, "rich_help_panel")), None)
    panel = getattr(info, "rich_help_panel", None)
    return PANELS.index(panel) if panel in PANELS else len(PANELS)


def with_options(*groups: Group) -> Callable:
    """Give a command the options of ``groups``; it receives those it names as parameters of its own
    (``adapter=None``) as those arguments, the others as ``opts: Options``. Options a command still declares itself
    (``Annotated[..., typer.Option(...)]``, not in a group) follow the groups'."""
    declared = {name: spec for group in groups for name, spec in group.items()}

    def decorate(fn: Callable) -> Callable:
        own = {name: p for name, p in inspect.signature(fn, eval_str=True).parameters.items() if name != "opts"}
        direct = [name for name in own if name in declared]

        @functools.wraps(fn)
        def command(**kwargs):
            opts = Options({name: kwargs.pop(name) for name in declared if name not in direct})
            return fn(**kwargs, opts=opts)

        params = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
                  for name, (annotation, default) in declared.items()]  # fmt: skip
        params += [p for name, p in own.items() if name not in declared]
        params.sort(key=_panel_order)  # stable: the panels in PANELS' order, each option in its declared place
        # keyword-only: the declared order stays, required options (default ...) may follow optional ones
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=inspect.Parameter.empty if p.default is ...
                            else p.default) for p in params]  # fmt: skip
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
