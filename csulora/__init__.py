"""csulora: make fine-tuned LoRA adapters, full fine-tunes and merged models safe to publish."""

__version__ = "0.2.0"

from .api import Result, Settings, audit, sanitize  # noqa: E402
from .models import audit_model, sanitize_model  # noqa: E402

__all__ = ["Result", "Settings", "audit", "audit_model", "sanitize", "sanitize_model", "__version__"]
