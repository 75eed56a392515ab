"""The correction methods, one module each, behind the small interface of ``base.Method``."""

from __future__ import annotations

import math

from ..errors import CsuloraError
from ..settings import Settings
from . import csulora, realign, resta, safe_lora
from .base import Corrected, Method, block_config

METHODS: dict[str, Method] = {m.name: m for m in (csulora.METHOD, realign.METHOD, safe_lora.METHOD, resta.METHOD)}


def validate(settings: Settings) -> None:
    """``settings.validate()`` and what depends on the method: that it exists, its λ range, its forms."""
    method = METHODS.get(settings.method)
    if method is None:
        raise CsuloraError(f"--method {settings.method!r} is not available; use one of {', '.join(METHODS)}")
    settings.validate()
    if settings.lam is not None and math.isinf(settings.lam) and not method.infinite_lambda:
        raise CsuloraError(f"--lambda must be a finite number ≥ 0 for --method {settings.method}, got {settings.lam}")
    if settings.form not in method.forms:
        raise CsuloraError(f"--method {settings.method} keeps the rank; --form {settings.form} does not apply to it")


__all__ = ["METHODS", "Corrected", "Method", "block_config", "validate"]
