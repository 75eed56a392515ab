"""Synthetic checkpoint pairs and LoRA adapters in the real on-disk formats, for tests and benchmarks
(``scripts/bench_speed.py``): one pair writer and one adapter writer.

Shapes are either a whole Llama-shaped model (``Shape``, ``SIZES``: embeddings, norms and output head too)
or a dict ``module name → (d_out, d_in)`` of linear layers only. The aligned checkpoint is the base plus,
per linear layer, a displacement whose spectrum is one of:

- ``"fine-tune"``: rank ``DISPLACEMENT_RANK`` with ``σ_i ∝ 1/i`` plus a dense part of comparable energy,
  as fine-tuning leaves (base weights ``N(0, 0.02²)``); bf16 rounding adds its own noise on top, as in
  real checkpoints. What the benchmarks and the scale tests use.
- ``"gapped"``: full rank with ``σ_i = 0.1·decay^-i`` (base weights ``N(0, 1)``): clear gaps, so the exact
  subspace is well defined at every rank. What the oracle tests use.

Checkpoints are written one shard at a time (``shard_bytes``), so generating a 7B-shaped pair needs about
one shard of memory; ``shard_bytes=None`` writes a single ``model.safetensors``. The files follow
PEFT_FORMAT.md (keys, config, header metadata).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

PER_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
             "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
DISPLACEMENT_RANK = 64


@dataclass(frozen=True)
class Shape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int

    def linear(self) -> dict[str, tuple[int, int]]:
        """``module name → (d_out, d_in)`` of every linear layer, in layer order."""
        kv = self.kv_heads * (self.hidden // self.heads)
        h, m = self.hidden, self.intermediate
        per = dict(zip(PER_LAYER, [(h, h), (kv, h), (kv, h), (h, h), (m, h), (m, h), (h, m)], strict=True))
        return {f"model.layers.{i}.{n}": s for i in range(self.layers) for n, s in per.items()}

    def config(self, dtype: str = "bfloat16") -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "dtype": dtype, "hidden_act": "silu",
        }  # fmt: skip


SIZES = {
    "tiny": Shape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=256),
    "1b": Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
}


Shapes = Shape | Mapping[str, tuple[int, int]]
SPECTRA = ("fine-tune", "gapped")


def module_names(n_layers: int, kinds: tuple[str, ...] = ("q_proj", "v_proj")) -> list[str]:
    """``model.layers.{i}.self_attn.{kind}`` for each layer and kind: names for a dict of shapes."""
    return [f"model.layers.{i}.self_attn.{kind}" for i in range(n_layers) for kind in kinds]


def linear_modules(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """``module → (d_out, d_in)``: a ``Shape``'s linear layers in layer order, or a dict's in name order."""
    return shapes.linear() if isinstance(shapes, Shape) else dict(sorted(shapes.items()))


class _ShardWriter:
    """Accumulates tensors and writes ``model-0000i-of-0000N.safetensors`` files of about ``shard_bytes``,
    or one ``model.safetensors`` when ``shard_bytes`` is None."""

    def __init__(self, folder: Path, shard_bytes: int | None):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[tuple[str, list[str]]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        if self.shard_bytes is not None and self._pending_bytes() >= self.shard_bytes:
            self.flush()

    def _pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.pending.values())

    def flush(self) -> None:
        if self.pending:
            tmp = f"part-{len(self.files) + 1}.safetensors"
            save_file(self.pending, str(self.folder / tmp), metadata={"format": "pt"})
            self.files.append((tmp, sorted(self.pending)))
            self.pending = {}

    def finish(self, config: dict) -> None:
        """Rename the parts to their final names, write the index (when sharded) and ``config.json``."""
        self.flush()
        if self.shard_bytes is None:
            (self.folder / self.files[0][0]).rename(self.folder / "model.safetensors")
        else:
            weight_map, total = {}, 0
            for i, (tmp, names) in enumerate(self.files, 1):
                shard = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
                (self.folder / tmp).rename(self.folder / shard)
                total += (self.folder / shard).stat().st_size
                weight_map.update(dict.fromkeys(names, shard))
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            text = json.dumps(index, indent=2, sort_keys=True) + "\n"
            (self.folder / "model.safetensors.index.json").write_text(text)
        (self.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _fine_tune_displacement(d_out: int, d_in: int, scale: float, g: torch.Generator) -> torch.Tensor:
    left = torch.randn(d_out, DISPLACEMENT_RANK, generator=g) / d_out**0.5
    right = torch.randn(DISPLACEMENT_RANK, d_in, generator=g) / d_in**0.5
    sigma = scale * (d_out * d_in) ** 0.25 / torch.arange(1, DISPLACEMENT_RANK + 1)
    dense = torch.randn(d_out, d_in, generator=g) * (scale * 0.6 / (d_out * d_in) ** 0.25)
    return dense.add_((left * sigma) @ right)


def _gapped_displacement(d_out: int, d_in: int, decay: float, g: torch.Generator) -> torch.Tensor:
    """Float64 ``U diag(0.1·decay^-i) Vᵀ`` with random orthonormal ``U``, ``V``, at full rank."""
    m = min(d_out, d_in)
    U, _ = torch.linalg.qr(torch.randn(d_out, m, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d_in, m, generator=g, dtype=torch.float64))
    return (U * (0.1 * decay ** -torch.arange(m, dtype=torch.float64))) @ V.T


def write_pair(
    root: Path,
    shapes: Shapes,
    *,
    spectrum: str = "gapped",
    dtype: torch.dtype = torch.float32,
    shard_bytes: int | None = None,
    decay: float = 1.5,
    seed: int = 0,
) -> dict[str, Path]:
    """``root/base`` and ``root/aligned`` (weights, ``config.json``, the index when sharded); the aligned
    model card names the base. ``decay`` applies to the gapped spectrum."""
    if spectrum not in SPECTRA:
        raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
    g = torch.Generator().manual_seed(seed)
    whole = isinstance(shapes, Shape)
    paths = {"base": root / "base", "aligned": root / "aligned"}
    writers = {k: _ShardWriter(p, shard_bytes) for k, p in paths.items()}

    def both(name: str, w: torch.Tensor, delta: torch.Tensor | None = None) -> None:
        writers["base"].add(name, w.to(dtype))
        # the sum in the displacement's precision (float64 for the gapped spectrum), rounded once
        writers["aligned"].add(name, (w if delta is None else w.to(delta.dtype) + delta).to(dtype))

    if whole:
        both("model.embed_tokens.weight", 0.02 * torch.randn(shapes.vocab, shapes.hidden, generator=g))
    for name, (d_out, d_in) in linear_modules(shapes).items():
        if whole and name.endswith("q_proj"):
            layer = name.split(".")[2]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                both(f"model.layers.{layer}.{norm}.weight", torch.ones(shapes.hidden))
        if spectrum == "fine-tune":
            w = 0.02 * torch.randn(d_out, d_in, generator=g)
            delta = _fine_tune_displacement(d_out, d_in, 2e-3, g)
        else:
            w = torch.randn(d_out, d_in, generator=g)
            delta = _gapped_displacement(d_out, d_in, decay, g)
        both(f"{name}.weight", w, delta)
    if whole:
        both("model.norm.weight", torch.ones(shapes.hidden))
        both("lm_head.weight", 0.02 * torch.randn(shapes.vocab, shapes.hidden, generator=g))
    for w in writers.values():
        w.finish(shapes.config(str(dtype).removeprefix("torch.")) if whole else {"model_type": "llama"})
    (paths["aligned"] / "README.md").write_text(f"---\nbase_model: {paths['base']}\n---\n# synthetic aligned\n")
    return paths


def write_adapter(
    folder: Path,
    shapes: Shapes,
    base_model: str = "base",
    *,
    r: int | Mapping[str, int] = 4,
    alpha: float = 8,
    targets: tuple[str, ...] | None = None,
    dtype: torch.dtype = torch.float32,
    a_std: float | None = 1.0,
    b_std: float = 1.0,
    seed: int = 0,
    config: Mapping | None = None,
) -> Path:
    """A PEFT LoRA adapter folder: ``lora_A`` ``(r, d_in)`` with entries ``N(0, a_std²)`` (``a_std=None``:
    ``N(0, 1/d_in)``, a trained adapter's scale), ``lora_B`` ``(d_out, r)`` with ``N(0, b_std²)``.

    ``r``: one rank, or one per module;
    ``targets``: module name suffixes (``self_attn.q_proj``), default every module of ``shapes``;
    ``config``: fields that replace these defaults in ``adapter_config.json`` (e.g. a per-module ``r`` needs
    the config's ``r`` and ``rank_pattern`` that PEFT reads them from)."""
    g = torch.Generator().manual_seed(seed)
    suffixes = None if targets is None else tuple("." + t for t in targets)
    modules = {n: s for n, s in linear_modules(shapes).items() if suffixes is None or n.endswith(suffixes)}
    tensors = {}
    for name, (d_out, d_in) in modules.items():
        rank = r if isinstance(r, int) else r[name]
        a = torch.randn(rank, d_in, generator=g)
        tensors[f"base_model.model.{name}.lora_A.weight"] = (a / d_in**0.5 if a_std is None else a * a_std).to(dtype)
        tensors[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * b_std).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    fields = {
        "base_model_name_or_path": base_model, "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": r if isinstance(r, int) else max(r.values()), "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted({n.split(".")[-1] for n in modules}), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, **(config or {}),
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    return folder
