"""Safe LoRA for the benchmark scripts: the package's ``--method safe-lora`` when this checkout has it,
else a LOCAL REFERENCE IMPLEMENTATION of DESIGN.md §5 (Hsu et al., NeurIPS 2024).

Reference: per module ``C = D Dᵀ / ‖D‖_F`` with ``D = W_aligned − W_base``; the score is
``cos(vec(C B A), vec(B A))`` (``csulora.correction.safe_lora_score``); modules with score ``≤ τ``, or the
``n`` lowest-scoring ones, get ``B ← C B = D (Dᵀ B) / ‖D‖_F``. Tensor names, shapes, dtypes and the config
are unchanged. Used by ``scripts/bench_safety.py`` only.
"""

from __future__ import annotations

from pathlib import Path

import torch

from csulora import api
from csulora.adapters import read_adapter, write_adapter
from csulora.checkpoints import Checkpoint, parse_ref
from csulora.correction import safe_lora_score
from csulora.errors import CsuloraError
from csulora.outputs import write_folder
from csulora.subspace import displacement


def package_safe_lora(threshold: float | None, top_n: int | None):
    """``Settings`` for the package's own Safe LoRA, or None when this checkout does not have it."""
    kwargs = {"top_n": top_n} if top_n is not None else {"threshold": threshold}
    try:
        settings = api.Settings(method="safe-lora", **kwargs)
        settings.validate()
    except (TypeError, CsuloraError):
        return None
    return settings


def safe_lora_project_reference(B: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """Safe LoRA projection (§5): ``C·B = D (Dᵀ B) / ‖D‖_F`` (``C`` is not a projector)."""
    return D @ (D.T @ B) / torch.linalg.vector_norm(D)


def _project(B: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    from csulora import correction

    fn = getattr(correction, "safe_lora_project", None)  # the package's, when present
    return fn(B, D) if fn is not None else safe_lora_project_reference(B, D)


def safe_lora(adapter: Path, aligned: Path, base: Path, out: Path, threshold: float = 0.5,
              top_n: int | None = None) -> dict[str, dict]:  # fmt: skip
    """Write the Safe LoRA version of ``adapter`` to ``out``; return per module ``score`` and ``projected``.
    Uses ``csulora.sanitize`` with ``method='safe-lora'`` when the package has it."""
    settings = package_safe_lora(threshold, top_n)
    if settings is not None:
        result = api.sanitize(adapter, str(aligned), str(base), out, settings=settings, force=True)
        return {m.module: {"score": m.safe_lora_score, "projected": None} for m in result.report.modules}
    ad = read_adapter(adapter)
    needed = [m.weight_key for m in ad.modules]
    a_ckpt, b_ckpt = Checkpoint.open(parse_ref(str(aligned)), needed), Checkpoint.open(parse_ref(str(base)), needed)
    scores, displacements = {}, {}
    for m in ad.modules:
        D = displacement(a_ckpt.get(m.weight_key), b_ckpt.get(m.weight_key))
        D = D.T if ad.fan_in_fan_out else D
        scores[m.name], displacements[m.name] = safe_lora_score(m.A, m.B, D), D
    ranked = sorted(scores, key=lambda n: (scores[n], n))
    chosen = set(ranked[:top_n]) if top_n is not None else {n for n, s in scores.items() if s <= threshold}
    tensors = {}
    for m in ad.modules:
        B = m.B
        if m.name in chosen and torch.linalg.vector_norm(displacements[m.name]) > 0:
            B = _project(m.B.float(), displacements[m.name]).to(m.B.dtype).contiguous()
        tensors[m.key("A")], tensors[m.key("B")] = m.A, B
    meta = {"csulora_method": "safe-lora (scripts/safe_lora_reference.py)", "csulora_threshold": str(threshold),
            "csulora_top_n": str(top_n)}  # fmt: skip
    write_folder(out, lambda tmp: write_adapter(tmp, ad, tensors, meta))
    return {n: {"score": scores[n], "projected": n in chosen} for n in scores}


def implementation() -> str:
    """Which Safe LoRA the scripts run, for their output."""
    if package_safe_lora(0.5, None) is not None:
        return "csulora --method safe-lora (package)"
    return "local reference implementation of DESIGN.md §5 (scripts/safe_lora_reference.py)"
