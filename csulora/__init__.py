"""csulora: make fine-tuned LoRA adapters, full fine-tunes and merged models safe to publish."""

__version__ = "0.2.0"

# The public API loads on first use (PEP 562), not on `import csulora`: torch takes seconds to import, and
# `csulora --version`, `--help` and shell completion need none of it. Nothing is imported here, so that a Ctrl-C
# right after `csulora` starts lands in the command's own handler (csulora/__main__.py).
_API = {"Result": "api", "Settings": "api", "audit": "api", "sanitize": "api", "audit_model": "models",
        "sanitize_model": "models"}  # fmt: skip


def __getattr__(name: str):
    if name in _API:
        from importlib import import_module

        return getattr(import_module(f".{_API[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Result", "Settings", "audit", "audit_model", "sanitize", "sanitize_model", "__version__"]
