"""Which checkpoint weight each part of an adapter adapts: the modules of the method (DESIGN.md §6b).

``bind`` takes the layers and full tensors that ``adapters.read_adapter`` found and the aligned checkpoint,
and returns the modules: a LoRA module per linear layer, embedding, wrapped 2-D parameter and expert, a
dense module per saved full weight of the aligned shape, and what is kept as trained, with the reason.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ..errors import CsuloraError
from .adapters import (
    CONFIG,
    PREFIX,
    Adapter,
    DenseModule,
    Kept,
    Layer,
    LoraModule,
    peft_wraps,
    rank_and_alpha,
    targeted_module,
)
from .checkpoints import Checkpoint
from .layouts import TRANSPOSED_EXPERTS, Target, expert_count, resolve

# Parameters of one module are wrapped in the order the module declares them (the first is innermost).
# When the factors' shapes fit more than one assignment, this order of the usual expert parameters decides.
DECLARED = ("gate_up_proj", "gate_proj", "up_proj", "w1", "w3", "down_proj", "w2")


@dataclass
class Plan:
    modules: list[LoraModule] = field(default_factory=list)
    dense: list[DenseModule] = field(default_factory=list)
    kept: list[Kept] = field(default_factory=list)


def bind(adapter: Adapter, aligned: Checkpoint) -> Plan:
    """The adapter's modules against ``aligned``: every factor pair and full tensor is placed, or refused by name."""
    plan = Plan(kept=list(adapter.kept))
    wrapped: dict[str, list[Layer]] = {}
    params = adapter.config.get("target_parameters") or []
    for layer in adapter.layers:
        if layer.embedding or (layer.depth == 0 and (not params or targeted_module(adapter.config, layer.module))):
            _check_targeted(adapter, layer)
            plan.modules.append(_module(adapter, layer))
        else:
            wrapped.setdefault(layer.module, []).append(layer)
    for module, layers in sorted(wrapped.items()):
        plan.modules += _wrapped(adapter, aligned, module, layers)
    aligned.require(sorted({k for m in plan.modules for k in aligned.source(m.target).keys}))
    plan.modules = [m for m in plan.modules if _fits(adapter, aligned, plan, m)]
    _full_tensors(adapter, aligned, plan)
    return plan


def _check_targeted(adapter: Adapter, layer: Layer) -> None:
    """Factors of a module that PEFT would not wrap are bad input: PEFT loads the adapter without them, so the
    update csulora would sanitize is not the one that runs."""
    if not peft_wraps(adapter.config, layer.path, layer.embedding):
        targets = adapter.config.get("target_modules")
        raise CsuloraError(f"{adapter.path / CONFIG}: target_modules {targets!r} does not match {layer.path}, whose "
                           "factors the weights hold, so PEFT would load the adapter without them; fix target_modules "
                           "or re-save the adapter")  # fmt: skip


def _module(adapter: Adapter, layer: Layer) -> LoraModule:
    """A linear layer (or GPT-2 Conv1D) or an embedding: one module, named by its path."""
    rank, alpha, scaling = rank_and_alpha(adapter.config, layer.path)
    _check_rank(adapter, layer, rank, 1)
    transposed = layer.embedding or adapter.fan_in_fan_out  # embeddings and Conv1D store (d_in, d_out)
    return LoraModule(
        name=layer.path, A=layer.A, B=layer.B, rank=rank, alpha=alpha, scaling=scaling,
        target=Target(f"{layer.path}.weight", transposed=transposed), layer=layer,
        kind="embedding" if layer.embedding else "linear", dora=layer.path in adapter.dora, pattern_name=layer.path,
    )  # fmt: skip


def _check_rank(adapter: Adapter, layer: Layer, rank: int, experts: int) -> None:
    if layer.A.shape[0] != rank * experts:
        per = f" × {experts} experts" if experts > 1 else ""
        raise CsuloraError(
            f"{adapter.weights_file}: module {layer.path} has lora_A {tuple(layer.A.shape)} and lora_B "
            f"{tuple(layer.B.shape)}, but the config gives it rank {rank}{per}; the config and weights do not "
            "belong together"
        )


@dataclass(frozen=True)
class _Param:
    """A candidate parameter of a wrapped module: its name, its experts (1: a 2-D parameter) and stored shape."""

    name: str
    experts: int
    shape: tuple[int, int]


def _wrapped(adapter: Adapter, aligned: Checkpoint, module: str, layers: list[Layer]) -> list[LoraModule]:
    """The parameters of one module that PEFT wrapped (``target_parameters``): which layer is which parameter
    follows from the factors' shapes; each expert of a stacked parameter is a module of its own."""
    candidates = [c for name in _param_names(adapter.config, module)
                  if (c := _param(aligned, module, name)) is not None]  # fmt: skip
    where = f"{adapter.weights_file}: module {module}"
    if not candidates:  # none stored: the checkpoint's (or the pack's) own words on what it lacks
        aligned.require([f"{module}.{name}" for name in _param_names(adapter.config, module)])
    fits = [
        order for order in itertools.permutations(candidates, len(layers))
        if all(_layer_fits(adapter, layer, module, p) for layer, p in zip(layers, order, strict=True))
    ]  # fmt: skip
    if len(fits) > 1:  # equal shapes: the wrapping order (the deepest layer is the first declared parameter)
        by_depth = sorted(layers, key=lambda layer: -layer.depth)
        declared = [o for o in fits if _declared_order([dict(zip(layers, o, strict=True))[x].name for x in by_depth])]
        fits = declared if len(declared) == 1 else fits
    if not fits:
        names = ", ".join(c.name for c in candidates) or "none"
        raise CsuloraError(f"{where} wraps parameters (target_parameters) whose shapes do not fit its factors "
                           f"(parameters found in the aligned checkpoint: {names}); is this the model the adapter was "
                           "trained on?")  # fmt: skip
    if len(fits) > 1:
        raise CsuloraError(f"{where} wraps {len(layers)} parameters of equal shapes and csulora cannot tell which "
                           "factors belong to which; sanitize an adapter that targets one of them")  # fmt: skip
    modules = []
    for layer, p in zip(layers, fits[0], strict=True):
        modules += _parameter_modules(adapter, aligned, module, layer, p)
    return modules


def _param_names(config: dict, module: str) -> list[str]:
    """The ``target_parameters`` entries that may name a parameter of ``module`` (PEFT: ``<module>.<param>``
    equals the entry or ends with ``.`` + it)."""
    names = []
    for entry in config.get("target_parameters") or []:
        prefix, _, param = entry.rpartition(".")
        if not prefix or module == prefix or module.endswith("." + prefix):
            names.append(param)
    return sorted(set(names))


def _param(aligned: Checkpoint, module: str, name: str) -> _Param | None:
    """The parameter ``<module>.<name>`` as the aligned checkpoint holds it: a 2-D tensor, a 3-D stack of experts,
    or per-expert tensors; ``None`` when it holds none of these."""
    key = f"{module}.{name}"
    source = resolve(Target(key), aligned.weight_map)
    if source is not None:
        aligned.require(source.keys)
        shape = aligned.shape(source)
        if len(shape) == 2:
            return _Param(name, 1, shape)
        if len(shape) == 3:
            return _Param(name, shape[0], tuple(shape[1:]))
        return None
    experts = expert_count(key, aligned.weight_map)
    if not experts:
        if f"{key}_blocks" in aligned.weight_map:
            raise CsuloraError(f"{aligned.ref}: holds {key} quantized ({key}_blocks, MXFP4); csulora reads "
                               "floating-point weights: pass a dequantized checkpoint")  # fmt: skip
        return None
    first = resolve(Target(key, 0), aligned.weight_map)
    aligned.require(first.keys)
    return _Param(name, experts, aligned.shape(first))


def _layer_fits(adapter: Adapter, layer: Layer, module: str, p: _Param) -> bool:
    rank, _, _ = rank_and_alpha(adapter.config, f"{module}.{p.name}")
    d_in, d_out = layer.A.shape[1], layer.B.shape[0]
    return layer.A.shape[0] == rank * p.experts and p.shape in ((d_out, d_in), (d_in, d_out))


def _declared_order(names: list[str]) -> bool:
    """Whether ``names`` (innermost first) follow the declaration order of the usual expert parameters."""
    ranks = [DECLARED.index(n) if n in DECLARED else len(DECLARED) for n in names]
    return ranks == sorted(ranks) and len(set(ranks)) == len(ranks)


def _parameter_modules(adapter: Adapter, aligned: Checkpoint, module: str, layer: Layer, p: _Param) -> list[LoraModule]:
    key = f"{module}.{p.name}"
    rank, alpha, scaling = rank_and_alpha(adapter.config, key)
    d_in, d_out = layer.A.shape[1], layer.B.shape[0]
    if p.experts == 1:  # a 2-D parameter: the delta of a linear layer
        name = module if p.name == "weight" else key
        return [LoraModule(name=name, A=layer.A, B=layer.B, rank=rank, alpha=alpha, scaling=scaling,
                           target=Target(key, transposed=p.shape != (d_out, d_in)), layer=layer, kind="parameter",
                           pattern_name=key)]  # fmt: skip
    # stacked experts: PEFT's ParamWrapper reads A as (E, r, in) and B as (out, r, E), so expert e owns
    # rows e·r … (e+1)·r of A and columns e, e + E, e + 2E … of B
    square = p.shape == (d_out, d_in) == (d_in, d_out)
    transposed = aligned_model_type(aligned) in TRANSPOSED_EXPERTS if square else p.shape != (d_out, d_in)
    E = p.experts
    return [
        LoraModule(name=f"{key}[{e}]", A=layer.A[e * rank : (e + 1) * rank], B=layer.B[:, e::E], rank=rank,
                   alpha=alpha, scaling=scaling, target=Target(key, e, transposed), layer=layer, kind="expert",
                   pattern_name=key)  # fmt: skip
        for e in range(E)
    ]


def aligned_model_type(aligned: Checkpoint) -> str | None:
    return aligned.config().get("model_type")


def _fits(adapter: Adapter, aligned: Checkpoint, plan: Plan, m: LoraModule) -> bool:
    """Whether the aligned weight has the shape the factors imply; an embedding resized for added tokens is kept
    as trained (its factors span rows the aligned model lacks); any other mismatch is another architecture."""
    stored = aligned.shape(aligned.source(m.target))
    expected = (m.A.shape[1], m.B.shape[0]) if m.target.transposed else (m.B.shape[0], m.A.shape[1])
    if tuple(stored) == expected:
        return True
    if m.kind == "embedding" and len(stored) == 2 and stored[1] == expected[1]:
        reason = (f"embedding LoRA over {expected[0]} tokens, but the aligned embedding has {stored[0]} (tokens "
                  "were added): kept as trained")  # fmt: skip
        plan.kept += [Kept(m.key(side), list(adapter.tensors[m.key(side)].shape), "resized", reason) for side in "AB"]
        return False
    raise CsuloraError(
        f"{adapter.weights_file}: module {m.name} has factors for a weight of {list(expected)}, but {aligned.ref} has "
        f"{list(stored)}; the adapter was trained on another architecture"
    )


def _full_tensors(adapter: Adapter, aligned: Checkpoint, plan: Plan) -> None:
    """Saved full tensors: a 2-D float weight of the aligned shape is a dense module; anything else is kept."""
    params = {key: key[len(PREFIX) :].replace(".base_layer", "") for key in adapter.full}  # PEFT saves an adapted
    sources = {key: resolve(Target(param), aligned.weight_map) for key, param in params.items()}  # embedding's base
    aligned.require(sorted({k for s in sources.values() if s is not None for k in s.keys}))
    for key, W in sorted(adapter.full.items()):
        param, source = params[key], sources[key]
        if source is None:
            plan.kept.append(Kept(key, list(W.shape), "not-in-aligned",
                                  f"the aligned checkpoint has no {param}: kept as trained"))  # fmt: skip
            continue
        shape = aligned.shape(source)
        if W.ndim == 2 and W.is_floating_point() and tuple(W.shape) == tuple(shape):
            name = key[len(PREFIX) :].removesuffix(".weight")  # a saved base layer keeps its own name
            plan.dense.append(DenseModule(name=name, key=key, W=W, target=Target(param)))
        elif tuple(W.shape) != tuple(shape):
            plan.kept.append(Kept(key, list(W.shape), "resized", f"shape {list(W.shape)} differs from the aligned "
                                  f"{list(shape)} (tokens added?): kept as trained"))  # fmt: skip
        else:
            same = torch.equal(W, aligned.read(source))
            plan.kept.append(Kept(key, list(W.shape), "vector", f"a {W.ndim}-D saved tensor: kept as trained",
                                  identical=same))  # fmt: skip
