"""PEFT LoRA adapters: reading, validating, per-module scaling, and writing."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CsuloraError
from .tensorfile import read_header, save_sorted, sha256_file

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PICKLE_WEIGHTS = "adapter_model.bin"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<side>[AB])\.weight")
# init methods that rewrite the base weights at load time: the adapter is then no plain delta
_NOT_A_DELTA = ("pissa", "olora", "corda", "loftq", "eva")


@dataclass
class LoraModule:
    """One adapted linear layer: ``ΔW = scaling · B A`` in ``nn.Linear`` orientation ``(d_out, d_in)``."""

    name: str  # module path inside the base model, e.g. model.layers.0.self_attn.q_proj
    A: torch.Tensor  # (r, d_in), as stored
    B: torch.Tensor  # (d_out, r), as stored
    rank: int
    alpha: float
    scaling: float

    @property
    def weight_key(self) -> str:
        """The checkpoint tensor this module adapts."""
        return f"{self.name}.weight"

    def key(self, side: str) -> str:
        return f"{PREFIX}{self.name}.lora_{side}.weight"


@dataclass
class Adapter:
    path: Path
    config: dict
    config_bytes: bytes  # written back unchanged
    weights_file: Path
    weights_sha256: str
    modules: list[LoraModule]

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


def read_adapter(path: Path, trust_pickle: bool = False) -> Adapter:
    """Read and validate a PEFT LoRA adapter folder; refuse what the method does not cover."""
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
    modules = _modules(config, tensors, weights_file)
    return Adapter(
        path=path,
        config=config,
        config_bytes=config_bytes,
        weights_file=weights_file,
        weights_sha256=sha256_file(weights_file),
        modules=modules,
    )


def _check_config(config: dict, where: Path) -> None:
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise CsuloraError(f"{where}: peft_type is {peft_type!r}; csulora sanitizes LoRA adapters only")
    if config.get("use_dora"):
        raise CsuloraError(f"{where}: DoRA adapters (use_dora) are not supported yet; sanitize a plain LoRA adapter")
    if config.get("modules_to_save"):
        raise CsuloraError(
            f"{where}: modules_to_save {config['modules_to_save']} stores full weights, which csulora does not "
            "sanitize yet; retrain without modules_to_save"
        )
    if config.get("lora_bias"):
        raise CsuloraError(f"{where}: lora_bias adapters are not supported yet; retrain with lora_bias=False")
    init = str(config.get("init_lora_weights", True)).lower()
    if init.startswith(_NOT_A_DELTA):
        raise CsuloraError(
            f"{where}: init_lora_weights={init!r} changes the base weights at load time, so the adapter is not a "
            "plain delta on the aligned model; convert it to a plain LoRA first"
        )
    _check_number(config.get("r"), "r", where, integer=True)
    _check_number(config.get("lora_alpha"), "lora_alpha", where, integer=False)
    for field in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(field) or {}
        if not isinstance(patterns, dict):
            raise CsuloraError(f"{where}: {field} must be a mapping of module pattern to value")
        for key, value in patterns.items():
            try:  # compiled as PEFT uses it: a key can be valid alone and not inside the wrapper
                re.compile(rf"(.*\.)?({key})$")
            except (re.error, TypeError) as e:
                raise CsuloraError(f"{where}: {field} key {key!r} is not a valid regular expression ({e})") from e
            _check_number(value, f"{field}[{key!r}]", where, integer=field == "rank_pattern")
    for field in ("use_rslora", "fan_in_fan_out"):
        if not isinstance(config.get(field, False), bool):
            raise CsuloraError(f"{where}: {field} must be true or false, found {config[field]!r}")


def _check_number(value, field: str, where: Path, integer: bool) -> None:
    """Ranks are positive integers; alphas positive finite numbers (JSON allows NaN and Infinity)."""
    number = (int,) if integer else (int, float)
    if not isinstance(value, number) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive finite number"
        raise CsuloraError(f"{where}: {field} must be {kind}, found {value!r}")


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


def _modules(config: dict, tensors: dict[str, torch.Tensor], where: Path) -> list[LoraModule]:
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if m is None:
            raise CsuloraError(f"{where}: {_unsupported(key)}")
        pairs.setdefault(m["module"], {})[m["side"]] = tensor
    if not pairs:
        raise CsuloraError(f"{where}: holds no LoRA tensors (…lora_A.weight / …lora_B.weight)")
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    modules = []
    for name in sorted(pairs):
        if set(pairs[name]) != {"A", "B"}:
            raise CsuloraError(f"{where}: module {name} has lora_{''.join(pairs[name])} but not its pair")
        A, B = pairs[name]["A"], pairs[name]["B"]
        rank = pattern_value(rank_pattern, name, config["r"])
        alpha = pattern_value(alpha_pattern, name, config["lora_alpha"])
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != rank or B.shape[1] != rank:
            raise CsuloraError(
                f"{where}: module {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, but the config "
                f"gives it rank {rank}; the config and weights do not belong together"
            )
        if not A.is_floating_point() or not B.is_floating_point():
            raise CsuloraError(f"{where}: module {name} has non-floating-point LoRA factors")
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise CsuloraError(f"{where}: module {name} has NaN or Inf values; the training diverged, fix it first")
        s = lora_scaling(rank, alpha, bool(config.get("use_rslora", False)))
        modules.append(LoraModule(name=name, A=A, B=B, rank=rank, alpha=alpha, scaling=s))
    return modules


def _unsupported(key: str) -> str:
    if "lora_magnitude_vector" in key:
        return f"holds DoRA magnitude vectors ({key}); DoRA adapters are not supported yet"
    if "lora_embedding_" in key:
        return f"adapts an embedding layer ({key}); embedding LoRA is not supported yet"
    if ".lora_B.bias" in key:
        return f"holds a LoRA bias ({key}); lora_bias adapters are not supported yet"
    return (
        f"holds {key}, which is not a LoRA factor (modules_to_save or trainable tokens?); "
        "csulora cannot sanitize full weights: retrain without them"
    )


def cast_back(x: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Cast a corrected factor (computed in float64) back to the adapter's dtype on the CPU.

    Values that do not fit ``dtype`` (fp16 saturates at 65504) are an error, not a silent Inf or clamp:
    the written adapter must mean what the report says.
    """
    if not bool(torch.isfinite(x).all()):
        raise CsuloraError(f"{what}: the corrected values are not finite; the adapter's values are too large")
    if dtype.is_floating_point:
        largest, limit = float(x.abs().max()) if x.numel() else 0.0, torch.finfo(dtype).max
        if largest > limit:
            raise CsuloraError(
                f"{what}: a corrected value ({largest:.6g}) does not fit {str(dtype).removeprefix('torch.')} "
                f"(max {limit:.6g}); convert the adapter to float32 or bfloat16 and rerun"
            )
    return x.to("cpu", dtype).contiguous()


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
