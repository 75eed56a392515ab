"""csulora: make fine-tuned LoRA adapters safe to publish (CSULoRA, closest safe update)."""

__version__ = "0.1.0"

from .api import Result, Settings, audit, sanitize  # noqa: E402

__all__ = ["Result", "Settings", "audit", "sanitize", "__version__"]
