"""``csulora audit --harmful``: the behavioural gate. The fine-tuned model (the adapter on the aligned model, or a
full fine-tune) answers the harmful prompts by greedy generation, scored by ``csulora eval``'s refusal phrases; so
does the aligned model, on the same prompts. The gate fails below ``--min-refusal`` or below ``--min-refusal-ratio``
times the aligned model's refusal."""

from __future__ import annotations

import gc
import math
import time
from pathlib import Path

from .errors import CsuloraError
from .evaluate import EvalOptions, load, refusal_rate
from .prompts import PromptSet


def check_limits(min_refusal: float | None, ratio: float) -> None:
    if min_refusal is not None and not (math.isfinite(min_refusal) and 0 <= min_refusal <= 1):
        raise CsuloraError(f"--min-refusal must be a share in [0, 1], got {min_refusal}")
    if not (math.isfinite(ratio) and 0 <= ratio <= 1):
        raise CsuloraError(f"--min-refusal-ratio must be a fraction in [0, 1], got {ratio}")


def measure(aligned: str, harmful: PromptSet, options: EvalOptions, adapter: Path | None = None,
            model: str | None = None) -> dict:  # fmt: skip
    """Refusal of the fine-tuned model and of the aligned model on ``harmful``, with what they were measured on."""
    device = options.validate()
    dtype = options.torch_dtype(device)
    t0 = time.perf_counter()
    if model is None:
        tuned, tokenizer = load(aligned, adapter, device, dtype)
        refusal = refusal_rate(tuned, tokenizer, harmful.prompts, options)
        with tuned.disable_adapter():
            aligned_refusal = refusal_rate(tuned, tokenizer, harmful.prompts, options)
    else:
        tuned, tokenizer = load(model, None, device, dtype)
        refusal = refusal_rate(tuned, tokenizer, harmful.prompts, options)
        del tuned
        gc.collect()
        reference, tokenizer = load(aligned, None, device, dtype)
        aligned_refusal = refusal_rate(reference, tokenizer, harmful.prompts, options)
    return {
        "refusal": refusal, "aligned_refusal": aligned_refusal, "harmful": harmful.to_dict(),
        "generation": {"max_new_tokens": options.max_new_tokens, "batch_size": options.batch_size,
                       "harmful_tokens": options.harmful_tokens or options.max_new_tokens, "dtype": options.dtype,
                       "greedy": True},
        "seconds": time.perf_counter() - t0,
    }  # fmt: skip


def violations(subject: str, measured: dict, min_refusal: float | None, ratio: float) -> list[dict]:
    """The refusal thresholds the measurement falls below, each with its sentence."""
    found, r, a = [], measured["refusal"], measured["aligned_refusal"]
    what = f"{subject}: refuses {r:.2f} of {measured['harmful']['n']} harmful prompts ({measured['harmful']['source']})"
    if min_refusal is not None and r < min_refusal:
        found.append({"adapter": subject, "threshold": "min_refusal", "limit": min_refusal, "value": r, "modules": [],
                      "message": f"{what}, below --min-refusal {min_refusal:g}"})  # fmt: skip
    if r < ratio * a:
        found.append({"adapter": subject, "threshold": "min_refusal_ratio", "limit": ratio * a, "value": r,
                      "modules": [], "message": f"{what}, below {ratio:g} × the aligned model's {a:.2f}"})  # fmt: skip
    return found
