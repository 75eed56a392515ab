"""``Settings``: everything that changes the numbers, with each method's measured defaults."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING

from .errors import CsuloraError

if TYPE_CHECKING:  # torch and the cache load when used: `csulora --help` and `--version` stay fast
    import torch

    from .cache import SubspaceParams

FORMS = ("factored", "block")
# The default method and every method's default settings come from the safety benchmark across the shipped
# worlds (scripts/bench_safety.py, docs/defaults.md). No setting met the rule on every world; these are
# the drop-in settings whose worst world is best (realign, safe-lora), and the paper's method at the safety end
# of its smooth range. realign's λ and β, when neither is given, are chosen per adapter by its size against the
# alignment (methods/realign.py, by_size): these values where it is large, λ = ∞, β = 0.5 where it is small. The
# methods themselves live in methods/.
DEFAULT_METHOD = "realign"
METHOD_DEFAULTS: dict[str, dict] = {
    "realign": {"lam": 4.0, "beta": 0.25, "subspace_rank": 8},
    "csulora": {"lam": 64.0, "subspace_energy": 0.25},
    "safe-lora": {"threshold": 0.9, "subspace_energy": 0.25},  # the subspace only feeds the report's columns
    "resta": {"gamma": 0.5, "subspace_rank": 8},
}
# What the model card says of each method: where it stands on the evidence (docs/defaults.md).
METHOD_NOTES = {
    "realign": "Re-alignment goes beyond the paper: it pulls the part of the update inside each layer's safety "
    "subspace (where the harmful fine-tunes of csulora's miniature worlds turn the aligned directions back) toward "
    "the aligned displacement and keeps the rest. It is the default because it was the only method that restored "
    "refusal while keeping part of the new skill on every miniature world, but no setting did that well on every "
    "world: measure the behaviour of the sanitized result before publishing it (`csulora sanitize --calibrate`, "
    "`csulora sweep`, docs/defaults.md).",
    "csulora": "The paper's method (CSULoRA) keeps the fully aligned part F = PΔWQ of the update exactly; on "
    "csulora's miniature worlds that part carries the attack, so it restored refusal only where it also deleted "
    "the new skill (docs/defaults.md).",
    "safe-lora": "Safe LoRA is the baseline the paper compares against; on csulora's miniature worlds it restored "
    "the most refusal and deleted the new skill (docs/defaults.md).",
}
# a method without its own defaults
FALLBACK = {"lam": 1.0, "beta": 0.0, "threshold": 0.5, "gamma": 0.0, "subspace_energy": 0.5}


@dataclass(frozen=True)
class Settings:
    """A ``None`` takes the method's default (``METHOD_DEFAULTS``); ``resolved()`` fills them in.

    The subspace rule is ``subspace_rank`` when given, else ``subspace_energy`` when given, else the
    method's default rule."""

    method: str = DEFAULT_METHOD
    lam: float | None = None
    beta: float | None = None  # realign: pull the in-subspace block toward β·D_k
    form: str = "factored"
    subspace_rank: int | None = None
    subspace_energy: float | None = None
    max_subspace_rank: int = 256
    exact_svd: bool = False
    seed: int = 0
    device: str = "cpu"
    threshold: float | None = None  # Safe LoRA: project modules with score ≤ τ …
    top_n: int | None = None  # … or the n lowest-scoring
    gamma: float | None = None  # resta: add γ·D (dense) or γ·D_k (adapters)

    def resolved(self) -> Settings:
        """The same settings with every ``None`` replaced by the method's default."""
        defaults = {**FALLBACK, **METHOD_DEFAULTS.get(self.method, {})}
        lam = defaults["lam"] if self.lam is None else self.lam
        beta = defaults["beta"] if self.beta is None else self.beta
        threshold = defaults["threshold"] if self.threshold is None else self.threshold
        gamma = defaults["gamma"] if self.gamma is None else self.gamma
        rank, energy = self.subspace_rank, self.subspace_energy
        if rank is None and energy is None:
            rank = defaults.get("subspace_rank")
            energy = None if rank is not None else defaults["subspace_energy"]
        return replace(self, lam=float(lam), beta=float(beta), threshold=float(threshold), gamma=float(gamma),
                       subspace_rank=rank, subspace_energy=energy)  # fmt: skip

    def validate(self) -> None:
        """Checks that need no method; ``methods.validate`` adds the method's own (its λ range, its forms)."""
        if self.lam is not None and not self.lam >= 0:
            raise CsuloraError(f"--lambda must be a number ≥ 0, got {self.lam}")
        if self.beta is not None and not (math.isfinite(self.beta) and self.beta >= 0):
            raise CsuloraError(f"--beta must be a finite number ≥ 0, got {self.beta}")
        if self.gamma is not None and not (math.isfinite(self.gamma) and self.gamma >= 0):
            raise CsuloraError(f"--gamma must be a finite number ≥ 0, got {self.gamma}")
        if self.subspace_rank is not None and self.subspace_rank < 1:
            raise CsuloraError(f"--subspace-rank must be ≥ 1, got {self.subspace_rank}")
        if self.subspace_energy is not None and not 0 < self.subspace_energy <= 1:
            raise CsuloraError(f"--subspace-energy must be in (0, 1], got {self.subspace_energy}")
        if self.max_subspace_rank < 1:
            raise CsuloraError(f"--max-subspace-rank must be ≥ 1, got {self.max_subspace_rank}")
        if self.form not in FORMS:
            raise CsuloraError(f"--form {self.form!r} is not available; use one of {', '.join(FORMS)}")
        if not 0 <= self.seed < 2**63:
            raise CsuloraError(f"--seed must be in [0, 2^63), got {self.seed}")
        if self.threshold is not None and not math.isfinite(self.threshold):
            raise CsuloraError(f"--threshold must be a finite number, got {self.threshold}")
        if self.top_n is not None and self.top_n < 1:
            raise CsuloraError(f"--top-n must be ≥ 1, got {self.top_n}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise CsuloraError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        import torch

        if self.device == "cuda" and not torch.cuda.is_available():
            raise CsuloraError("--device cuda: no CUDA device is available; use --device cpu")

    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def subspace_params(self) -> SubspaceParams:
        """The subspace rule of resolved settings, as the cache keys it."""
        from .cache import SubspaceParams

        return SubspaceParams(
            rank=self.subspace_rank, energy=self.subspace_energy if self.subspace_rank is None else 0.0,
            max_rank=self.max_subspace_rank, exact=self.exact_svd, seed=self.seed,
        )  # fmt: skip

    def to_dict(self) -> dict:
        """The settings as the report and the adapter's header record them (JSON: ``λ = ∞`` is ``"inf"``)."""
        d = asdict(self)
        d.pop("device")  # where it ran does not change the numbers (tests/test_cache.py checks cpu = cuda)
        d["lambda"] = d.pop("lam")
        if d["lambda"] is not None and math.isinf(d["lambda"]):
            d["lambda"] = "inf"
        return dict(sorted(d.items()))
