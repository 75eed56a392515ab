"""Synthetic checkpoint pairs and LoRA adapters in the real on-disk formats, for tests and benchmarks
(``scripts/bench_speed.py``): one pair writer, one adapter writer, and a full fine-tune of a written checkpoint.

Shapes are either a whole Llama-shaped model (``Shape``, ``SIZES``: embeddings, norms and output head too),
a whole Mixtral-shaped MoE model (``MoeShape``: the experts stored fused as 3-D stacks, as transformers ≥ 5
holds them, and a router), or a dict ``module name → (d_out, d_in)`` of linear layers only. The aligned
checkpoint is the base plus, per 2-D weight and per expert slice of a stack, a displacement whose spectrum
is one of:

- ``"fine-tune"``: rank ``DISPLACEMENT_RANK`` with ``σ_i ∝ 1/i`` plus a dense part of comparable energy,
  as fine-tuning leaves (base weights ``N(0, 0.02²)``); bf16 rounding adds its own noise on top, as in
  real checkpoints. What the benchmarks and the scale tests use.
- ``"gapped"``: full rank with ``σ_i = 0.1·decay^-i`` (base weights ``N(0, 1)``): clear gaps, so the exact
  subspace is well defined at every rank. What the oracle tests use.

Checkpoints are written one shard at a time (``shard_bytes``), so generating a 7B-shaped pair needs about
one shard of memory; ``shard_bytes=None`` writes a single ``model.safetensors``. The files follow
PEFT_FORMAT.md (keys, config, header metadata); an MoE adapter follows PEFT's ``target_parameters`` layout
(``peft.tuners.lora.ParamWrapper``; checked against the installed peft by tests/test_synthetic_moe.py).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from safetensors.torch import save_file

from .io.tensorfile import TensorReader, read_header, rewrite

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

    # PEFT's ``target_parameters`` of an adapter on every weight: bare parameters, not ``nn.Linear`` layers
    TARGET_PARAMETERS: ClassVar[tuple[str, ...]] = ()

    def _layer(self) -> dict[str, tuple[int, ...]]:
        """One layer's weights: checkpoint name (relative to ``model.layers.{i}.``) → shape, in file order."""
        kv = self.kv_heads * (self.hidden // self.heads)
        h, m = self.hidden, self.intermediate
        shapes = [(h, h), (kv, h), (kv, h), (h, h), (m, h), (m, h), (h, m)]
        return {f"{n}.weight": s for n, s in zip(PER_LAYER, shapes, strict=True)}

    def weights(self) -> dict[str, tuple[int, ...]]:
        """Checkpoint name → shape of every weight of the transformer blocks (2-D, or 3-D expert stacks
        ``(E, d_out, d_in)``), in layer order."""
        return {f"model.layers.{i}.{n}": s for i in range(self.layers) for n, s in self._layer().items()}

    def linear(self) -> dict[str, tuple[int, int]]:
        """``module name → (d_out, d_in)`` of every 2-D weight (linear layers; an MoE's router), in layer order."""
        return {k.removesuffix(".weight"): s for k, s in self.weights().items() if len(s) == 2}

    def stacks(self) -> dict[str, tuple[int, int, int]]:
        """``parameter name → (E, d_out, d_in)`` of every 3-D expert stack, in layer order (none in a dense model)."""
        return {k: s for k, s in self.weights().items() if len(s) == 3}

    def config(self, dtype: str = "bfloat16") -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "dtype": dtype, "hidden_act": "silu",
        }  # fmt: skip


@dataclass(frozen=True)
class MoeShape(Shape):
    """A Mixtral-shaped MoE model as transformers ≥ 5 holds it, and stored so on disk: attention as in ``Shape``,
    a router ``mlp.gate.weight`` ``(E, hidden)`` and the experts fused into 3-D stacks
    ``mlp.experts.gate_up_proj`` ``(E, 2·intermediate, hidden)`` and ``mlp.experts.down_proj``
    ``(E, hidden, intermediate)``; ``intermediate`` is one expert's (Mixtral's ``intermediate_size``)."""

    experts: int
    experts_per_token: int = 2

    # as a user writes them; PEFT wraps a module's parameters in the order the module declares them whatever this
    # order (gate_up_proj, declared first, innermost: its factors are saved under ``mlp.experts.base_layer``)
    TARGET_PARAMETERS: ClassVar[tuple[str, ...]] = ("gate_up_proj", "gate.weight", "down_proj")

    def _layer(self) -> dict[str, tuple[int, ...]]:
        attention = {k: s for k, s in super()._layer().items() if k.startswith("self_attn.")}
        e, h, m = self.experts, self.hidden, self.intermediate
        return {**attention, "mlp.gate.weight": (e, h), "mlp.experts.gate_up_proj": (e, 2 * m, h),
                "mlp.experts.down_proj": (e, h, m)}  # fmt: skip

    def config(self, dtype: str = "bfloat16") -> dict:
        return {**super().config(dtype), "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "num_local_experts": self.experts, "num_experts_per_tok": self.experts_per_token,
                "output_router_logits": False, "router_aux_loss_coef": 0.02}  # fmt: skip


SIZES = {
    "tiny": Shape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=256),
    "1b": Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
    # 8 layers × 16 experts at the 1b width (attention as 1b's): 1.31 B parameters, 2.6 GB in bf16
    "moe": MoeShape(hidden=2048, intermediate=1408, layers=8, heads=32, kv_heads=4, vocab=32000, experts=16),
    "moe-tiny": MoeShape(hidden=64, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=256, experts=4),
}


Shapes = Shape | Mapping[str, tuple[int, int]]
SPECTRA = ("fine-tune", "gapped")


def module_names(n_layers: int, kinds: tuple[str, ...] = ("q_proj", "v_proj")) -> list[str]:
    """``model.layers.{i}.self_attn.{kind}`` for each layer and kind: names for a dict of shapes."""
    return [f"model.layers.{i}.self_attn.{kind}" for i in range(n_layers) for kind in kinds]


def linear_modules(shapes: Shapes) -> dict[str, tuple[int, int]]:
    """``module → (d_out, d_in)``: a ``Shape``'s 2-D weights in layer order, or a dict's in name order."""
    return shapes.linear() if isinstance(shapes, Shape) else dict(sorted(shapes.items()))


def block_weights(shapes: Shapes) -> dict[str, tuple[int, ...]]:
    """Checkpoint name → shape of every weight a pair displaces: a ``Shape``'s (expert stacks too) in layer
    order, or a dict's modules' ``.weight`` in name order."""
    if isinstance(shapes, Shape):
        return shapes.weights()
    return {f"{n}.weight": s for n, s in linear_modules(shapes).items()}


def peft_prefixes(stacks: Mapping[str, tuple[int, int, int]]) -> dict[str, str]:
    """Expert stack parameter → the module path its LoRA factors are saved under. PEFT nests one
    ``ParamWrapper`` per targeted parameter of a module, the first declared innermost, so the i-th of n
    parameters of ``mlp.experts`` is saved under ``mlp.experts`` + ``.base_layer`` × (n − 1 − i)."""
    by_module: dict[str, list[str]] = {}
    for param in stacks:  # in declaration (file) order
        by_module.setdefault(param.rpartition(".")[0], []).append(param)
    return {p: module + ".base_layer" * (len(params) - 1 - i)
            for module, params in by_module.items() for i, p in enumerate(params)}  # fmt: skip


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

    def rounded(w: torch.Tensor, delta: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # the sum in the displacement's precision (float64 for the gapped spectrum), rounded once
        return w.to(dtype), (w if delta is None else w.to(delta.dtype) + delta).to(dtype)

    def both(name: str, w: torch.Tensor, delta: torch.Tensor | None = None) -> None:
        for writer, t in zip(writers.values(), rounded(w, delta), strict=True):
            writer.add(name, t)

    def draw(d_out: int, d_in: int) -> tuple[torch.Tensor, torch.Tensor]:
        if spectrum == "fine-tune":
            return 0.02 * torch.randn(d_out, d_in, generator=g), _fine_tune_displacement(d_out, d_in, 2e-3, g)
        return torch.randn(d_out, d_in, generator=g), _gapped_displacement(d_out, d_in, decay, g)

    if whole:
        both("model.embed_tokens.weight", 0.02 * torch.randn(shapes.vocab, shapes.hidden, generator=g))
    for name, shape in block_weights(shapes).items():
        if whole and name.endswith("q_proj.weight"):
            layer = name.split(".")[2]
            for norm in ("input_layernorm", "post_attention_layernorm"):
                both(f"model.layers.{layer}.{norm}.weight", torch.ones(shapes.hidden))
        if len(shape) == 2:
            both(name, *draw(*shape))
            continue
        stacked = [torch.empty(shape, dtype=dtype) for _ in writers]  # an expert stack, one slice at a time
        for e in range(shape[0]):
            stacked[0][e], stacked[1][e] = rounded(*draw(*shape[1:]))
        for writer, t in zip(writers.values(), stacked, strict=True):
            writer.add(name, t)
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
    base_model: str = "aligned",  # adapters are trained on the aligned model (write_pair's root/aligned)
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

    On an ``MoeShape`` every weight of the blocks is adapted as PEFT adapts it with ``target_modules`` (attention)
    and ``target_parameters`` (``Shape.TARGET_PARAMETERS``): the router ``mlp.gate`` like a linear layer, and
    each expert stack ``(E, d_out, d_in)`` by one ``lora_A`` ``(r·E, d_in)`` and one ``lora_B`` ``(d_out, r·E)``
    (expert e: rows e·r … (e+1)·r of A, columns e, e+E, e+2E … of B) saved under ``peft_prefixes``.

    ``r``: one rank, or one per module (expert stacks: per parameter name);
    ``targets``: module name suffixes (``self_attn.q_proj``, ``mlp.experts.down_proj``), default every module
    of ``shapes``;
    ``config``: fields that replace these defaults in ``adapter_config.json`` (e.g. a per-module ``r`` needs
    the config's ``r`` and ``rank_pattern`` that PEFT reads them from)."""
    g = torch.Generator().manual_seed(seed)
    suffixes = None if targets is None else tuple("." + t for t in targets)
    weights = {k: s for k, s in block_weights(shapes).items()
               if suffixes is None or k.removesuffix(".weight").endswith(suffixes)}  # fmt: skip
    prefixes = peft_prefixes({k: s for k, s in weights.items() if len(s) == 3})
    params = shapes.TARGET_PARAMETERS if isinstance(shapes, Shape) else ()
    wrapped = {p.removesuffix(".weight") for p in params}  # leaf names of what PEFT targets as a parameter
    tensors, leaves = {}, set()
    for key, shape in weights.items():
        name = key.removesuffix(".weight")
        leaves.add(name.split(".")[-1])
        experts, (d_out, d_in) = (1, shape) if len(shape) == 2 else (shape[0], shape[1:])
        rank = (r if isinstance(r, int) else r[name]) * experts
        prefix = f"base_model.model.{prefixes.get(name, name)}"
        a = torch.randn(rank, d_in, generator=g)
        tensors[f"{prefix}.lora_A.weight"] = (a / d_in**0.5 if a_std is None else a * a_std).to(dtype)
        tensors[f"{prefix}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * b_std).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    targeted_parameters = [p for p in params if p.removesuffix(".weight") in leaves]
    fields = {
        "base_model_name_or_path": base_model, "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": r if isinstance(r, int) else max(r.values()), "lora_alpha": alpha, "lora_dropout": 0.0,
        "target_modules": sorted(leaves - wrapped), "bias": "none", "fan_in_fan_out": False,
        **({"target_parameters": targeted_parameters} if targeted_parameters else {}),
        "use_rslora": False, "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None,
        "init_lora_weights": True, "inference_mode": True, **(config or {}),
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    return folder


def write_full_fine_tune(aligned: Path, folder: Path, *, scale: float = 0.01, seed: int = 0) -> Path:
    """A full fine-tune of a written checkpoint: every tensor (embeddings, norms, head and expert stacks too)
    moved by a dense ``N(0, (scale·rms(W))²)`` perturbation in float32 and rounded once to its dtype, into the
    same shard files (same names, header order and dtypes), index and ``config.json``. Streams one tensor at
    a time (an expert stack one slice at a time)."""
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    reader = TensorReader()
    for name in ("model.safetensors.index.json", "config.json"):
        if (aligned / name).is_file():
            (folder / name).write_bytes((aligned / name).read_bytes())

    for shard in sorted(aligned.glob("*.safetensors")):

        def moved(key: str, shard: Path = shard) -> torch.Tensor:
            W = reader.get(shard, key)
            out = torch.empty_like(W)
            for i, w in enumerate(W if W.ndim == 3 else [W]):
                w = w.float()
                noise = torch.randn(w.shape, generator=g) * (scale * float(w.pow(2).mean().sqrt()))
                (out[i] if W.ndim == 3 else out).copy_(w + noise)
            return out

        rewrite(shard, folder / shard.name, moved, read_header(shard).metadata)
    reader.close()
    return folder
