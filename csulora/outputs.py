"""Output folders that appear complete or not at all (temp folder, then rename)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from .errors import CsuloraError


def check_output(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an output that is, contains or lies inside an input, or that exists without ``force``."""
    target = out.resolve()
    for path in inputs:
        src = path.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise CsuloraError(f"{out}: the output would overwrite the input {path}; choose another -o")
    if out.exists() or out.is_symlink():
        if not force:
            raise CsuloraError(f"{out}: already exists; pass --force to replace it, or choose another -o")
        if not out.is_dir() or out.is_symlink():
            raise CsuloraError(f"{out}: exists and is not a folder; remove it or choose another -o")


def write_folder(out: Path, fill: Callable[[Path], None]) -> None:
    """Run ``fill(tmp)`` on a fresh sibling temp folder, then move it into place atomically.

    An existing ``out`` (allowed by ``check_output``) is swapped out only once the new folder is
    complete; on any failure the temp folder is removed and ``out`` is as it was.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        fill(tmp)
        for f in tmp.iterdir():
            _fsync(f)
        os.chmod(tmp, 0o755)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        _fsync(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
