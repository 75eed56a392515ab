"""Prompt sets read from a file or fetched from the Hub: what ``eval``, ``sanitize --calibrate`` and ``audit --harmful``
send to the model.

A file holds one prompt per line, or a CSV with a ``goal`` (AdvBench) or ``prompt`` column, or JSON lines /
a JSON list of strings or of objects with one of those fields, or Parquet (with ``pyarrow``). A Hub dataset is
named ``org/name[@revision][:file]``: one data file of the dataset repository is fetched through
``huggingface_hub`` (the cache first; ``HF_HUB_OFFLINE=1`` means the cache only), the one whose path contains
``file`` when the repository holds several (``JailbreakBench/JBB-Behaviors:harmful``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CsuloraError

FIELDS = ("goal", "prompt", "behavior", "instruction", "question", "text")  # the prompt's column, first found
DATA_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet", ".txt")
HUB_REF = re.compile(r"^(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[\w./-]+?))?(?::(?P<file>.+))?$")


@dataclass(frozen=True)
class PromptSet:
    """The prompts used (the first ``limit`` of the file), where they came from and the file's sha256."""

    option: str
    prompts: list[str]
    source: str  # a path, or hf://datasets/<repo>@<commit>/<file>
    sha256: str  # of the file's bytes
    available: int  # prompts in the file

    def to_dict(self) -> dict:
        return {"source": self.source, "sha256": self.sha256, "n": len(self.prompts), "available": self.available}


def load_prompts(ref: str | Path, option: str, limit: int | None = None, hub: bool = True) -> PromptSet:
    """The prompt set named by ``ref``: a file, or (``hub``) a Hub dataset reference. Empty sets are an error."""
    path = Path(ref)
    match = HUB_REF.match(str(ref))
    if path.exists() or not hub or match is None or str(ref).startswith((".", "/")):
        data, source, name = _read_bytes(path, option), str(path), path.name
    else:
        path, source = _fetch(match["repo"], match["revision"], match["file"], option)
        data, name = _read_bytes(path, option), path.name
    prompts = parse(data, name, f"{option} {source}")
    if limit is not None and limit < 1:
        raise CsuloraError(f"{option}: the number of prompts must be ≥ 1, got {limit}")
    return PromptSet(option, prompts[:limit], source, hashlib.sha256(data).hexdigest(), len(prompts))


def _read_bytes(path: Path, option: str) -> bytes:
    if not path.is_file():
        raise CsuloraError(f"{option} {path}: no such file")
    try:
        return path.read_bytes()
    except OSError as e:
        raise CsuloraError(f"{option} {path}: cannot read it ({e.strerror or e})") from e


def parse(data: bytes, name: str, where: str) -> list[str]:
    """The prompts of a file's bytes, by its suffix (see the module's docstring); blank ones skipped."""
    suffix = Path(name).suffix.lower()
    if suffix == ".parquet":
        return _nonempty(_parquet(data, where), where)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CsuloraError(f"{where}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text))
        column = _field(reader.fieldnames or [])
        if column is None:
            raise CsuloraError(f"{where}: a CSV needs a 'goal' column (as AdvBench's harmful_behaviors.csv) or a "
                               "'prompt' column; or give one prompt per line in a text file")  # fmt: skip
        return _nonempty([(row[column] or "").strip() for row in reader], where)
    if suffix == ".jsonl":
        items = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CsuloraError(f"{where}, line {n}: not JSON ({e.msg}); write one object per line") from None
        return _nonempty([_item(x, f"{where}, line {n}") for n, x in enumerate(items, 1)], where)
    if suffix == ".json":
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise CsuloraError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(items, list):
            raise CsuloraError(f"{where}: expected a JSON list of prompts")
        return _nonempty([_item(x, f"{where}, item {n}") for n, x in enumerate(items, 1)], where)
    return _nonempty([line.strip() for line in text.splitlines()], where)


def _field(names) -> str | None:
    lower = {n.lower().strip(): n for n in names if n}
    return next((lower[f] for f in FIELDS if f in lower), None)


def _item(x, where: str) -> str:
    if isinstance(x, str):
        return x.strip()
    column = _field(x) if isinstance(x, dict) else None
    if column is None or not isinstance(x[column], str):
        raise CsuloraError(f'{where}: expected a prompt, as text or {{"prompt": "…"}} (or goal, behavior, …)')
    return x[column].strip()


def _nonempty(prompts: list[str], where: str) -> list[str]:
    prompts = [p for p in prompts if p]
    if not prompts:
        raise CsuloraError(f"{where}: no prompts in it; write one prompt per line, or AdvBench's CSV")
    return prompts


def _parquet(data: bytes, where: str) -> list[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CsuloraError(f"{where}: reading Parquet needs pyarrow (pip install pyarrow); or pass the prompts as "
                           "a text or CSV file") from None  # fmt: skip
    table = pq.read_table(io.BytesIO(data))
    column = _field(table.column_names)
    if column is None:
        raise CsuloraError(f"{where}: no prompt column (one of {', '.join(FIELDS)}) in {table.column_names}")
    return [str(v or "").strip() for v in table.column(column).to_pylist()]


# ---------------------------------------------------------------- the Hub


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false")


def _fetch(repo: str, revision: str | None, wanted: str | None, option: str) -> tuple[Path, str]:
    """One data file of the dataset ``repo``: listed on the Hub (or, offline, in the cache), chosen, downloaded
    (or found in the cache). Returns its local path and its ``hf://`` name with the commit."""
    try:
        import huggingface_hub
        from huggingface_hub import errors
    except ImportError:
        raise CsuloraError(f"{option} {repo}: fetching from the Hub needs huggingface_hub") from None
    ref = f"{repo}@{revision}" if revision else repo
    files = _cached_files(repo, revision) if _offline() else None
    if files is None and not _offline():
        try:
            files = huggingface_hub.HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
        except errors.RepositoryNotFoundError:
            raise CsuloraError(f"{option} {ref}: no such file, and no such dataset on the Hub") from None
        except Exception:  # no network: what the cache holds
            files = _cached_files(repo, revision)
    if files is None:
        raise CsuloraError(f"{option} {ref}: no such file, and the dataset is not in the Hub cache (offline); fetch "
                           "it once online, or pass a file")  # fmt: skip
    data = sorted(f for f in files if f.lower().endswith(DATA_SUFFIXES) and not f.startswith("."))
    data = [f for f in data if Path(f).name.lower() not in ("readme.txt", "license.txt")]
    chosen = [f for f in data if wanted is None or f == wanted] or [f for f in data if wanted and wanted in f]
    if len(chosen) != 1:
        listed = ", ".join(data[:8]) or "none"
        what = f"no data file matches {wanted!r}" if not chosen else "it holds several data files"
        raise CsuloraError(f"{option} {ref}: {what} ({listed}); name one as {repo}:FILE")
    try:
        local = huggingface_hub.hf_hub_download(repo, chosen[0], repo_type="dataset", revision=revision)
    except Exception as e:
        raise CsuloraError(f"{option} {ref}: cannot fetch {chosen[0]} ({type(e).__name__}); check the network, or "
                           "pass a file") from None  # fmt: skip
    commit = Path(local).parent
    while commit.parent.name != "snapshots" and commit != commit.parent:
        commit = commit.parent
    return Path(local), f"hf://datasets/{repo}@{commit.name}/{chosen[0]}"


def _cached_files(repo: str, revision: str | None) -> list[str] | None:
    """The files of the cached snapshot of ``repo`` at ``revision`` (default main), or ``None``."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE) / f"datasets--{repo.replace('/', '--')}"
    name = revision or "main"
    ref = folder / "refs" / name
    commit = ref.read_text().strip() if ref.is_file() else name
    snapshot = folder / "snapshots" / commit
    if not snapshot.is_dir():
        return None
    return sorted(str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file())
