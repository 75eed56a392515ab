"""Every adapter a user brings (DESIGN.md §6b) beyond the matrix: experts read from either checkpoint layout,
what is kept as trained and the gate on it, the wrapping order of nested parameters, the readable report of
a model with many experts, and the one-line refusals. Facts about the format are checked against the
installed peft."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from csulora.api import audit, sanitize
from csulora.cache import SubspaceSource
from csulora.errors import CsuloraError
from csulora.settings import Settings
from tests.conftest import assert_one_line_error, folder_bytes, run_cli
from tests.test_matrix import _configs, displace, load

NO_CACHE = SubspaceSource.open(enabled=False)


def make_pair(root: Path, arch: str, **overrides) -> dict[str, Path]:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    config = _configs()[arch]
    for k, v in overrides.items():
        setattr(config, k, v)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / "base")
    displace(model, 1)
    model.save_pretrained(root / "chat")
    return {"base": root / "base", "aligned": root / "chat"}


def peft_adapter(folder: Path, aligned: Path, seed: int = 0, **kwargs) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(load(aligned), LoraConfig(init_lora_weights=False, **kwargs))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
            elif p.requires_grad:  # saved modules, trainable tokens: trained
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mixtral")
    pair = make_pair(root, "mixtral")
    pair["adapter"] = peft_adapter(root / "lora", pair["aligned"], r=2, lora_alpha=4, target_modules="all-linear")
    return pair


def fused_copy(src: Path, dst: Path) -> Path:
    """The checkpoint as the model holds it in memory: experts as 3-D stacks (``mlp.experts.gate_up_proj``)."""
    dst.mkdir()
    state = {k: v.contiguous() for k, v in load(src).state_dict().items()}
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_bytes((src / "config.json").read_bytes())
    return dst


def test_experts_read_the_same_from_either_checkpoint_layout(mixtral, tmp_path):
    """transformers saves Mixtral per expert (``block_sparse_moe.experts.<e>.w1/w3/w2``); a checkpoint holding the
    fused stacks (read one expert slice at a time) gives the same sanitized adapter, byte for byte."""
    aligned = fused_copy(mixtral["aligned"], tmp_path / "chat-fused")
    base = fused_copy(mixtral["base"], tmp_path / "base-fused")
    assert "model.layers.0.mlp.experts.gate_up_proj" in load_file(aligned / "model.safetensors")
    settings = Settings(method="realign", subspace_rank=2, exact_svd=True)
    per_expert = sanitize(mixtral["adapter"], str(mixtral["aligned"]), str(mixtral["base"]), tmp_path / "a",
                          settings=settings, subspaces=NO_CACHE)  # fmt: skip
    fused = sanitize(mixtral["adapter"], str(aligned), str(base), tmp_path / "b", settings=settings, subspaces=NO_CACHE)
    a, b = (load_file(p / "adapter_model.safetensors") for p in (tmp_path / "a", tmp_path / "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    experts = [m for m in per_expert.report.modules if m.kind == "expert"]
    assert len(experts) == 2 * 2 * 4  # 2 layers × (gate_up_proj, down_proj) × 4 experts
    assert [m.module for m in experts] == [m.module for m in fused.report.modules if m.kind == "expert"]
    routers = [m for m in per_expert.report.modules if m.kind == "parameter"]
    assert [m.module for m in routers] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]


def test_report_groups_experts_and_keeps_one_json_row_each(mixtral, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("sanitize", "--adapter", mixtral["adapter"], "--aligned", mixtral["aligned"], "--base",
                   mixtral["base"], "-o", out, in_process=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    table = proc.stdout
    assert "layers.0.mlp.experts.gate_up_proj ×4 " in table  # the narrow table: without the common "model."
    assert "gate_up_proj[0]" not in table  # one row per stacked parameter on the screen
    rows = json.loads((out / "csulora_report.json").read_text())["modules"]
    assert sum(r["module"].startswith("model.layers.0.mlp.experts.gate_up_proj[") for r in rows) == 4
    assert {r["kind"] for r in rows} == {"linear", "parameter", "expert"}
    html = (out / "csulora_report.html").read_text()
    assert "<details><summary><code>model.layers.0.mlp.experts.down_proj</code>: 4 experts</summary>" in html
    assert "gate_up_proj[3]" in html  # the folded per-expert table
    markdown = (out / "csulora_report.md").read_text()
    assert "×4 experts" in markdown


class TwoStacks(torch.nn.Module):
    """A module with two expert stacks of equal shape: only PEFT's wrapping order tells their factors apart."""

    def __init__(self, experts: int = 3, dim: int = 8):
        super().__init__()
        self.gate_up_proj = torch.nn.Parameter(torch.randn(experts, dim, dim) / dim)
        self.down_proj = torch.nn.Parameter(torch.randn(experts, dim, dim) / dim)


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = TwoStacks()

    def forward(self, x):
        return x @ self.experts.gate_up_proj[0] @ self.experts.down_proj[0]


def test_nested_wrappers_follow_the_declaration_order(tmp_path):
    """PEFT wraps a module's parameters in the order the module declares them (the first is innermost: its
    factors are saved under ``<module>.base_layer``), whatever the order of ``target_parameters``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    toy = Toy()
    base = {k: v.detach().clone() for k, v in toy.state_dict().items()}
    aligned = {k: v + 0.3 * torch.randn_like(v) for k, v in base.items()}
    for name, state in (("base", base), ("chat", aligned)):
        (tmp_path / name).mkdir()
        save_file(state, tmp_path / name / "model.safetensors")
    toy.load_state_dict(aligned)
    config = LoraConfig(r=2, lora_alpha=2, target_parameters=["down_proj", "gate_up_proj"], init_lora_weights=False)
    peft_model = get_peft_model(toy, config)
    inner = peft_model.base_model.model.experts.base_layer
    assert inner.parameter_name == "gate_up_proj"  # the installed peft: first declared is innermost
    peft_model.save_pretrained(tmp_path / "adapter")
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert "base_model.model.experts.base_layer.lora_A.weight" in saved
    settings = Settings(method="realign", subspace_rank=1, exact_svd=True)
    result = sanitize(tmp_path / "adapter", str(tmp_path / "chat"), str(tmp_path / "base"), tmp_path / "out",
                      settings=settings, subspaces=NO_CACHE)  # fmt: skip
    modules = {m.module: m for m in result.report.modules}
    assert set(modules) == {f"experts.{p}[{e}]" for p in ("gate_up_proj", "down_proj") for e in range(3)}
    # the factors of .base_layer were matched to gate_up_proj: its displacement is the one the row reports
    for e in range(3):
        D = aligned["experts.gate_up_proj"][e] - base["experts.gate_up_proj"][e]
        assert modules[f"experts.gate_up_proj[{e}]"].displacement_norm == pytest.approx(float(D.norm()), rel=1e-5)


def test_kept_tensors_are_listed_written_unchanged_and_gated(tmp_path):
    """Trainable-token rows, a resized head and embedding (tokens added), LoRA biases and DoRA magnitudes are
    written back as trained, listed with their reason; ``audit --fail-on-kept`` fails on them."""
    pair = make_pair(tmp_path, "gpt_neox")
    tokens = peft_adapter(tmp_path / "tokens", pair["aligned"], r=4, lora_alpha=8, target_modules=["query_key_value"],
                          trainable_token_indices=[3, 5], lora_bias=True)  # fmt: skip
    out = tmp_path / "out"
    result = sanitize(tokens, str(pair["aligned"]), str(pair["base"]), out, subspaces=NO_CACHE)
    kinds = {k.kind for k in result.report.kept}
    assert kinds == {"trainable-tokens", "lora-bias"}
    before, after = load_file(tokens / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    for k in result.report.kept:
        assert torch.equal(before[k.key], after[k.key]), k.key
    assert result.report.totals()["kept_not_identical"] == len(result.report.kept) > 0
    assert "Kept as trained" in (out / "csulora_report.md").read_text()
    args = ["audit", "--adapter", tokens, "--aligned", pair["aligned"], "--base", pair["base"], "-q"]
    assert run_cli(*args, in_process=True).returncode == 0
    failed = run_cli(*args, "--fail-on-kept", in_process=True)
    assert failed.returncode == 1 and "kept as trained, not sanitized" in failed.stderr
    assert "trainable_tokens_delta" in failed.stderr


def test_resized_vocabulary_keeps_head_and_embedding_lora_as_trained(tmp_path):
    pair = make_pair(tmp_path, "llama")
    model = load(pair["aligned"])
    model.resize_token_embeddings(70, mean_resizing=False)
    resized = tmp_path / "chat-resized"
    model.save_pretrained(resized)
    adapter = peft_adapter(tmp_path / "added", resized, r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                           modules_to_save=["lm_head"])  # fmt: skip
    result = sanitize(adapter, str(pair["aligned"]), str(pair["base"]), tmp_path / "out", subspaces=NO_CACHE)
    kept = {k.key.removeprefix("base_model.model."): k for k in result.report.kept}
    assert {k.kind for k in kept.values()} == {"resized"}
    assert set(kept) == {"lm_head.weight", "model.embed_tokens.base_layer.weight",
                         "model.embed_tokens.lora_embedding_A", "model.embed_tokens.lora_embedding_B"}  # fmt: skip
    assert "70" in kept["model.embed_tokens.lora_embedding_A"].reason
    assert {m.module for m in result.report.modules} == {f"model.layers.{i}.self_attn.q_proj" for i in range(2)}


def test_dora_magnitudes_are_kept_and_the_report_says_so(tmp_path):
    pair = make_pair(tmp_path, "llama")
    adapter = peft_adapter(tmp_path / "dora", pair["aligned"], r=4, lora_alpha=8, target_modules=["q_proj"],
                           use_dora=True)  # fmt: skip
    result = audit(adapter, str(pair["aligned"]), str(pair["base"]), subspaces=NO_CACHE)
    assert all("DoRA: magnitude kept as trained" in m.notes for m in result.report.modules)
    assert [k.kind for k in result.report.kept] == ["dora-magnitude", "dora-magnitude"]


def test_every_lora_variant_of_the_installed_peft_is_read_or_refused_by_name():
    """The LoraConfig fields peft tags as LoRA variants (and its init variants) are DoRA, which is read, or in
    csulora's table of refusals; the init methods that rewrite base weights are refused."""
    from peft import LoraConfig

    from csulora.io.adapters import INIT_VARIANTS, VARIANTS

    fields = {f.name: f for f in dataclasses.fields(LoraConfig)}
    tagged = {name for name, f in fields.items() if f.metadata.get("is_lora_variant")}
    assert tagged - {"use_dora"} <= set(VARIANTS), tagged - set(VARIANTS)
    assert set(fields["init_lora_weights"].metadata.get("lora_variants", [])) <= set(INIT_VARIANTS)
    assert set(VARIANTS) <= set(fields)  # no stale names


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        ({"use_qalora": True}, "QA-LoRA"),
        ({"layer_replication": [[0, 1]]}, "layer replication"),
        ({"init_lora_weights": "lora_ga"}, "changes the base weights"),
        ({"init_lora_weights": "olora"}, "changes the base weights"),
        ({"peft_type": "VERA"}, "another PEFT tuner"),
    ],
)
def test_unsupported_configs_get_one_line_naming_the_feature(tmp_path, peft_adapter, llama_pair, edit, needle):
    config = json.loads((peft_adapter / "adapter_config.json").read_text())
    (peft_adapter / "adapter_config.json").write_text(json.dumps({**config, **edit}))
    proc = run_cli("sanitize", "--adapter", peft_adapter, "--aligned", llama_pair["aligned"], in_process=True)
    assert_one_line_error(proc, needle, str(peft_adapter / "adapter_config.json"))
    assert not (tmp_path / "adapter-sanitized").exists()


def test_convolution_lora_is_refused_naming_the_key(tmp_path, peft_adapter, llama_pair):
    f = peft_adapter / "adapter_model.safetensors"
    tensors = load_file(f)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[key] = tensors[key][:, :, None, None].contiguous()
    save_file(tensors, f)
    before = folder_bytes(peft_adapter)
    proc = run_cli("sanitize", "--adapter", peft_adapter, "--aligned", llama_pair["aligned"], in_process=True)
    assert_one_line_error(proc, "convolutions", "lora_A.weight")
    assert folder_bytes(peft_adapter) == before


def test_block_form_is_refused_when_an_embedding_lora_is_kept(tmp_path):
    pair = make_pair(tmp_path, "llama")
    model = load(pair["aligned"])
    model.resize_token_embeddings(70, mean_resizing=False)
    model.save_pretrained(tmp_path / "chat-resized")
    adapter = peft_adapter(tmp_path / "added", tmp_path / "chat-resized", r=4, lora_alpha=8,
                           target_modules=["q_proj", "embed_tokens"])  # fmt: skip
    with pytest.raises(CsuloraError, match="use --form factored"):
        sanitize(adapter, str(pair["aligned"]), str(pair["base"]), tmp_path / "out",
                 settings=Settings(form="block"), subspaces=NO_CACHE)  # fmt: skip


def test_block_form_pads_experts_of_different_ranks(mixtral, tmp_path):
    """With the energy rule the experts of one stack get different k, so different ranks r + k in the block
    form: each is zero-padded to the stack's largest, PEFT loads it, and every expert merges to §5b exactly."""
    from tests.test_matrix import World, check

    model = load(mixtral["base"])
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():  # expert e's displacement has e + 1 equal singular values: k = e + 1 at η = 0.95
        for p in (layer.mlp.experts.gate_up_proj for layer in model.model.layers):
            for e in range(p.shape[0]):
                U, _ = torch.linalg.qr(torch.randn(p.shape[1], e + 1, generator=g))
                V, _ = torch.linalg.qr(torch.randn(p.shape[2], e + 1, generator=g))
                p[e] += 0.3 * U @ V.T
    model.save_pretrained(tmp_path / "chat")
    out = tmp_path / "block"
    settings = Settings(method="realign", form="block", lam=4.0, beta=0.5, subspace_energy=0.95, exact_svd=True)
    result = sanitize(mixtral["adapter"], str(tmp_path / "chat"), str(mixtral["base"]), out, settings=settings,
                      subspaces=NO_CACHE)  # fmt: skip
    stack = [m for m in result.report.modules if m.module.startswith("model.layers.0.mlp.experts.gate_up_proj[")]
    assert len({m.k for m in stack}) > 1, "the rule must give the experts different ranks"
    assert {m.output_rank for m in stack} == {max(m.rank + m.k for m in stack)}
    world = World("mixtral", mixtral["base"], tmp_path / "chat", {"lora": mixtral["adapter"]})
    assert check(world, "lora", "realign", "block", out, {"lam": 4.0, "beta": 0.5}) < 1e-5
