"""Safety subspace packs (DESIGN.md §11): the subspace cache made portable, a folder publishable as a Hub repo.

A pack holds, per module of a checkpoint pair, the entry of ``entries.py`` (``U_k``, ``Σ_k``, ``V_k``, ``‖D‖²``,
captured energy) in safetensors shards (one per transformer layer), the manifest ``csulora_subspace.json``
and a model card. The manifest names both references, a content fingerprint of every source tensor, the
subspace settings, and per module its sources, layout, orientation, shape, ``k``, energies and checksum; its
``content_digest`` covers all of it. Each entry's key is derived from the manifest (fingerprints, module,
orientation, settings), so an edited manifest, a changed tensor or a header that disagrees with the manifest
is caught when the entry is read. ``build_pack`` writes one; ``PackSource`` serves ``sanitize``/``audit``/``sweep``
from one (``--subspace``); ``verify_pack`` recomputes modules from the checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from . import __version__
from .cache import SubspaceParams, SubspaceSource, compute_subspace
from .determinism import fixed_threads
from .entries import BadEntry, Memo, entry_record, read_entry, write_entries
from .errors import CsuloraError, GateFailed
from .io.checkpoints import Checkpoint, CheckpointPair, CheckpointRef, _hub_errors, parse_ref
from .io.layouts import FUSED_EXPERTS, TRANSPOSED_EXPERTS, Source, Target, is_block_weight, resolve
from .io.outputs import check_output, write_folder
from .io.tensorfile import TensorInfo, TensorReader
from .pair_order import check_pair_order
from .parallel import default_workers, ordered
from .settings import Settings
from .subspace import Subspace

MANIFEST = "csulora_subspace.json"
PACK_FORMAT = 1
_EXPERT_KEY = re.compile(r"^(?P<parent>.+\.experts)\.(?P<e>\d+)\.(?P<leaf>\w+)\.weight$")
_FUSED_PARTS = {p for parts in FUSED_EXPERTS["gate_up_proj"] for p in parts}  # gate_proj, up_proj, w1, w3
_LAYER = re.compile(r"\.(\d+)\.")
_HEX64 = re.compile(r"[0-9a-f]{64}")

Progress = Callable[[str, int, int, str], None]


# ---------------------------------------------------------------------------------------------- writing a pack


def pack_targets(aligned: Checkpoint, modules: list[str] | None, fan_in_fan_out: bool) -> list[Target]:
    """The modules a pack (or ``csulora subspace``'s cache) holds: each 2-D weight of the transformer blocks (or those
    ``modules`` names), experts stored per expert as the model fuses them (``gate_up_proj[e]`` from ``w1``/``w3``),
    each expert of a 3-D stack (transformers' fused ``experts.gate_up_proj``, a parameter without ``.weight``).
    Embeddings are transposed as PEFT reads them; ``fan_in_fan_out``: Conv1D weights."""
    named = [k for k in sorted(aligned.weight_map) if not k.endswith(".bias") and
             (is_block_weight(k) if modules is None else _named(k, modules))]  # fmt: skip
    aligned.require(named)  # their shards: the ones the block's weights are in
    chosen = [k for k in named if k.endswith(".weight") or len(aligned.info(k).shape) == 3]
    if not chosen:
        raise CsuloraError(f"{aligned.ref}: no module matches --modules {modules}; name modules such as q_proj")
    model_type = aligned.config().get("model_type")
    targets: list[Target] = []
    for key in chosen:
        shape = aligned.info(key).shape
        match = _EXPERT_KEY.match(key)
        if match and match["leaf"] in _FUSED_PARTS and len(shape) == 2:
            fused = Target(f"{match['parent']}.gate_up_proj", int(match["e"]))
            source = resolve(fused, aligned.weight_map)
            if source is not None and len(source.keys) == 2:
                if fused not in targets and all(k in chosen for k in source.keys):
                    targets.append(fused)
                continue
        if len(shape) == 2:
            embedding = any(w in key.rsplit(".", 2)[-2] for w in ("embed", "wte", "wpe"))
            targets.append(Target(key, transposed=fan_in_fan_out or embedding))
        elif len(shape) == 3:
            targets += [Target(key, e, model_type in TRANSPOSED_EXPERTS) for e in range(shape[0])]
    return targets


def _named(key: str, modules: list[str]) -> bool:
    name = key.removesuffix(".weight")
    match = _EXPERT_KEY.match(key)
    fused = match is not None and match["leaf"] in _FUSED_PARTS
    return any(name == m or name.endswith("." + m) or (fused and m in ("gate_up_proj", "experts")) for m in modules)


def _shard_group(target: Target) -> int:
    """The transformer layer a module belongs to (one shard each); modules outside the layers go last."""
    found = _LAYER.search(target.param)
    return int(found[1]) if found else 1 << 30


def content_fingerprint(ckpt: Checkpoint, key: str) -> str:
    """What identifies one source tensor's content: on the Hub, the LFS sha256 of its file (the name of the blob
    behind the snapshot's symlink); locally, the sha256 of the tensor's bytes as stored."""
    shard = ckpt.weight_map[key]
    if ckpt.ref.path is None:
        blob = (ckpt.folder / shard).resolve().name
        return f"lfs-sha256:{blob}" if _HEX64.fullmatch(blob) else f"git-blob:{blob}"
    t = ckpt.get(key)
    return "sha256:" + hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def entry_key(module: dict, sources: dict, settings: dict) -> str:
    """An entry's key: sha256 over the pack format, the module, its orientation and slice, both sides' source
    fingerprints and the subspace settings, as the manifest records them."""
    payload = {
        "format": PACK_FORMAT, "module": module["id"], "transposed": module["transposed"], "index": module["index"],
        "aligned": [sources[k]["aligned"] for k in module["sources"]],
        "base": [sources[k]["base"] for k in module["sources"]], "settings": settings,
    }  # fmt: skip
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _digest(manifest: dict) -> str:
    body = {k: v for k, v in manifest.items() if k != "content_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _layout(source: Source) -> str:
    return "expert-slice" if source.index is not None else "fused" if len(source.keys) > 1 else "tensor"


@dataclass
class PackSummary:
    path: Path
    modules: int
    shards: int
    bytes: int
    computed: int
    loaded: int


def build_pack(
    aligned: str,
    base: str,
    output: str | Path,
    modules: list[str] | None = None,
    *,
    settings: Settings = Settings(),
    fan_in_fan_out: bool = False,
    force: bool = False,
    command: str | None = None,
    subspaces: SubspaceSource | None = None,
    progress: Progress | None = None,
    jobs: int | None = None,
    allow_swapped: bool = False,
) -> PackSummary:
    """Write the pack of a checkpoint pair to ``output`` (temp folder, then rename: a kill leaves the old folder or
    the whole new one). Subspaces come from ``subspaces`` (the cache: the same bytes as computing them). A pair the
    metadata says is swapped is refused unless ``allow_swapped`` (pair_order.py): its pack would sanitize backwards."""
    settings = settings.resolved()
    out = Path(output)
    aligned_ref, base_ref = parse_ref(aligned), parse_ref(base)
    if base_ref.same_as(aligned_ref):
        raise CsuloraError(f"base {base} is the aligned checkpoint itself; pass the pretrained checkpoint as --base")
    check_pair_order(aligned_ref, base_ref, "--base", allow_swapped=allow_swapped)
    check_output(out, force, [p for p in (aligned_ref.path, base_ref.path) if p is not None])
    source = subspaces or SubspaceSource.open()
    params, device = settings.subspace_params(), settings.torch_device()
    workers = jobs or default_workers(settings.device)
    aligned_ckpt = Checkpoint.open(aligned_ref)
    targets = pack_targets(aligned_ckpt, modules, fan_in_fan_out)
    pair = CheckpointPair(aligned_ckpt, Checkpoint.open(base_ref))
    pair.prepare(targets)
    groups: dict[int, list[Target]] = {}
    for t in targets:
        groups.setdefault(_shard_group(t), []).append(t)
    names = {g: f"subspaces-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i, g in enumerate(sorted(groups))}
    fingerprints: dict[tuple[str, str], str] = {}
    lock = threading.Lock()

    def fingerprint(side: str, key: str) -> str:
        ckpt = pair.aligned if side == "aligned" else pair.base
        with lock:
            known = fingerprints.get((side, key))
        if known is None:
            known = content_fingerprint(ckpt, key)
            with lock:
                fingerprints[(side, key)] = known
        return known

    def work(t: Target) -> tuple[Subspace, bool]:
        sub, cached = source.get(pair, t, params, device)
        a, b = pair.sources(t)
        for key in a.keys:
            fingerprint("aligned", key)
        for key in b.keys:
            fingerprint("base", key)
        return sub, cached

    counts = {"computed": 0, "loaded": 0}
    settings_record = params.to_dict()

    def fill(tmp: Path) -> None:
        records, sources, done = [], {}, 0
        with fixed_threads():
            for group in sorted(groups):
                entries = {}
                for t, (sub, cached) in ordered(work, groups[group], workers):
                    done += 1
                    counts["loaded" if cached else "computed"] += 1
                    if progress:
                        progress("subspaces", done, len(targets), t.id)
                    a, b = pair.sources(t)
                    if a.keys != b.keys:
                        raise CsuloraError(f"{t.id}: aligned and base store it differently ({', '.join(a.keys)} vs "
                                           f"{', '.join(b.keys)}); a pack needs one layout")  # fmt: skip
                    for key in a.keys:
                        info = pair.aligned.info(key)
                        sources[key] = {"shape": list(info.shape), "dtype": info.dtype,
                                        "aligned": fingerprint("aligned", key), "base": fingerprint("base", key)}
                    shape = list(sub.U.shape[:1]) + list(sub.V.shape[:1])
                    record = {"id": t.id, "param": t.param, "expert": t.expert, "transposed": t.transposed,
                              "layout": _layout(a), "sources": list(a.keys), "index": a.index, "shape": shape,
                              "shard": names[group], **entry_record(sub),
                              "captured_fraction": sub.captured_fraction}  # fmt: skip
                    record["key"] = entry_key(record, sources, settings_record)
                    entries[f"{t.id}/"] = (record["key"], sub)
                    records.append(record)
                write_entries(tmp / names[group], entries, {"format": f"csulora-subspace-pack/{PACK_FORMAT}"})
        manifest = {
            "format": "csulora-subspace-pack", "format_version": PACK_FORMAT, "csulora_version": __version__,
            "aligned": {"ref": aligned, "revision": pair.aligned.revision,
                        "model_type": pair.aligned.config().get("model_type")},
            "base": {"ref": base, "revision": pair.base.revision},
            "settings": settings_record, "sources": dict(sorted(sources.items())),
            "modules": sorted(records, key=lambda r: r["id"]), "shards": [names[g] for g in sorted(groups)],
        }  # fmt: skip
        manifest["content_digest"] = _digest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        (tmp / "README.md").write_text(_card(manifest, command or _api_call(aligned, base, out, modules, settings)))

    try:
        write_folder(out, fill, replace=force)
    finally:
        pair.close()
    size = sum(f.stat().st_size for f in out.iterdir())
    return PackSummary(out, len(targets), len(groups), size, counts["computed"], counts["loaded"])


def _api_call(aligned, base, out, modules, settings) -> str:
    return f"csulora.pack.build_pack({aligned!r}, {base!r}, {str(out)!r}, {modules!r}, settings={settings!r})"


def settings_words(s: dict) -> str:
    rule = f"rank {s['rank']}" if s["rank"] else f"energy η = {s['energy']:g}"
    svd = "exact SVD" if s["exact"] else f"randomized SVD, seed {s['seed']}"
    return f"{rule}, cap {s['max_rank']}, {svd}"


def _card(manifest: dict, command: str) -> str:
    a, b, s = manifest["aligned"], manifest["base"], manifest["settings"]
    ks = [m["k"] for m in manifest["modules"]]
    return "\n".join([
        "---", f"base_model: {json.dumps(a['ref'])}", "library_name: csulora", "tags:", "- csulora",
        "- safety-subspace", "---", "", "# csulora safety subspace pack", "",
        f"The safety subspaces (DESIGN.md §2) of `{a['ref']}` − `{b['ref']}`: per module `U_k`, `Σ_k`, `V_k` "
        f"(float32), `‖D‖²` and the captured energy; {len(manifest['modules'])} modules, k from {min(ks)} to "
        f"{max(ks)} ({settings_words(s)}). With it, `csulora sanitize|audit|sweep --subspace <this pack>` run "
        "realign, csulora and resta without the checkpoints, byte-identical to a run from them.", "",
        "A pack is trusted input, like downloaded weights: a forged one can make sanitizing a no-op. Check it once "
        "with `csulora subspace verify` against the checkpoints and pin it by revision (docs/packs.md).", "",
        f"Made with csulora {manifest['csulora_version']}:", "", "```", command, "```", "",
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------- reading a pack


class Pack:
    """A pack's manifest, validated, and its shards (fetched from the Hub one by one, as needed)."""

    def __init__(self, spec: str, ref: CheckpointRef, folder: Path, manifest: dict, digest: str, revision: str | None):
        self.spec, self.ref, self.folder, self.manifest = spec, ref, folder, manifest
        self.digest, self.revision = digest, revision  # digest: sha256 of the manifest file
        self.modules = {m["id"]: m for m in manifest["modules"]}
        self.by_source = {(tuple(m["sources"]), m["index"]): m for m in manifest["modules"]}
        self.params = SubspaceParams(**{k: manifest["settings"][k] for k in ("rank", "energy", "max_rank", "exact",
                                                                              "seed")})  # fmt: skip
        self.fetched: list[str] = []

    @classmethod
    def open(cls, spec: str) -> Pack:
        ref = _pack_ref(spec)
        if ref.path is not None:
            path, revision = ref.path / MANIFEST, None
            if not path.is_file():
                raise CsuloraError(f"{spec}: not a subspace pack (no {MANIFEST}); make one with csulora subspace -o")
        else:
            from huggingface_hub import hf_hub_download

            with _hub_errors(ref):
                path = Path(hf_hub_download(ref.repo_id, MANIFEST, revision=ref.revision))
            revision = path.parent.name
        raw = path.read_bytes()
        where = f"{spec}: {MANIFEST}"
        try:
            manifest = json.loads(raw)
            ok = (manifest.get("format") == "csulora-subspace-pack"
                  and manifest.get("content_digest") == _digest(manifest))  # fmt: skip
        except (ValueError, AttributeError):
            ok = False
        if not ok:
            raise CsuloraError(f"{where}: edited or damaged (its content digest does not match); re-download the "
                               "pack, and verify it (csulora subspace verify)")  # fmt: skip
        if manifest.get("format_version") != PACK_FORMAT:
            raise CsuloraError(f"{where}: pack format {manifest.get('format_version')}, this csulora reads "
                               f"{PACK_FORMAT}; rebuild the pack with this version")  # fmt: skip
        try:
            return cls(spec, ref, path.parent, manifest, hashlib.sha256(raw).hexdigest(), revision)
        except (KeyError, TypeError) as e:  # sealed, but not written by csulora
            raise CsuloraError(f"{where}: lacks {e} or has it in another form; not a pack this csulora wrote") from e

    def describe(self) -> dict:
        """What a report records of the pack it was sanitized with."""
        return {"ref": self.spec, "revision": self.revision, "manifest_sha256": self.digest,
                "settings": settings_words(self.manifest["settings"])}  # fmt: skip

    def shard(self, name: str) -> Path:
        path = self.folder / name
        if self.ref.path is None and not path.is_file():
            from huggingface_hub import hf_hub_download

            with _hub_errors(self.ref):
                path = Path(hf_hub_download(self.ref.repo_id, name, revision=self.ref.revision))
            self.fetched.append(name)
        if not path.is_file():
            raise CsuloraError(f"{path}: shard of the pack is missing; re-download the pack")
        return path

    def entry(self, reader: TensorReader, module: dict) -> Subspace:
        """One module's subspace, every check passed: entry key from the manifest, checksum, header against
        manifest."""
        path = self.shard(module["shard"])
        key = entry_key(module, self.manifest["sources"], self.manifest["settings"])
        where = f"{path}: module {module['id']}"
        if key != module.get("key"):
            raise CsuloraError(f"{where}: the manifest's key does not match its sources and settings (edited "
                               "manifest); re-download the pack")  # fmt: skip
        try:
            sub = read_entry(reader, path, f"{module['id']}/", key, tuple(module["shape"]))
        except BadEntry as e:
            raise CsuloraError(f"{where}: {e}; the pack is damaged or was changed: re-download it") from e
        if entry_record(sub) != {k: module[k] for k in ("k", "total_energy", "captured_energy", "checksum")}:
            raise CsuloraError(f"{where}: its header disagrees with the manifest (k, energies or checksum); the "
                               "pack was changed: re-download it")  # fmt: skip
        return sub


def _pack_ref(spec: str) -> CheckpointRef:
    path = Path(spec).expanduser()
    if path.exists() and not path.is_dir():
        raise CsuloraError(f"{spec}: a subspace pack is a folder (with {MANIFEST}) or a Hub id, not a file")
    return parse_ref(spec)


class PackSide(Checkpoint):
    """One side of the pair as the pack knows it: its reference, the source tensors' names and shapes (for
    ``targets.bind``), never its weights."""

    def __init__(self, pack: Pack, side: str):
        record = pack.manifest[side]
        super().__init__(CheckpointRef(spec=record["ref"]), pack.folder,
                         {k: "pack" for k in pack.manifest["sources"]}, record.get("revision"))  # fmt: skip
        self.pack, self.side = pack, side

    def require(self, needed) -> None:
        missing = [k for k in needed if k not in self.weight_map]
        if missing:
            raise CsuloraError(f"{self.pack.spec}: the pack has no module for {missing[0]!r} (and {len(missing) - 1} "
                               "more) that the adapter targets; make a pack that covers it (csulora subspace "
                               "--modules) or pass --aligned and --base")  # fmt: skip

    def source(self, target: Target) -> Source:
        found = resolve(target, self.weight_map)
        if found is None:
            self.require([target.param])
        return found

    def info(self, key: str) -> TensorInfo:
        s = self.pack.manifest["sources"][key]
        return TensorInfo(s["dtype"], tuple(s["shape"]))

    def config(self) -> dict:
        return {"model_type": self.pack.manifest["aligned"].get("model_type")}

    def read(self, source: Source) -> torch.Tensor:
        raise CsuloraError(f"{self.pack.spec}: the adapter needs the aligned weight {source.keys[0]} (a full weight "
                           "saved beside the factors); a subspace pack lacks the weights: pass --aligned and --base")

    def fingerprint(self) -> str:
        record = sorted((k, s[self.side]) for k, s in self.pack.manifest["sources"].items())
        return hashlib.sha256(json.dumps(record).encode()).hexdigest()

    def close(self) -> None:
        pass


class PackPair(CheckpointPair):
    """The pair behind a pack: modules found by their source tensors, shards named by the pack."""

    def __init__(self, pack: Pack):
        super().__init__(PackSide(pack, "aligned"), PackSide(pack, "base"))
        self.pack = pack

    def module(self, target: Target) -> dict:
        source = self.sources(target)[0]
        module = self.pack.by_source.get((source.keys, source.index))
        if module is None:
            self.aligned.require([target.id + " (as " + "+".join(source.keys) + ")"])
        if module["transposed"] != target.transposed:
            what = "transposed (fan_in_fan_out, embeddings)" if target.transposed else "in nn.Linear orientation"
            raise CsuloraError(f"{self.pack.spec}: module {module['id']} is stored in the other orientation, but the "
                               f"adapter needs it {what}; make a pack for this adapter (csulora subspace "
                               "--fan-in-fan-out) or pass --aligned and --base")  # fmt: skip
        return module

    def prepare(self, targets: list[Target]) -> None:
        for t in targets:
            if t not in self._sources:
                source = self.aligned.source(t)
                self._sources[t] = (source, source)
        for shard in sorted({self.module(t)["shard"] for t in targets}):
            self.pack.shard(shard)  # fetched up front: a missing shard fails before any work

    def shard(self, target: Target) -> str:
        return self.module(target)["shard"]

    def displacement(self, target: Target, device: torch.device, aligned: torch.Tensor | None = None):
        raise CsuloraError(f"{self.pack.spec}: {target.id} needs the whole displacement D; a subspace pack holds only "
                           "U_k, Σ_k, V_k: pass --aligned and --base")  # fmt: skip


@dataclass
class PackSource:
    """Subspaces from a pack, in place of ``SubspaceSource`` (same ``get``); ``accept_mismatch``: run an adapter
    whose ``base_model_name_or_path`` names neither of the pack's references."""

    pack: Pack
    accept_mismatch: bool = False
    computed: int = 0
    loaded: int = 0
    _local: threading.local = field(default_factory=threading.local, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _memo: Memo = field(default_factory=Memo, repr=False)

    @property
    def cache(self) -> Pack:  # where entries live (a sweep keeps this source, as it keeps a cache)
        return self.pack

    @classmethod
    def open(cls, spec: str, accept_mismatch: bool = False) -> PackSource:
        return cls(Pack.open(spec), accept_mismatch)

    def serve(self, settings: Settings) -> Settings:
        """``settings`` with the pack's subspace rule where none is given; bad usage when the method needs what a
        pack lacks or the rule differs from the pack's."""
        if settings.method == "safe-lora":
            raise CsuloraError(f"--method safe-lora needs the whole displacement D (its projection D Dᵀ/‖D‖); the "
                               f"pack {self.pack.spec} holds only U_k, Σ_k, V_k: pass --aligned and --base, or use "
                               "realign, csulora or resta")  # fmt: skip
        p = self.pack.params
        if settings.subspace_rank is None and settings.subspace_energy is None:
            settings = replace(settings, subspace_rank=p.rank, subspace_energy=None if p.rank else p.energy)
        if settings.resolved().subspace_params() != p:
            asked = settings_words(settings.resolved().subspace_params().to_dict())
            raise CsuloraError(f"{self.pack.spec}: the pack serves {settings_words(p.to_dict())}, not {asked}; pass "
                               "those settings (or no subspace options), or --aligned and --base")  # fmt: skip
        return settings

    def bind_pair(self, adapter) -> PackPair:
        """The pair for an adapter, after the agreement checks (its base model and the pack's references)."""
        if adapter.full:
            first = sorted(adapter.full)[0]
            raise CsuloraError(f"{adapter.path}: saves full weights ({first}, {len(adapter.full)} in all) whose "
                               "correction needs the aligned weights; a subspace pack lacks them: pass --aligned and "
                               "--base")  # fmt: skip
        named = adapter.base_model
        refs = [self.pack.manifest[s]["ref"] for s in ("aligned", "base")]
        if not self.accept_mismatch and (named is None or not any(_same_model(named, r) for r in refs)):
            raise CsuloraError(f"{adapter.path}: base_model_name_or_path {named!r} names neither of the pack's "
                               f"references (aligned {refs[0]!r}, base {refs[1]!r}); use the pack of that model, or "
                               "pass --accept-pack-mismatch if it is the same model under another name")  # fmt: skip
        return PackPair(self.pack)

    def get(self, pair, target: Target, params: SubspaceParams, device: torch.device,
            displacement=None, aligned=None) -> tuple[Subspace, bool]:  # fmt: skip
        if not isinstance(pair, PackPair):
            raise CsuloraError(f"{self.pack.spec}: --subspace serves adapters; --model needs the aligned weights "
                               "(a pack lacks them): pass --aligned and --base")  # fmt: skip
        if params != self.pack.params:
            raise CsuloraError(f"{self.pack.spec}: the pack serves {settings_words(self.pack.params.to_dict())}")
        module = pair.module(target)
        sub = self._memo.get(module["key"])
        if sub is None:  # read and checked once a process: a batch reuses it
            reader = getattr(self._local, "reader", None)
            if reader is None:
                reader = self._local.reader = TensorReader()
            sub = self.pack.entry(reader, module)
            self._memo.put(module["key"], sub)
        with self._lock:
            self.loaded += 1
        return Subspace(sub.U.to(device), sub.S.to(device), sub.V.to(device), sub.total_energy,
                        sub.captured_energy), True  # fmt: skip


def _same_model(named: str, ref: str) -> bool:
    """Whether an adapter's ``base_model_name_or_path`` names a reference: equal, or the same last path component
    (a Hub id ``org/llama-chat`` names a local copy ``/models/llama-chat``), revisions aside."""

    def last(s: str) -> str:
        return Path(s.partition("@")[0].rstrip("/")).name.lower()

    return named == ref or last(named) == last(ref)


# ---------------------------------------------------------------------------------------------- verifying a pack


@dataclass
class Verified:
    checked: list[str]
    identical: int  # modules whose recomputed entry has the pack's bytes
    differing: list[str]


def verify_pack(
    spec: str, aligned: str, base: str, modules: str | None = None, *, device: str = "cpu",
    progress: Progress | None = None, jobs: int | None = None,
) -> Verified:  # fmt: skip
    """Recompute modules of a pack from the checkpoints and compare. ``modules``: ``all``, a number ``N`` (that
    many, spread evenly over the pack; default 16) or comma-separated names. ``GateFailed`` names the modules
    that differ; a pack of other checkpoints, or a damaged one, is bad input."""
    pack = Pack.open(spec)
    records = _chosen(pack, modules)
    aligned_ref, base_ref = parse_ref(aligned), parse_ref(base)
    keys = sorted({k for m in records for k in m["sources"]})
    pair = CheckpointPair(Checkpoint.open(aligned_ref, keys), Checkpoint.open(base_ref, keys))
    sources = pack.manifest["sources"]
    try:
        for key in keys:
            for side, ckpt in (("aligned", pair.aligned), ("base", pair.base)):
                if content_fingerprint(ckpt, key) != sources[key][side]:
                    raise CsuloraError(f"{spec}: was made from other checkpoints: {key} of {ckpt.ref} differs from "
                                       f"the pack's {side} {pack.manifest[side]['ref']!r}; verify against the pair "
                                       "it names")  # fmt: skip
        targets = {m["id"]: Target(m["param"], m["expert"], m["transposed"]) for m in records}
        pair.prepare(list(targets.values()))
        torch_device = Settings(device=device).torch_device()
        reader, identical, differing, checked = TensorReader(), 0, [], []

        def recompute(m: dict) -> Subspace:
            return compute_subspace(pair, targets[m["id"]], pack.params, torch_device)

        with fixed_threads():
            for i, (m, fresh) in enumerate(ordered(recompute, records, jobs or default_workers(device))):
                if progress:
                    progress("verify", i + 1, len(records), m["id"])
                stored = pack.entry(reader, m)
                checked.append(m["id"])
                if entry_record(fresh) == entry_record(stored):  # the same bytes
                    identical += 1
                elif not _close(stored, fresh):
                    differing.append(m["id"])
        reader.close()
    finally:
        pair.close()
    result = Verified(checked, identical, differing)
    if differing:
        raise GateFailed(f"{spec}: {len(differing)} of {len(checked)} modules differ from the recomputed subspaces: "
                         f"{', '.join(differing[:5])}{' …' if len(differing) > 5 else ''}; do not use this pack")
    return result


def _chosen(pack: Pack, modules: str | None) -> list[dict]:
    ids = sorted(pack.modules)
    if modules in (None, "") or modules.isdigit():
        n = min(int(modules or 16), len(ids))
        if n < 1:
            raise CsuloraError("--modules 0 checks nothing; pass a number ≥ 1, all, or module names")
        picks = sorted({round(i * (len(ids) - 1) / max(n - 1, 1)) for i in range(n)})
        return [pack.modules[ids[i]] for i in picks]
    if modules == "all":
        return [pack.modules[i] for i in ids]
    names = [m for m in modules.split(",") if m]
    found = [pack.modules[i] for i in ids
             if any(i == n or i.endswith("." + n) or i.removesuffix(".weight").endswith("." + n) for n in names)]
    if not found:
        raise CsuloraError(f"{pack.spec}: no module of the pack matches --modules {modules}")
    return found


def _close(a: Subspace, b: Subspace, tol: float = 1e-4) -> bool:
    """The same subspace up to float rounding (another device or BLAS): same ``k``, singular values and energies
    within ``tol``, and both sides spanning the same space (``‖UₐᵀU_b‖² ≥ k(1 − tol)``)."""
    if a.k != b.k or abs(a.total_energy - b.total_energy) > tol * max(a.total_energy, 1e-30):
        return False
    if a.k == 0:
        return True
    S_a, S_b = a.S.double().cpu(), b.S.double().cpu()
    if not torch.allclose(S_a, S_b, rtol=tol, atol=tol * float(S_a[0])):
        return False
    return all(float((x.double().cpu().T @ y.double().cpu()).square().sum()) >= a.k * (1 - tol)
               for x, y in ((a.U, b.U), (a.V, b.V)))  # fmt: skip
