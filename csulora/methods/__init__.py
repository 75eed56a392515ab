"""The correction methods, one module each, behind the small interface of ``base.Method``."""

from __future__ import annotations

from . import csulora, realign, safe_lora
from .base import Corrected, Method, block_config

METHODS: dict[str, Method] = {m.name: m for m in (csulora.METHOD, realign.METHOD, safe_lora.METHOD)}

__all__ = ["METHODS", "Corrected", "Method", "block_config"]
