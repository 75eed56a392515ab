"""Where a model parameter lives in a checkpoint: the names transformers loads from and saves to.

PEFT names what it adapts by the *model's* parameters (``model.layers.0.mlp.experts.gate_up_proj``, a 3-D
stack of experts). transformers ≥ 5 builds such stacks on load from the per-expert tensors the checkpoint
holds, and saves them back that way (its ``conversion_mapping``): Mixtral keeps
``block_sparse_moe.experts.<e>.w1/w3/w2``, the Qwen-MoE family ``mlp.experts.<e>.gate_proj/up_proj/down_proj``.
This module maps a parameter (or one expert of it) to the checkpoint tensors it is made of. Pure functions
over names: nothing is read here.
"""

from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass


@dataclass(frozen=True)
class Target:
    """A module's weight: a model parameter, or one expert ``expert`` of a 3-D one, in ``nn.Linear`` orientation
    ``(d_out, d_in)`` unless ``transposed`` (stored ``(d_in, d_out)``: GPT-2's Conv1D, embeddings, transposed
    expert stacks)."""

    param: str
    expert: int | None = None
    transposed: bool = False

    @property
    def id(self) -> str:
        return self.param if self.expert is None else f"{self.param}[{self.expert}]"


@dataclass(frozen=True)
class Source:
    """The checkpoint tensors a target is read from: one tensor, one slice ``index`` of a 3-D tensor, or
    several tensors concatenated along dim 0 (gate and up projections fused into ``gate_up_proj``)."""

    keys: tuple[str, ...]
    index: int | None = None


# A stacked expert parameter → the per-expert tensors it is fused from, in concatenation order (transformers'
# conversion_mapping: "mixtral" and "qwen2_moe", which covers Qwen2/3-MoE, OLMoE, DeepSeek-V2/3, GLM-4-MoE …).
FUSED_EXPERTS = {
    "gate_up_proj": (("gate_proj", "up_proj"), ("w1", "w3")),
    "down_proj": (("down_proj",), ("w2",)),
}
# Module renames between the model and its checkpoint (Mixtral's MoE block is ``block_sparse_moe`` on disk).
RENAMES = ((".mlp.", ".block_sparse_moe."),)
# Model types whose expert stacks are stored (E, d_in, d_out) (transformers' ``is_transposed`` experts); others
# are (E, d_out, d_in). Only needed when an expert's weight is square and its shape cannot tell.
TRANSPOSED_EXPERTS = {"gpt_oss", "aria", "aria_text", "openai_privacy_filter"}
# The input embeddings an output head is tied to, where the checkpoint stores no head of its own.
TIED_HEADS = {
    "lm_head.weight": ("model.embed_tokens.weight", "transformer.wte.weight", "model.decoder.embed_tokens.weight",
                       "transformer.word_embeddings.weight"),
}  # fmt: skip


_NOT_BLOCK_WEIGHTS = ("embed", "wte", "wpe", "lm_head", "norm", "ln_")


def is_block_weight(key: str) -> bool:
    """A weight of the transformer blocks (DESIGN.md §10): ``….<layer index>.…``, and not an embedding, an output
    head or a norm."""
    if re.search(r"\.\d+\.", key) is None:
        return False
    module = key.rsplit(".", 2)[-2] if key.endswith((".weight", ".bias")) else key.rsplit(".", 1)[-1]
    return not any(word in module for word in _NOT_BLOCK_WEIGHTS)


def _aliases(name: str) -> list[str]:
    return [name] + [name.replace(a, b) for a, b in RENAMES if a in name]


def resolve(target: Target, keys: Collection[str]) -> Source | None:
    """The checkpoint tensors (among ``keys``) that hold ``target``; ``None`` when there are none."""
    if target.expert is None:
        for name in _aliases(target.param):
            if name in keys:
                return Source((name,))
        return next((Source((k,)) for k in TIED_HEADS.get(target.param, ()) if k in keys), None)
    if target.param in keys:  # stored stacked: one slice
        return Source((target.param,), target.expert)
    parent, _, leaf = target.param.rpartition(".")
    for alias in _aliases(parent):
        for parts in (*FUSED_EXPERTS.get(leaf, ()), (leaf,)):
            names = tuple(f"{alias}.{target.expert}.{p}.weight" for p in parts)
            if all(n in keys for n in names):
                return Source(names)
    return None


def expert_count(param: str, keys: Collection[str]) -> int:
    """How many experts a stacked parameter has in a checkpoint stored per expert (0 if none is found)."""
    e = 0
    while resolve(Target(param, e), keys) is not None:
        e += 1
    return e
