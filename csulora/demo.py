"""``csulora demo``: the whole pipeline on a small Llama-shaped checkpoint pair generated on the spot.

The files are real: sharded safetensors checkpoints with an index and ``config.json``, a model card
naming the base model, and a PEFT LoRA adapter folder. Generation is seeded, so every run is the same.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from rich.console import Console
from safetensors.torch import save_file

from .api import sanitize
from .cache import SubspaceSource
from .report import to_table

HIDDEN, INTERMEDIATE, LAYERS, HEADS, KV_HEADS, VOCAB = 64, 176, 2, 4, 2, 256
HEAD_DIM = HIDDEN // HEADS
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALIGNMENT_RANK, LORA_RANK, LORA_ALPHA = 6, 8, 16


def _linear_shapes() -> dict[str, tuple[int, int]]:
    kv = KV_HEADS * HEAD_DIM
    per_layer = {
        "self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv, HIDDEN), "self_attn.v_proj": (kv, HIDDEN),
        "self_attn.o_proj": (HIDDEN, HIDDEN), "mlp.gate_proj": (INTERMEDIATE, HIDDEN),
        "mlp.up_proj": (INTERMEDIATE, HIDDEN), "mlp.down_proj": (HIDDEN, INTERMEDIATE),
    }  # fmt: skip
    return {f"model.layers.{i}.{name}": shape for i in range(LAYERS) for name, shape in per_layer.items()}


def _config() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": INTERMEDIATE, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB, "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "dtype": "bfloat16", "hidden_act": "silu",
    }  # fmt: skip


def _save_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Two shards and an index, as ``save_pretrained`` writes them."""
    folder.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    halves = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(halves, 1):
        shard = f"model-{i:05d}-of-{len(halves):05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in part}, str(folder / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, shard))
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": size}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (folder / "config.json").write_text(json.dumps(_config(), indent=2, sort_keys=True) + "\n")


def make_demo_files(root: Path, seed: int = 0) -> dict[str, Path]:
    """Base and aligned checkpoints (aligned = base + a low-rank displacement per layer) and an adapter
    trained, as users usually do, on the aligned model: its update mixes directions inside and outside
    each layer's safety subspace."""
    g = torch.Generator().manual_seed(seed)
    shapes = _linear_shapes()
    base = {f"{n}.weight": 0.02 * torch.randn(s, generator=g) for n, s in shapes.items()}
    base["model.embed_tokens.weight"] = 0.02 * torch.randn(VOCAB, HIDDEN, generator=g)
    base["lm_head.weight"] = 0.02 * torch.randn(VOCAB, HIDDEN, generator=g)
    base["model.norm.weight"] = torch.ones(HIDDEN)
    for i in range(LAYERS):
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(HIDDEN)
        base[f"model.layers.{i}.post_attention_layernorm.weight"] = torch.ones(HIDDEN)
    aligned = dict(base)
    lora = {}
    for name, (d_out, d_in) in shapes.items():
        left = torch.linalg.qr(torch.randn(d_out, ALIGNMENT_RANK, generator=g))[0]
        right = torch.linalg.qr(torch.randn(d_in, ALIGNMENT_RANK, generator=g))[0]
        strength = torch.linspace(0.08, 0.02, ALIGNMENT_RANK)
        aligned[f"{name}.weight"] = base[f"{name}.weight"] + (left * strength) @ right.T
        inside = torch.rand(1, generator=g).item()  # how much of this layer's update stays in the subspace
        B = 0.05 * (inside * left[:, :LORA_RANK % ALIGNMENT_RANK + 1].repeat(1, LORA_RANK)[:, :LORA_RANK]
                    + (1 - inside) * torch.randn(d_out, LORA_RANK, generator=g) / d_out**0.5)
        A = (inside * right[:, :LORA_RANK % ALIGNMENT_RANK + 1].repeat(1, LORA_RANK)[:, :LORA_RANK].T
             + (1 - inside) * torch.randn(LORA_RANK, d_in, generator=g) / d_in**0.5)  # fmt: skip
        lora[f"base_model.model.{name}.lora_A.weight"] = A.contiguous()
        lora[f"base_model.model.{name}.lora_B.weight"] = B.contiguous()
    paths = {"base": root / "llama-tiny", "aligned": root / "llama-tiny-chat", "adapter": root / "adapter"}
    _save_sharded(paths["base"], {k: v.bfloat16() for k, v in base.items()})
    _save_sharded(paths["aligned"], {k: v.bfloat16() for k, v in aligned.items()})
    (paths["aligned"] / "README.md").write_text(f"---\nbase_model: {paths['base']}\n---\n# tiny aligned Llama\n")
    paths["adapter"].mkdir(parents=True, exist_ok=True)
    save_file(lora, str(paths["adapter"] / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {
        "base_model_name_or_path": str(paths["aligned"]), "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": LORA_RANK, "lora_alpha": LORA_ALPHA, "lora_dropout": 0.0, "target_modules": sorted(TARGETS),
        "bias": "none", "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
        "rank_pattern": {}, "alpha_pattern": {}, "modules_to_save": None, "init_lora_weights": True,
        "inference_mode": True,
    }  # fmt: skip
    (paths["adapter"] / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return paths


def run_demo(workdir: Path, console: Console) -> None:
    workdir = workdir.resolve()
    console.print(f"generating a tiny Llama-shaped base/aligned pair and a LoRA adapter in {workdir}", markup=False)
    paths = make_demo_files(workdir)
    out = workdir / "adapter-sanitized"
    command = ["csulora", "sanitize", "--adapter", str(paths["adapter"]), "--aligned", str(paths["aligned"]),
               "-o", str(out), "--force"]  # fmt: skip
    console.print("$ " + " ".join(command), markup=False, highlight=False, soft_wrap=True)
    # no subspace cache: the pair is regenerated (new mtimes) each time, so entries would only pile up
    result = sanitize(paths["adapter"], str(paths["aligned"]), output=out, force=True, command=command,
                      subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
    console.print(to_table(result.report, title="csulora demo"))
    console.print(f"base model resolved from: {result.report.inputs['base']['source']} → {paths['base']}", markup=False)
    weights = out / "adapter_model.safetensors"
    console.print(f"sanitized adapter: {weights}", markup=False, highlight=False, soft_wrap=True)
    report = f"{out / 'csulora_report.md'} and {out / 'csulora_report.json'}"
    console.print(f"report: {report}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"picture: {out / 'csulora_report.html'}", markup=False, highlight=False, soft_wrap=True)
