"""The matrix: real architectures × every kind of adapter × every method, checked with the real clients.

Each architecture is a tiny random model built from transformers' own config class and saved by
transformers (Mixtral and Qwen3-MoE save their experts per expert, in the checkpoint's own names); the
aligned model is the base plus a low-rank displacement with well separated singular values on every
weight (each expert its own). Adapters are made by PEFT. For each pair the method runs in process; the
output must load in PEFT with no missing and no unexpected keys, and ``merge_and_unload`` must give, for
every weight a module adapts, what the dense oracle (tests/oracle.py, written from DESIGN.md) computes from
PEFT's own view of the input adapter and transformers' own view of the checkpoints (experts compared one by
one); every other weight must be what merging the input adapter gives: kept as trained.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from csulora.api import sanitize
from csulora.cache import SubspaceSource
from csulora.settings import Settings
from tests import oracle

K = 2  # subspace rank; the displacement's singular values 3, 2, 1 (× scale) make it well defined
ATTENTION = {"gpt2": "c_attn", "gpt_neox": "query_key_value", "phi3": "qkv_proj"}  # default: q_proj


def _configs() -> dict:
    from transformers import (
        Gemma2Config,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        MixtralConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
        Qwen3MoeConfig,
    )  # fmt: skip

    common = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=64, max_position_embeddings=64)  # fmt: skip
    untied = dict(common, tie_word_embeddings=False)
    return {
        "llama": LlamaConfig(**untied),
        "mistral": MistralConfig(**untied),
        "qwen2": Qwen2Config(**untied),  # q/k/v have biases
        "qwen3": Qwen3Config(**untied, head_dim=8),
        "gemma2": Gemma2Config(**common, head_dim=8),  # tied output head
        "phi3": Phi3Config(**untied, pad_token_id=0),  # fused qkv_proj and gate_up_proj
        "gpt2": GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=64),  # Conv1D, tied head
        "gpt_neox": GPTNeoXConfig(**{k: v for k, v in untied.items() if k != "num_key_value_heads"}),
        "mixtral": MixtralConfig(**untied, num_local_experts=4, num_experts_per_tok=2),
        "qwen3_moe": Qwen3MoeConfig(**untied, head_dim=8, moe_intermediate_size=24, num_experts=4,
                                    num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[]),  # fmt: skip
    }


MOE = ("mixtral", "qwen3_moe")
BIASED = ("gpt2", "gpt_neox")
# rank 6 for layer 1's attention, alpha 3 in layer 0. (A key that also matches experts would meet the key PEFT adds
# for gate_up_proj, and PEFT's sorted config would give those experts another rank than they were trained with.)
PATTERNS = ({r"1\.self_attn\..*": 6}, {r"0\..*": 3})
ARCHS = list(_configs())
# all-linear with rsLoRA, patterns and (where every linear layer has a bias, so that PEFT can merge them) LoRA
# biases; DoRA; an embedding LoRA with the output head in modules_to_save
KINDS = ("lora", "dora", "saved")
METHODS = {  # method → settings; block forms on the MoE models and Llama
    "realign": dict(lam=4.0, beta=0.5),
    "csulora": dict(lam=4.0),
    "safe-lora": dict(threshold=0.2),
    "resta": dict(gamma=0.5),
}


def displace(model, seed: int) -> None:
    """Add to every weight matrix (every expert of a stack) ``Σ σ_i u_i v_iᵀ``, ``σ = 0.3, 0.2, 0.1``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            for W in ([p] if p.ndim == 2 else list(p) if p.ndim == 3 else []):
                U, _ = torch.linalg.qr(torch.randn(W.shape[0], 3, generator=g))
                V, _ = torch.linalg.qr(torch.randn(W.shape[1], 3, generator=g))
                W += U @ torch.diag(torch.tensor([0.3, 0.2, 0.1])) @ V.T


def module_name(model, module) -> str:
    return next(n for n, m in model.named_modules() if m is module).split(".")[-1]


def lora_config(arch: str, kind: str, model):
    from peft import LoraConfig

    if kind == "lora":
        return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=True, init_lora_weights=False,
                          rank_pattern=PATTERNS[0], alpha_pattern=PATTERNS[1], lora_bias=arch in BIASED)  # fmt: skip
    if kind == "dora":
        targets = ["q_proj", "k_proj", "v_proj", "o_proj"] if arch in MOE else "all-linear"
        return LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=True, init_lora_weights=False)
    embedding, head = (module_name(model, m) for m in (model.get_input_embeddings(), model.get_output_embeddings()))
    return LoraConfig(r=4, lora_alpha=8, target_modules=[embedding, ATTENTION.get(arch, "q_proj")],
                      modules_to_save=[head], init_lora_weights=False)  # fmt: skip


@dataclass
class World:
    arch: str
    base: Path
    aligned: Path
    adapters: dict[str, Path]


def load(folder: Path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


@pytest.fixture(scope="module", params=ARCHS)
def world(request, tmp_path_factory) -> World:
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_configs()[arch])
    model.save_pretrained(root / "base")
    displace(model, 1)
    model.save_pretrained(root / "chat")
    adapters = {}
    for i, kind in enumerate(KINDS):
        torch.manual_seed(10 + i)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peft_model = get_peft_model(load(root / "chat"), lora_config(arch, kind, model))
        with torch.no_grad():  # visible updates: factors larger, saved weights and biases trained
            for name, p in peft_model.named_parameters():
                if "lora_B" in name or "modules_to_save" in name:
                    p.add_(0.3 * torch.randn_like(p)) if "modules_to_save" in name else p.mul_(20)
                if name.endswith("lora_B.default.bias"):
                    p.add_(0.1)
        peft_model.save_pretrained(root / kind)
        adapters[kind] = root / kind
    return World(arch, root / "base", root / "chat", adapters)


def peft_layers(peft_model) -> dict[str, tuple]:
    """PEFT's own view of each adapted weight: ``{param: (delta in stored orientation, module, name)}``."""
    from peft.tuners.lora import LoraLayer, ParamWrapper

    layers = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and ("default" in module.lora_A or "default" in module.lora_embedding_A):
            unwrapped = name.replace(".base_layer", "")
            param = f"{unwrapped}.{module.parameter_name}" if isinstance(module, ParamWrapper) else f"{name}.weight"
            layers[param] = (module.get_delta_weight("default").detach().double(), module, unwrapped)
    return layers


def expected_delta(method: str, settings: dict, dW, D, k: int, rank: int | None, form: str, projected: bool):
    """DESIGN.md for one module in nn.Linear orientation: ``rank`` None is a dense (full-weight) module."""
    P, Q = oracle.projectors(D, k)
    if method == "csulora":
        exact = form == "block" or rank is None
        return (oracle.block_delta if exact else oracle.factored_delta)(dW, P, Q, settings["lam"])
    if method in ("realign", "resta"):
        if method == "realign":
            X = oracle.realign_delta(dW, D, k, settings["lam"], settings["beta"])
        else:  # §5d: γ·D on a full weight, γ·D_k on factors
            X = dW + settings["gamma"] * (D.double() if rank is None else oracle.truncated(D, k))
        return X if form == "block" or rank is None else oracle.best_rank(X, rank)
    return oracle.safe_lora_matrix(D) @ dW if projected else dW


def dora_merged(W, dW, magnitude):
    """DoRA's merged weight (peft/tuners/lora/dora.py): ``m ⊙ (W + ΔW) / ‖W + ΔW‖`` per output row."""
    V = W + dW
    return magnitude[:, None] * V / torch.linalg.norm(V, dim=1, keepdim=True)


def check(world: World, kind: str, method: str, form: str, out: Path, values: dict | None = None) -> float:
    """Load the output in PEFT (no missing or unexpected key), merge it, compare every weight; the worst error
    relative to the largest entry of its update. ``values``: the method's settings (default ``METHODS``')."""
    values = METHODS[method] if values is None else values
    from peft import PeftModel

    report = json.loads((out / "csulora_report.json").read_text())
    rows = {m["module"]: m for m in report["modules"]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = PeftModel.from_pretrained(load(world.aligned), out)
    assert not [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    again = model.load_adapter(out, adapter_name="again")
    assert list(again.missing_keys) == [] and list(again.unexpected_keys) == []
    merged = model.merge_and_unload().state_dict()
    source = PeftModel.from_pretrained(load(world.aligned), world.adapters[kind])
    layers = peft_layers(source)
    merged_in = source.merge_and_unload().state_dict()
    W_a, W_b = load(world.aligned).state_dict(), load(world.base).state_dict()
    saved = {k.removeprefix("base_model.model.").replace(".base_layer", ""): t
             for k, t in load_file(world.adapters[kind] / "adapter_model.safetensors").items()}  # fmt: skip
    worst, checked = 0.0, set()
    for param, (delta, module, name) in layers.items():
        experts = delta.shape[0] if delta.ndim == 3 else None
        for e in range(experts or 1):
            d = delta[e] if experts else delta
            a, b = (W_a[param][e], W_b[param][e]) if experts else (W_a[param], W_b[param])
            row = rows[f"{param}[{e}]" if experts else name if name in rows else param.removesuffix(".weight")]
            flip = module.fan_in_fan_out or name in rows and rows[name]["kind"] == "embedding"  # stored (d_in, d_out)
            lin = (lambda t: t.T) if flip else (lambda t: t)  # noqa: E731
            dW, D = lin(d), lin(a.double() - b.double())
            X = expected_delta(method, values, dW, D, row["k"], row["rank"], form, row["safe_lora_projected"])
            got = merged[param][e] if experts else merged[param]
            if module.use_dora.get("default"):
                m = module.lora_magnitude_vector["default"].weight.detach().double()
                want = lin(dora_merged(lin(a.double()), X, m))
            else:
                want = a.double() + lin(X)
            scale = float(dW.abs().max())
            err = float((got.double() - want).abs().max()) / scale
            assert err < 1e-5, (world.arch, kind, method, form, param, e, err)
            worst = max(worst, err)
        checked.add(param)
    for row in (r for r in rows.values() if r["kind"] == "dense"):  # saved full weights (a tied head too)
        param = row["module"].replace(".base_layer", "") + ".weight"
        a, W = W_a[param].double(), saved[param].double()
        dW, D = W - a, a - W_b[param].double()
        X = expected_delta(method, values, dW, D, row["k"], None, form, row["safe_lora_projected"])
        err = float((merged[param].double() - (a + X)).abs().max()) / float(dW.abs().max())
        assert err < 1e-5, (world.arch, kind, method, "dense", param, err)
        worst = max(worst, err)
        checked.add(param)
    for param, W in merged.items():  # everything else: as the input adapter merges it
        if param not in checked:
            torch.testing.assert_close(W, merged_in[param], rtol=0, atol=0, msg=lambda m, p=param: f"{p}: {m}")
    return worst


def forms(arch: str, method: str) -> list[str]:
    return ["factored", "block"] if method != "safe-lora" and arch in ("llama", *MOE) else ["factored"]


@pytest.mark.parametrize("kind", KINDS)
def test_every_method_loads_and_merges_as_the_spec_says(world, kind, tmp_path, record_property):
    """(The worst relative error of each pair is recorded: ``pytest tests/test_matrix.py --junitxml=FILE``.)"""
    worst = 0.0
    for method, values in METHODS.items():
        for form in forms(world.arch, method):
            settings = Settings(method=method, form=form, subspace_rank=K, exact_svd=True, **values)
            out = tmp_path / f"{method}-{form}"
            result = sanitize(world.adapters[kind], str(world.aligned), str(world.base), out, settings=settings,
                              subspaces=SubspaceSource.open(enabled=False))  # fmt: skip
            assert result.report.modules, (world.arch, kind)
            worst = max(worst, check(world, kind, method, form, out))
    record_property("worst_error", worst)
