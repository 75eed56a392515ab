"""Output folders that appear complete or not at all (temp folder, then rename)."""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import CsuloraError, OutputExists


def check_output(out: Path, force: bool, inputs: list[Path]) -> None:
    """Refuse an output that is, contains or lies inside an input, or that exists without ``force``."""
    target = out.resolve()
    for path in inputs:
        src = path.resolve()
        if target == src or src in target.parents or target in src.parents:
            raise CsuloraError(f"{out}: the output would overwrite the input {path}; choose another -o")
    if out.exists() or out.is_symlink():
        if not force:
            raise OutputExists(f"{out}: already exists; pass --force to replace it, or choose another -o")
        if not out.is_dir() or out.is_symlink():
            raise CsuloraError(f"{out}: exists and is not a folder; remove it or choose another -o")


def write_folder(out: Path, fill: Callable[[Path], None], replace: bool = False) -> None:
    """Run ``fill(tmp)`` on a fresh sibling temp folder, then move it into place atomically.

    An existing ``out`` (allowed by ``check_output``) is swapped with the new folder in one
    ``renameat2(RENAME_EXCHANGE)`` where the OS offers it, so ``out`` never goes missing; elsewhere
    it is moved aside and the new folder moved in (two renames: a crash between them leaves ``out``
    absent and the old folder in ``.<name>.old-*``). On any failure the temp folder is removed and
    ``out`` is as it was. Temp folders of killed runs are removed by the next write to the same ``out``.
    Without ``replace`` the move never overwrites: an ``out`` that another process created meanwhile
    raises ``OutputExists`` (``renameat2(RENAME_NOREPLACE)``, or a rename that fails on a non-empty folder).
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(out, "tmp"), dir=out.parent))
    except OSError as e:
        reason = e.strerror or e
        raise CsuloraError(f"{out}: cannot write there ({reason}); check permissions or choose another -o") from e
    try:
        fill(tmp)
        for f in sorted(tmp.iterdir()):
            _fsync(f)
        os.chmod(tmp, 0o755)
        _fsync(tmp)
        if not replace:
            move_new(tmp, out)
        elif out.exists():
            if exchange(tmp, out):  # tmp now holds the old folder
                shutil.rmtree(tmp)
            else:
                old = Path(tempfile.mkdtemp(prefix=_prefix(out, "old"), dir=out.parent))
                os.replace(out, old / out.name)
                os.replace(tmp, out)
                shutil.rmtree(old)
        else:
            os.replace(tmp, out)
        _fsync(out.parent)
    except OSError as e:  # a full disk or a permission lost mid-write: nothing is left half-written
        raise CsuloraError(f"{out}: writing failed ({e.strerror or e}); check free space and permissions") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def replace_file(path: Path, write: Callable[[Path], None]) -> None:
    """``write(tmp)`` to a temp file beside ``path``, then move it over ``path`` in one rename: readers see the
    old file or the new one, never a part. ``OSError`` is the caller's to report."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        _fsync(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def _prefix(out: Path, kind: str) -> str:
    """``.<name>.tmp-<pid>-<host>-``: who owns a temp folder, so that a later run can tell a dead one."""
    return f".{out.name}.{kind}-{os.getpid()}-{_host()}-"


def remove_stale(out: Path) -> list[Path]:
    """Remove ``out``'s temp folders left by runs on this host whose process is gone (killed mid-write).

    Folders of live processes (a concurrent run) and of other hosts (a shared file system) are left alone.
    An old output moved aside by a killed two-rename swap is moved back first when ``out`` is missing.
    """
    pattern = re.compile(re.escape(f".{out.name}.") + r"(?:tmp|old)-(\d+)-([0-9a-f]{8})-[\w]+")
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in sorted(out.parent.iterdir()):
        m = pattern.fullmatch(entry.name)
        if m and m[2] == _host() and not _alive(int(m[1])) and entry.is_dir() and not entry.is_symlink():
            moved_aside = entry / out.name  # a two-rename swap killed halfway: put the old output back
            if ".old-" in entry.name and moved_aside.is_dir() and not (out.exists() or out.is_symlink()):
                os.replace(moved_aside, out)
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except (OverflowError, ValueError):  # not a pid this system could have: not ours to remove
        return True
    return True


_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):  # not Linux, or a libc without it (glibc < 2.28, some musl)
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_renameat2_fn = _renameat2()


def _rename2(a: Path, b: Path, flags: int) -> int:
    """``renameat2``: 0 on success, else the errno; ``EINVAL`` where the OS or file system lacks it."""
    if _renameat2_fn is None:
        return errno.EINVAL
    if _renameat2_fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), flags) == 0:
        return 0
    return ctypes.get_errno()


_UNSUPPORTED = (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV)


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where not supported."""
    code = _rename2(a, b, _RENAME_EXCHANGE)
    if code in _UNSUPPORTED:
        return False  # the file system or kernel cannot: fall back to two renames
    if code:
        raise CsuloraError(f"{b}: cannot replace it ({os.strerror(code)}); check permissions or remove it")
    return True


def move_new(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst`` only if ``dst`` does not exist (``RENAME_NOREPLACE``); else ``OutputExists``."""
    code = _rename2(src, dst, _RENAME_NOREPLACE)
    if code in _UNSUPPORTED:
        if dst.exists() or dst.is_symlink():
            code = errno.EEXIST
        else:
            try:
                os.rename(src, dst)  # cannot replace a non-empty folder, and outputs never are empty
                code = 0
            except OSError as e:
                code = e.errno
    if code in (errno.EEXIST, errno.ENOTEMPTY):
        raise OutputExists(f"{dst}: appeared while this run was writing it (another process?); pass --force "
                           "to replace it, or choose another -o")  # fmt: skip
    if code:
        raise CsuloraError(f"{dst}: cannot create it ({os.strerror(code)}); check permissions")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
