"""PEFT LoRA adapter folders: reading and validating the config and the tensors, and writing them back.

Reading sorts every tensor of the file into what it is (PEFT_FORMAT.md): LoRA factor pairs (``Layer``:
linear, embedding, or a wrapped parameter such as a stack of MoE experts), full tensors (``modules_to_save``,
saved base layers) and vectors kept as trained (DoRA magnitudes, LoRA biases, trainable-token rows). Which
checkpoint weight each of them belongs to is decided against the aligned checkpoint (``targets.py``).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CsuloraError
from ..precision import all_finite
from .layouts import Target
from .tensorfile import read_header, save_sorted, sha256_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
BASE_LAYER = ".base_layer"
# init methods that rewrite the base weights at load time: the adapter is then no plain delta on the aligned model
NOT_A_DELTA = ("pissa", "olora", "corda", "loftq", "lora_ga")
# LoraConfig fields that make a layer compute something other than W + s·B·A (peft's LoRA variants, tagged
# ``is_lora_variant`` in its LoraConfig, and the options that change the model's structure); DoRA is read.
VARIANTS = {
    "velora_config": "VeLoRA", "alora_invocation_tokens": "activated LoRA (aLoRA)", "monteclora_config": "MonteCLoRA",
    "use_bdlora": "block-diagonal LoRA", "arrow_config": "Arrow routing", "kasa_config": "KaSA",
    "use_qalora": "QA-LoRA", "layer_replication": "layer replication",
}  # fmt: skip
INIT_VARIANTS = ("mica",)  # init_lora_weights values that select a variant
_FACTOR = re.compile(r"(?P<path>.+)\.lora_(?P<side>[AB])\.weight")
_EMBEDDING = re.compile(r"(?P<path>.+)\.lora_embedding_(?P<side>[AB])")
_KEPT = {  # vectors PEFT saves beside the factors, kept as trained (DESIGN.md §6b): pattern → kind
    re.compile(r"(?P<path>.+)\.lora_magnitude_vector(?:\.weight)?"): "dora-magnitude",
    re.compile(r"(?P<path>.+)\.lora_B\.bias"): "lora-bias",
    re.compile(r"(?P<path>.+)\.token_adapter\.trainable_tokens_delta"): "trainable-tokens",
}
KEPT_REASONS = {
    "dora-magnitude": "DoRA magnitude vector: kept as trained (the method corrects the LoRA part s·B·A)",
    "lora-bias": "LoRA bias vector (lora_bias): kept as trained",
    "trainable-tokens": "trainable-token rows (trainable_token_indices): kept as trained",
}


# A full model's tensor that no method corrects (DESIGN.md §10: embeddings, the head, norms, biases): listed, but
# `audit --fail-on-kept` does not fail on it, since `sanitize --model` could not have changed it (docs/models.md).
OUTSIDE_METHOD = "outside-method"


@dataclass(frozen=True)
class Kept:
    """A saved tensor written back as trained, not sanitized: why, and whether it merely repeats the aligned
    checkpoint's tensor of the same name bit for bit (a copy is harmless: the audit gate lets it pass)."""

    key: str
    shape: list[int]
    kind: str
    reason: str
    identical: bool = False

    def to_dict(self) -> dict:
        return {"key": self.key, "shape": self.shape, "kind": self.kind, "reason": self.reason,
                "identical_to_aligned": self.identical}  # fmt: skip


@dataclass(frozen=True)
class Layer:
    """One saved PEFT LoRA layer: the factors of one module (``path``, without ``base_model.model.``).

    A parameter wrapped twice on one module (MoE experts' ``gate_up_proj`` and ``down_proj``) saves its inner
    wrapper under ``<module>.base_layer``: ``depth`` counts those."""

    path: str
    a_key: str
    b_key: str
    A: torch.Tensor
    B: torch.Tensor
    embedding: bool

    @property
    def module(self) -> str:
        return self.path.replace(BASE_LAYER, "")

    @property
    def depth(self) -> int:
        return self.path.count(BASE_LAYER)


@dataclass
class LoraModule:
    """One module of the method: ``ΔW = scaling · B A`` in ``nn.Linear`` orientation ``(d_out, d_in)``.

    An expert of a stacked parameter is a module of its own: ``A``, ``B`` are its slices of the layer's
    factors (DESIGN.md §6b)."""

    name: str  # e.g. model.layers.0.self_attn.q_proj, or model.layers.0.mlp.experts.gate_up_proj[3]
    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    rank: int
    alpha: float
    scaling: float
    target: Target | None = None  # default: the plain linear layer ``<name>.weight``
    layer: Layer | None = None  # default: the plain layer ``<name>`` holding exactly ``A`` and ``B``
    kind: str = "linear"  # linear | embedding | parameter (a wrapped 2-D parameter) | expert
    dora: bool = False
    pattern_name: str = ""  # what PEFT matches rank_pattern / alpha_pattern keys against (default: the name)

    def __post_init__(self) -> None:
        self.target = self.target or Target(f"{self.name}.weight")
        self.layer = self.layer or Layer(self.name, f"{PREFIX}{self.name}.lora_A.weight",
                                         f"{PREFIX}{self.name}.lora_B.weight", self.A, self.B, False)  # fmt: skip
        self.pattern_name = self.pattern_name or self.name

    def key(self, side: str) -> str:
        """The adapter tensor holding this module's factor ``side`` (an expert's: the layer's stacked one)."""
        return self.layer.a_key if side == "A" else self.layer.b_key


@dataclass
class DenseModule:
    """A full weight saved in the adapter (``modules_to_save``) with the aligned weight's shape: a module whose
    update is dense, ``ΔW = W_saved − W_a`` (DESIGN.md §6b)."""

    name: str
    key: str  # the adapter tensor
    W: torch.Tensor
    target: Target


@dataclass
class Adapter:
    path: Path
    config: dict
    config_bytes: bytes  # written back unchanged
    weights_file: Path
    weights_sha256: str
    tensors: dict[str, torch.Tensor]  # every tensor of the file, as read
    layers: list[Layer]
    full: dict[str, torch.Tensor]  # key → full tensor (modules_to_save, saved base layers, other vectors)
    kept: list[Kept] = field(default_factory=list)  # vectors kept as trained, known from their names
    dora: set[str] = field(default_factory=set)  # module paths with a DoRA magnitude vector

    @property
    def base_model(self) -> str | None:
        named = self.config.get("base_model_name_or_path")
        return named if isinstance(named, str) and named else None

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))


def pattern_value(patterns: dict, module: str, default):
    """PEFT's pattern rule (≥ 0.14): the first key ``K`` with ``re.match(rf"(.*\\.)?({K})$", module)`` wins."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_scaling(rank: int, alpha: float, use_rslora: bool) -> float:
    """LoRA scaling (§1): ``s = α/r``, or ``α/√r`` with rsLoRA."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def rank_and_alpha(config: dict, pattern_name: str) -> tuple[int, float, float]:
    """A module's rank, alpha and scaling from the config and its patterns."""
    rank = pattern_value(config.get("rank_pattern") or {}, pattern_name, config["r"])
    alpha = pattern_value(config.get("alpha_pattern") or {}, pattern_name, config["lora_alpha"])
    return rank, alpha, lora_scaling(rank, alpha, bool(config.get("use_rslora", False)))


def targeted_module(config: dict, module: str) -> bool:
    """Whether ``target_modules`` names ``module`` (PEFT's rule: a list matches the name or a dotted suffix;
    a string is a regex for the whole name)."""
    targets = config.get("target_modules")
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets or ())


ALL_LINEAR = "all-linear"  # PEFT's shorthand: every linear layer but the output head


def peft_wraps(config: dict, module: str, embedding: bool = False) -> bool:
    """Whether PEFT, loading this config, puts a LoRA layer on ``module`` (``check_target_module_exists`` of the
    installed peft): not excluded (``exclude_modules``, ``modules_to_save``), then ``target_modules`` — a string
    matched with ``re.fullmatch`` (``"all-linear"``: any linear layer but the head), a list by the exact name or a
    ``.``-suffix — narrowed by ``layers_to_transform``. Saved factors of a module it does not wrap are ignored."""
    excluded = config.get("exclude_modules")
    if isinstance(excluded, str) and re.fullmatch(excluded, module):
        return False
    if isinstance(excluded, list) and any(module == e or module.endswith("." + e) for e in excluded):
        return False
    if any(re.match(rf"(^|.*\.){m}($|\..*)", module) for m in config.get("modules_to_save") or ()):
        return False
    targets = config.get("target_modules")
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        return not embedding and module.rsplit(".", 1)[-1] not in ("lm_head", "embed_out", "output")
    if not isinstance(targets, list):
        return targeted_module(config, module)
    found = targeted_module(config, module)
    layers = config.get("layers_to_transform")
    if found and module not in targets and layers not in (None, []):
        patterns = config.get("layers_pattern") or []
        patterns = [patterns] if isinstance(patterns, str) else patterns
        match = next((m for p in patterns if (m := re.match(rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", module))), None) \
            if patterns else re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", module)  # fmt: skip
        if match is None:
            return False
        index = int(match["idx"])
        return index == layers if isinstance(layers, int) else index in layers
    return found


def read_adapter(path: Path, trust_pickle: bool = False) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder; refuse what cannot be sanitized, naming it."""
    if not path.is_dir():
        raise CsuloraError(f"{path}: no such adapter folder")
    config_file = path / CONFIG
    if not config_file.is_file():
        raise CsuloraError(
            f"{path}: no {CONFIG}; point --adapter at a PEFT adapter folder (the save_pretrained output)"
        )
    config_bytes = config_file.read_bytes()
    try:
        config = json.loads(config_bytes)
        if not isinstance(config, dict):
            raise ValueError
    except (ValueError, UnicodeDecodeError) as e:
        raise CsuloraError(f"{config_file}: not valid JSON; re-save the adapter") from e
    _check_config(config, config_file)
    weights_file, tensors = _read_weights(path, trust_pickle)
    layers, full, kept, dora = _sort(tensors, weights_file)
    _check_dora(config, config_file, layers, dora)
    return Adapter(
        path=path,
        config=config,
        config_bytes=config_bytes,
        weights_file=weights_file,
        weights_sha256=sha256_file(weights_file),
        tensors=tensors,
        layers=layers,
        full=full,
        kept=kept,
        dora=dora,
    )


def _check_dora(config: dict, where: Path, layers: list[Layer], dora: set[str]) -> None:
    """``use_dora`` and the saved magnitude vectors agree: PEFT builds DoRA layers from the config, so a DoRA
    config without magnitudes loads them from the base weights (not the math csulora applied), and magnitudes
    under a plain config are ignored."""
    if config.get("use_dora", False):
        lacking = [layer.path for layer in layers if layer.depth == 0 and layer.path not in dora]
        if lacking:
            raise CsuloraError(f"{where}: use_dora is true but the weights hold no lora_magnitude_vector for "
                               f"{lacking[0]} (and {len(lacking) - 1} more); PEFT would load it as DoRA with other "
                               "magnitudes: re-save the adapter, or set use_dora false for a plain LoRA")  # fmt: skip
    elif dora:
        raise CsuloraError(f"{where}: the weights hold DoRA magnitude vectors ({sorted(dora)[0]}…) but use_dora is "
                           "false, so PEFT would ignore them; set use_dora to true or re-save the adapter")  # fmt: skip


def _check_config(config: dict, where: Path) -> None:
    if "peft_type" not in config:
        raise CsuloraError(f"{where}: names no peft_type, so PEFT cannot load it; add \"peft_type\": \"LORA\" if it "
                           "is a LoRA adapter")  # fmt: skip
    peft_type = config["peft_type"]
    if peft_type != "LORA":
        raise CsuloraError(f"{where}: peft_type is {peft_type!r}, another PEFT tuner; csulora sanitizes LoRA "
                           "adapters (plain, DoRA, MoE experts, embeddings, modules_to_save) only")  # fmt: skip
    for name, words in VARIANTS.items():
        if config.get(name):
            raise CsuloraError(f"{where}: {name} selects {words}, a LoRA variant csulora does not sanitize; "
                               "sanitize a plain LoRA or DoRA adapter")  # fmt: skip
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(NOT_A_DELTA):
        raise CsuloraError(
            f"{where}: init_lora_weights={init!r} changes the base weights at load time, so the adapter is not a "
            "plain delta on the aligned model; convert it to a plain LoRA first"
        )
    if init in INIT_VARIANTS:
        raise CsuloraError(f"{where}: init_lora_weights={init!r} selects a LoRA variant csulora does not sanitize")
    _check_number(config.get("r"), "r", where, integer=True)
    _check_number(config.get("lora_alpha"), "lora_alpha", where, integer=False)
    for name in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(name) or {}
        if not isinstance(patterns, dict):
            raise CsuloraError(f"{where}: {name} must be a mapping of module pattern to value")
        for key, value in patterns.items():
            try:  # compiled as PEFT uses it: a key can be valid alone and not inside the wrapper
                re.compile(rf"(.*\.)?({key})$")
            except (re.error, TypeError) as e:
                raise CsuloraError(f"{where}: {name} key {key!r} is not a valid regular expression ({e})") from e
            _check_number(value, f"{name}[{key!r}]", where, integer=name == "rank_pattern")
    for name in ("use_rslora", "fan_in_fan_out", "use_dora"):
        if not isinstance(config.get(name, False), bool):
            raise CsuloraError(f"{where}: {name} must be true or false, found {config[name]!r}")
    targets = config.get("target_modules")
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as e:
            raise CsuloraError(f"{where}: target_modules {targets!r} is not a valid regular expression ({e})") from e
    elif targets is not None and not (isinstance(targets, list) and all(isinstance(t, str) for t in targets)):
        raise CsuloraError(f"{where}: target_modules must be a list of module names or a regular expression")
    params = config.get("target_parameters") or []
    if not (isinstance(params, list) and all(isinstance(p, str) and p for p in params)):
        raise CsuloraError(f"{where}: target_parameters must be a list of parameter names")
    # the fields peft_wraps reads to decide which modules PEFT wraps: as PEFT's LoraConfig types them
    for name in ("modules_to_save", "exclude_modules", "layers_pattern"):
        value = config.get(name)
        strings = isinstance(value, list) and all(isinstance(v, str) for v in value)
        if value is not None and not (strings or (name != "modules_to_save" and isinstance(value, str))):
            raise CsuloraError(f"{where}: {name} must be a list of module names, found {value!r}")
    layers = config.get("layers_to_transform")
    if layers is not None and not (isinstance(layers, int) and not isinstance(layers, bool) or (
            isinstance(layers, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in layers))):
        raise CsuloraError(f"{where}: layers_to_transform must be a layer index or a list of them, found {layers!r}")


def _check_number(value, name: str, where: Path, integer: bool) -> None:
    """Ranks are positive integers; alphas positive finite numbers (JSON allows NaN and Infinity)."""
    number = (int,) if integer else (int, float)
    if not isinstance(value, number) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise CsuloraError(f"{where}: {name} must be {kind}, found {value!r}")


def _read_weights(path: Path, trust_pickle: bool) -> tuple[Path, dict[str, torch.Tensor]]:
    weights = path / WEIGHTS
    if weights.is_file():
        read_header(weights)  # validates before safetensors allocates anything
        from safetensors.torch import load_file

        try:
            return weights, load_file(weights)
        except Exception as e:  # the header passed; the data did not
            raise CsuloraError(f"{weights}: unreadable ({e}); re-save the adapter") from e
    pickled = path / PICKLE_WEIGHTS
    if pickled.is_file():
        if not trust_pickle:
            raise CsuloraError(
                f"{pickled}: pickle files can run code when loaded; pass --trust-pickle if you trust it, "
                "or re-save the adapter with safe_serialization=True"
            )
        try:
            state = torch.load(pickled, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CsuloraError(f"{pickled}: not a loadable weights-only PyTorch file ({e.__class__.__name__})") from e
        if not isinstance(state, dict) or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
        ):
            raise CsuloraError(f"{pickled}: expected a mapping of tensor names to tensors")
        # pickles keep views and shared storage, which safetensors refuses to write: own each tensor
        return pickled, {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in state.items()}
    raise CsuloraError(f"{path}: no {WEIGHTS}; point --adapter at a PEFT adapter folder")


def _sort(
    tensors: dict[str, torch.Tensor], where: Path
) -> tuple[list[Layer], dict[str, torch.Tensor], list[Kept], set[str]]:
    """Every key is a factor, a vector kept as trained, or a full tensor; anything else is refused by name.
    Returns the layers, the full tensors, the kept vectors and the paths of modules with a DoRA magnitude."""
    pairs: dict[tuple[str, bool], dict[str, str]] = {}
    full: dict[str, torch.Tensor] = {}
    kept: list[Kept] = []
    dora: set[str] = set()
    for key, tensor in tensors.items():
        if not key.startswith(PREFIX):
            raise CsuloraError(f"{where}: holds {key}, which is not a PEFT adapter key (base_model.model.…); "
                               "re-save the adapter with PEFT")  # fmt: skip
        m = _FACTOR.fullmatch(key) or _EMBEDDING.fullmatch(key)
        if m is not None:
            pairs.setdefault((m["path"][len(PREFIX) :], "lora_embedding_" in key), {})[m["side"]] = key
            continue
        found = next(((m, kind) for pattern, kind in _KEPT.items() if (m := pattern.fullmatch(key))), None)
        if found is not None:
            m, kind = found
            kept.append(Kept(key, list(tensor.shape), kind, KEPT_REASONS[kind]))
            if kind == "dora-magnitude":
                dora.add(m["path"][len(PREFIX) :])
        elif ".lora_" in key or key.split(".")[-1].startswith("lora_"):
            raise CsuloraError(f"{where}: holds {key}, a LoRA tensor csulora does not know (another LoRA variant?); "
                               "sanitize a plain LoRA or DoRA adapter")  # fmt: skip
        else:
            full[key] = tensor
    if not pairs:
        raise CsuloraError(f"{where}: holds no LoRA factors (…lora_A.weight / …lora_B.weight)")
    layers = []
    for (path, embedding), sides in sorted(pairs.items()):
        if set(sides) != {"A", "B"}:
            raise CsuloraError(f"{where}: module {path} has lora_{''.join(sides)} but not its pair")
        A, B = tensors[sides["A"]], tensors[sides["B"]]
        if A.ndim != 2 or B.ndim != 2:
            raise CsuloraError(f"{where}: module {path} has {A.ndim}-D LoRA factors ({sides['A']}); LoRA on "
                               "convolutions is not supported (linear layers, embeddings, experts are)")  # fmt: skip
        if A.shape[0] != B.shape[1]:
            raise CsuloraError(f"{where}: module {path} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                               "whose ranks differ; the file is damaged: re-save the adapter")  # fmt: skip
        if not A.is_floating_point() or not B.is_floating_point():
            raise CsuloraError(f"{where}: module {path} has non-floating-point LoRA factors")
        if not (all_finite(A) and all_finite(B)):
            raise CsuloraError(f"{where}: module {path} has NaN or Inf values; the training diverged, fix it first")
        layers.append(Layer(path, sides["A"], sides["B"], A, B, embedding))
    return layers, full, kept, dora


def write_adapter(
    folder: Path,
    adapter: Adapter,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    config: dict | None = None,
) -> None:
    """Write ``adapter_model.safetensors`` (header metadata: ``format: pt`` plus settings) and the config:
    the input's bytes unchanged, or ``config`` (the block form) serialized as PEFT does."""
    save_sorted(tensors, folder / WEIGHTS, {"format": "pt", **metadata})
    if config is None:
        (folder / CONFIG).write_bytes(adapter.config_bytes)
    else:
        (folder / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True))
