"""Llama-shaped synthetic checkpoint pairs and LoRA adapters, in the real on-disk formats, for tests and
benchmarks (``scripts/bench_speed.py``): any width and depth, bf16, sharded, written shard by shard so
that generating a 7B-shaped pair needs about one shard of memory.

The aligned checkpoint is the base plus, per linear layer, a displacement with a decaying spectrum
(rank ``DISPLACEMENT_RANK``, ``σ_i ∝ 1/i``) and a dense part of comparable energy, as fine-tuning
leaves; bf16 rounding adds its own noise on top, as in real checkpoints.
"""

from __future__ import annotations

import json
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

    def config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": self.hidden,
            "intermediate_size": self.intermediate, "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads, "vocab_size": self.vocab,
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "dtype": "bfloat16", "hidden_act": "silu",
        }  # fmt: skip


SIZES = {
    "tiny": Shape(hidden=64, intermediate=176, layers=2, heads=4, kv_heads=2, vocab=256),
    "1b": Shape(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000),
    "7b": Shape(hidden=4096, intermediate=11008, layers=32, heads=32, kv_heads=32, vocab=32000),
}


class _ShardWriter:
    """Accumulates tensors and writes ``model-0000i-of-0000N.safetensors`` files of about ``shard_bytes``."""

    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.files: list[tuple[str, list[str]]] = []
        folder.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        if sum(t.numel() * t.element_size() for t in self.pending.values()) >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            tmp = f"part-{len(self.files) + 1}.safetensors"
            save_file(self.pending, str(self.folder / tmp), metadata={"format": "pt"})
            self.files.append((tmp, sorted(self.pending)))
            self.pending = {}

    def finish(self, config: dict) -> None:
        """Rename the parts to the ``-of-N`` names and write the index and ``config.json``."""
        self.flush()
        weight_map, total = {}, 0
        for i, (tmp, names) in enumerate(self.files, 1):
            shard = f"model-{i:05d}-of-{len(self.files):05d}.safetensors"
            (self.folder / tmp).rename(self.folder / shard)
            total += (self.folder / shard).stat().st_size
            weight_map.update(dict.fromkeys(names, shard))
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (self.folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _displacement(d_out: int, d_in: int, scale: float, g: torch.Generator) -> torch.Tensor:
    left = torch.randn(d_out, DISPLACEMENT_RANK, generator=g) / d_out**0.5
    right = torch.randn(DISPLACEMENT_RANK, d_in, generator=g) / d_in**0.5
    sigma = scale * (d_out * d_in) ** 0.25 / torch.arange(1, DISPLACEMENT_RANK + 1)
    dense = torch.randn(d_out, d_in, generator=g) * (scale * 0.6 / (d_out * d_in) ** 0.25)
    return dense.add_((left * sigma) @ right)


def write_pair(root: Path, shape: Shape, *, shard_bytes: int = 1 << 30, seed: int = 0) -> dict[str, Path]:
    """``root/base`` and ``root/aligned`` (sharded bf16, index, config; the aligned card names the base)."""
    g = torch.Generator().manual_seed(seed)
    paths = {"base": root / "base", "aligned": root / "aligned"}
    writers = {k: _ShardWriter(p, shard_bytes) for k, p in paths.items()}

    def both(name: str, w: torch.Tensor, delta: torch.Tensor | None = None) -> None:
        writers["base"].add(name, w.bfloat16())
        writers["aligned"].add(name, (w if delta is None else w + delta).bfloat16())

    both("model.embed_tokens.weight", 0.02 * torch.randn(shape.vocab, shape.hidden, generator=g))
    for name, (d_out, d_in) in shape.linear().items():
        layer = name.split(".")[2]
        if name.endswith("q_proj"):
            for norm in ("input_layernorm", "post_attention_layernorm"):
                both(f"model.layers.{layer}.{norm}.weight", torch.ones(shape.hidden))
        both(f"{name}.weight", 0.02 * torch.randn(d_out, d_in, generator=g), _displacement(d_out, d_in, 2e-3, g))
    both("model.norm.weight", torch.ones(shape.hidden))
    both("lm_head.weight", 0.02 * torch.randn(shape.vocab, shape.hidden, generator=g))
    for w in writers.values():
        w.finish(shape.config())
    (paths["aligned"] / "README.md").write_text(f"---\nbase_model: {paths['base']}\n---\n# synthetic aligned\n")
    return paths


def write_adapter(
    folder: Path, shape: Shape, base_model: str, *, r: int = 16, alpha: int = 32, seed: int = 0,
    targets: tuple[str, ...] = PER_LAYER,
) -> Path:  # fmt: skip
    """A PEFT LoRA adapter folder (float32 factors, PEFT's key names and config fields) on every target."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (d_out, d_in) in shape.linear().items():
        if name.split(".", 3)[3] in targets:
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, d_in, generator=g) / d_in**0.5
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(d_out, r, generator=g) * 0.01
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "base_model_name_or_path": base_model, "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r,
        "lora_alpha": alpha, "lora_dropout": 0.0, "target_modules": sorted({t.split(".")[-1] for t in targets}),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "rank_pattern": {},
        "alpha_pattern": {}, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return folder
