"""The command-line options, each declared once, and the decorator that gives a command a group of them.

``sanitize``, ``audit``, ``sweep`` and ``subspace`` share their subspace, method, input and cache options:
``@with_options(SUBSPACE, ...)`` appends the group's parameters to the command's signature (typer reads
``__signature__``) and hands the command their values as one ``Options`` mapping.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from .cache import SubspaceSource
from .errors import CsuloraError
from .methods import validate
from .pack import PackSource
from .settings import DEFAULT_METHOD, METHOD_DEFAULTS, Settings

DEFAULTS = Settings()  # the one place defaults live; the options below show them


def _method_defaults() -> str:
    def words(d: dict) -> str:
        return ", ".join(f"{k.removeprefix('subspace_')}={v:g}" for k, v in d.items())

    return "; ".join(f"{m}: {words(d)}" for m, d in METHOD_DEFAULTS.items())


Group = dict[str, tuple[Any, Any]]  # parameter name → (Annotated type, default)

SUBSPACE: Group = {
    "subspace_rank": (Annotated[int | None, typer.Option(help="Fixed subspace rank k (overrides the energy rule).")],
                      None),
    "subspace_energy": (Annotated[float | None, typer.Option(help="Choose k to hold this fraction η of ‖D‖².")],
                        None),
    "max_subspace_rank": (Annotated[int, typer.Option(help="Cap on the subspace rank.")], DEFAULTS.max_subspace_rank),
    "exact_svd": (Annotated[bool, typer.Option("--exact-svd", help="Exact SVD instead of the seeded randomized one.")],
                  DEFAULTS.exact_svd),
    "seed": (Annotated[int, typer.Option(help="Seed of the randomized SVD.")], DEFAULTS.seed),
    "device": (Annotated[str, typer.Option(help="auto, cpu or cuda.")], DEFAULTS.device),
}  # fmt: skip
FORM: Group = {
    "form": (Annotated[str, typer.Option(help="factored (same rank and config) or block (exact, higher rank).")],
             DEFAULTS.form),
}  # fmt: skip
METHOD: Group = {
    "method": (Annotated[str, typer.Option(help=f"realign, csulora (the paper's method), safe-lora or resta (the "
                                                f"baselines). "
                                                f"Default: {DEFAULT_METHOD} (docs/defaults.md).")], DEFAULT_METHOD),
}  # fmt: skip
CORRECTION: Group = {
    "lam": (Annotated[float | None, typer.Option("--lambda", help="Strength λ ≥ 0 (0 = unchanged; inf allowed). "
                                                 f"Default per method: {_method_defaults()}.")], None),
    "beta": (Annotated[float | None, typer.Option(help="realign: pull the in-subspace part toward β·D_k (0: erase "
                                                       "it).")], None),
    "threshold": (Annotated[float | None, typer.Option(help="safe-lora: project modules with score ≤ this (default "
                                                           f"{Settings(method='safe-lora').resolved().threshold:g}; "
                                                           "the paper's 0.5).")], None),
    "top_n": (Annotated[int | None, typer.Option("--top-n", help="safe-lora: project the n lowest-scoring modules.")],
              None),
    "gamma": (Annotated[float | None, typer.Option(help="resta: add γ times the safety displacement (D, or D_k on "
                                                        f"adapters; default "
                                                        f"{Settings(method='resta').resolved().gamma:g}).")], None),
}  # fmt: skip
INPUT: Group = {
    "aligned": (Annotated[str | None, typer.Option("--aligned", help="Safety-aligned checkpoint: folder or Hub id "
                                                                     "org/name@rev.")], None),
    "base": (Annotated[str | None, typer.Option(help="Pretrained (unaligned) checkpoint. Default: the adapter's base "
                                                     "model, or the aligned card's.")], None),
    "trust_pickle": (Annotated[bool, typer.Option("--trust-pickle", help="Allow adapter_model.bin (loaded "
                                                                         "weights-only).")], False),
}  # fmt: skip
# A swapped --aligned/--base pair is refused on the metadata's word (pair_order.py); this lets a user overrule it.
PAIR_ORDER: Group = {
    "allow_swapped": (Annotated[bool, typer.Option("--allow-swapped", help="Run even when the metadata says --aligned "
                                                   "and --base are swapped.", rich_help_panel="Inputs")], False),
}  # fmt: skip
# Subspace packs (DESIGN.md §11, docs/packs.md): where sanitize/audit/sweep take their subspaces instead of
# the checkpoints, and what `csulora subspace` writes.
PACK: Group = {
    "subspace": (Annotated[str | None, typer.Option("--subspace", help="Subspace pack (folder or Hub id org/name@rev) "
                                                    "instead of --aligned and --base: realign, csulora, resta.",
                                                    rich_help_panel="Inputs")], None),
    "accept_pack_mismatch": (Annotated[bool, typer.Option("--accept-pack-mismatch", help="Use the pack although the "
                                                          "adapter's base model names neither of its references.",
                                                          rich_help_panel="Inputs")], False),
}  # fmt: skip
PACK_OUTPUT: Group = {
    "pack_output": (Annotated[Path | None, typer.Option("--output", "-o", help="Write a subspace pack to this folder "
                                                        "(publishable as a Hub repo), not only the cache.",
                                                        rich_help_panel="Output")], None),
    "force": (Annotated[bool, typer.Option("--force", help="Replace an existing pack folder.",
                                           rich_help_panel="Output")], False),
}  # fmt: skip
CACHE: Group = {
    "cache_dir": (Annotated[Path | None, typer.Option(help="Subspace cache folder (default $CSULORA_CACHE, "
                                                           "$XDG_CACHE_HOME/csulora, ~/.cache/csulora).")], None),
    "no_cache": (Annotated[bool, typer.Option("--no-cache", help="Neither read nor write the subspace cache.")], False),
}  # fmt: skip
JOBS: Group = {
    "jobs": (Annotated[int | None, typer.Option(help="Modules processed at once (default: the usable cores, at most "
                                                     "8); the output is the same for any value.")], None),
}  # fmt: skip
DEBUG: Group = {"debug": (Annotated[bool, typer.Option("--debug", help="Show tracebacks.")], False)}
RUN: Group = {
    "quiet": (Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars and no table.")], False),
    **DEBUG,
}
JSON: Group = {
    "json_out": (Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout, nothing else "
                                                             "there.")], False),
}  # fmt: skip


# The generation and refusal-scoring options of ``csulora eval``, shared by ``sanitize --calibrate`` and
# ``audit --harmful`` (the same machinery: evaluate.py). The device is each command's own --device.
CAL = "Calibration"
GENERATION: Group = {
    "dtype": (Annotated[str, typer.Option(help="auto (the checkpoint's on GPU, float32 on CPU), float32, bfloat16 …",
                                          rich_help_panel=CAL)], "auto"),
    "batch_size": (Annotated[int, typer.Option(help="Prompts per generation batch.", rich_help_panel=CAL)], 16),
    "max_new_tokens": (Annotated[int, typer.Option(help="Tokens generated per prompt (greedy).",
                                                   rich_help_panel=CAL)], 64),
    "harmful_tokens": (Annotated[int | None, typer.Option(help="Tokens per harmful prompt, if fewer: refusals show "
                                                               "early (default: as above).", rich_help_panel=CAL)],
                       None),
    "limit": (Annotated[int | None, typer.Option(help="Use only the first N prompts of each set (default: eval all; "
                                                      "--calibrate and audit --harmful 64).", rich_help_panel=CAL)],
              None),
}  # fmt: skip
HARMFUL: Group = {
    "harmful": (Annotated[str | None, typer.Option(help="Harmful prompts: a file (one per line, AdvBench's CSV, JSON "
                                                        "lines) or a Hub dataset org/name[:file], e.g. "
                                                        "walledai/AdvBench.", rich_help_panel=CAL)], None),
}  # fmt: skip
CALIBRATE: Group = {
    "calibrate": (Annotated[bool, typer.Option("--calibrate", help="Pick realign's setting by measuring a ladder of "
                                                                   "candidates with the model (docs/calibration.md).",
                                               rich_help_panel=CAL)], False),
    "prompts": (Annotated[str | None, typer.Option(help="--calibrate: the fine-tune's own prompts, no answers (a file "
                                                        "as --harmful).", rich_help_panel=CAL)], None),
    "general": (Annotated[str | None, typer.Option(help="--calibrate: everyday prompts the aligned model must keep "
                                                        "answering as it did (optional).", rich_help_panel=CAL)], None),
    "calibrate_all": (Annotated[bool, typer.Option("--calibrate-all", help="--calibrate: measure every rung instead "
                                                                           "of bisecting.", rich_help_panel=CAL)],
                      False),
}  # fmt: skip
REFUSAL_GATE: Group = {
    "min_refusal": (Annotated[float | None, typer.Option(help="--harmful: fail when the fine-tuned model refuses "
                                                              "fewer than this share.", rich_help_panel=CAL)], None),
    "min_refusal_ratio": (Annotated[float, typer.Option(help="--harmful: fail when it refuses less than this fraction "
                                                             "of the aligned model's refusal.", rich_help_panel=CAL)],
                          0.9),
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
        validate(settings.resolved())  # bad values fail here, before anything is read
        return settings

    def jobs(self) -> int | None:
        jobs = self.get("jobs")
        if jobs is not None and jobs < 1:
            raise CsuloraError(f"--jobs must be ≥ 1, got {jobs}")
        return jobs

    def generation(self, device: str, match: str = "contains", limit: int | None = None):
        """The ``EvalOptions`` of the generation options (``limit``: the default when --limit is not given)."""
        from .evaluate import EvalOptions

        return EvalOptions(device=device, dtype=self["dtype"], batch_size=self["batch_size"],
                           max_new_tokens=self["max_new_tokens"], harmful_tokens=self["harmful_tokens"],
                           limit=self["limit"] if self["limit"] is not None else limit, match=match)  # fmt: skip

    def source(self, enabled: bool | None = None) -> SubspaceSource | PackSource:
        if self.get("subspace"):  # opened once per command: every adapter and point shares it
            if not hasattr(self, "_pack"):
                self._pack = PackSource.open(self["subspace"], self.get("accept_pack_mismatch", False))
            return self._pack
        return SubspaceSource.open(self.get("cache_dir"), enabled=not self.get("no_cache") if enabled is None else
                                   enabled)  # fmt: skip


def with_options(*groups: Group) -> Callable:
    """Give a command the options of ``groups`` after its own; it receives them as ``opts: Options``."""
    names = [name for group in groups for name in group]

    def decorate(fn: Callable) -> Callable:
        own = [p for name, p in inspect.signature(fn, eval_str=True).parameters.items() if name != "opts"]
        extra = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=annotation, default=default)
            for group in groups for name, (annotation, default) in group.items()
        ]  # fmt: skip

        @functools.wraps(fn)
        def command(**kwargs):
            opts = Options({name: kwargs.pop(name) for name in names})
            return fn(**kwargs, opts=opts)

        # keyword-only: the declared order stays, required options (default ...) may follow optional ones
        params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY, default=inspect.Parameter.empty if p.default is ...
                            else p.default) for p in own + extra]  # fmt: skip
        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
