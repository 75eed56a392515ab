"""csulora: make fine-tuned LoRA adapters, full fine-tunes and merged models safe to publish."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"

# The public API loads on first use (PEP 562), not on `import csulora`: torch takes seconds to import, and
# `csulora --version`, `--help` and shell completion need none of it.
_API = {"Result": "api", "Settings": "api", "audit": "api", "sanitize": "api", "audit_model": "models",
        "sanitize_model": "models"}  # fmt: skip

if TYPE_CHECKING:
    from .api import Result, Settings, audit, sanitize
    from .models import audit_model, sanitize_model


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Result", "Settings", "audit", "audit_model", "sanitize", "sanitize_model", "__version__"]
