"""Full fine-tunes and merged models (DESIGN.md §10): ``sanitize --model`` and ``audit --model`` end to end.

The fine-tune is the aligned model with every weight moved (embeddings, norms and head too). Each targeted
weight of the output must be ``W_a + X`` with ``X`` from the dense oracle (tests/oracle.py via
tests/test_matrix.expected_delta), every other tensor must be the input's bit for bit, the shard files,
index, header order and config must be kept, transformers must load the result, and bad input must exit 2
with one line and nothing written.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from csulora.cache import SubspaceSource
from csulora.io.layouts import is_block_weight
from csulora.models import audit_model, sanitize_model
from csulora.settings import Settings
from tests.conftest import assert_one_line_error, folder_bytes, run_cli
from tests.test_matrix import METHODS, expected_delta

NO_CACHE = SubspaceSource.open(enabled=False)


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def full(tmp_path_factory, llama_pair) -> dict[str, Path]:
    """A full fine-tune of the tiny aligned Llama (sharded like it), every tensor moved, and a bf16 copy."""
    from transformers import LlamaForCausalLM

    root = tmp_path_factory.mktemp("full")
    model = LlamaForCausalLM.from_pretrained(llama_pair["aligned"], dtype=torch.float32)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p += 0.02 * torch.randn(p.shape, generator=g)
            p.copy_(p.bfloat16().float())  # exactly representable in bf16: the bf16 copy is the same fine-tune
    model.save_pretrained(root / "ft", max_shard_size="100KB")
    (root / "ft" / "tokenizer_config.json").write_text("{}")
    model.to(torch.bfloat16).save_pretrained(root / "ft-bf16", max_shard_size="100KB")
    return {"model": root / "ft", "bf16": root / "ft-bf16", **llama_pair}


@pytest.mark.parametrize("method", list(METHODS))
def test_model_output_matches_the_dense_oracle_and_copies_the_rest(full, method, tmp_path):
    settings = Settings(method=method, subspace_rank=3, exact_svd=True, **METHODS[method])
    out = tmp_path / "out"
    result = sanitize_model(full["model"], str(full["aligned"]), None, out, settings=settings, subspaces=NO_CACHE)
    rows = {m.module: m for m in result.report.modules}
    src, dst = tensors(full["model"]), tensors(out)
    W_a, W_b = tensors(full["aligned"]), tensors(full["base"])
    assert dst.keys() == src.keys()
    targets = {k for k in src if is_block_weight(k) and src[k].ndim == 2}
    assert {f"{m}.weight" for m in rows} == targets and len(targets) == 14
    for key, W in src.items():
        if key not in targets:
            assert torch.equal(dst[key], W), key  # embeddings, norms, head: bit for bit
            continue
        row = rows[key.removesuffix(".weight")]
        dW, D = W.double() - W_a[key].double(), W_a[key].double() - W_b[key].double()
        X = expected_delta(method, METHODS[method], dW, D, row.k, None, "factored", row.safe_lora_projected)
        want = (W_a[key].double() + X).to(W.dtype)
        assert dst[key].dtype == W.dtype
        err = float((dst[key].double() - want.double()).abs().max()) / float(dW.abs().max())
        assert err < 1e-5, (method, key, err)
    kept = {k.key for k in result.report.kept}
    assert kept == set(src) - targets  # every copied tensor differs from the aligned one here: listed
    assert result.report.totals()["dense_modules"] == 14


def test_shards_index_config_and_small_files_are_kept_and_transformers_loads_it(full, tmp_path):
    from transformers import LlamaForCausalLM

    out = tmp_path / "out"
    proc = run_cli("sanitize", "--model", full["model"], "--aligned", full["aligned"], "-o", out, "-q",
                   in_process=True)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    src_files = sorted(p.name for p in full["model"].iterdir())
    assert sorted(p.name for p in out.iterdir()) == sorted({*src_files, "README.md", "csulora_report.json",
                                                            "csulora_report.md", "csulora_report.html"})  # fmt: skip
    for name in ("config.json", "model.safetensors.index.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (full["model"] / name).read_bytes(), name
    for shard in full["model"].glob("*.safetensors"):
        with safe_open(shard, "pt") as a, safe_open(out / shard.name, "pt") as b:
            assert list(a.keys()) == list(b.keys())
            for k in a.keys():
                assert a.get_slice(k).get_shape() == b.get_slice(k).get_shape()
                assert a.get_slice(k).get_dtype() == b.get_slice(k).get_dtype()
            assert b.metadata()["format"] == "pt" and b.metadata()["csulora_method"] == "realign"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = LlamaForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    card = (out / "README.md").read_text()
    assert "library_name: transformers" in card and "# Sanitized model" in card


def test_bf16_and_fp32_copies_give_the_same_weights_up_to_one_bf16_rounding(full, tmp_path):
    """The math runs in float32 whatever the input dtype, and the result is cast once."""
    settings = Settings(method="realign", subspace_rank=3, exact_svd=True)
    sanitize_model(full["model"], str(full["aligned"]), None, tmp_path / "fp32", settings=settings, subspaces=NO_CACHE)
    sanitize_model(full["bf16"], str(full["aligned"]), None, tmp_path / "bf16", settings=settings, subspaces=NO_CACHE)
    a, b = tensors(tmp_path / "fp32"), tensors(tmp_path / "bf16")
    for key in a:
        assert b[key].dtype == torch.bfloat16
        assert torch.equal(a[key].to(torch.bfloat16), b[key]), key


def test_the_number_of_workers_does_not_change_a_byte(full, peft_adapter, tmp_path):
    """``--jobs``: modules corrected side by side, each on one intra-op thread (parallel.py, determinism.py), give
    the bytes of one worker, for a model and for an adapter (randomized SVD, every module's own seeded draw)."""
    from csulora import sanitize

    settings = Settings(subspace_energy=0.6)
    for jobs in (1, 3):
        sanitize_model(full["model"], str(full["aligned"]), str(full["base"]), tmp_path / f"model-{jobs}",
                       settings=settings, subspaces=NO_CACHE, jobs=jobs)  # fmt: skip
        sanitize(peft_adapter, str(full["aligned"]), str(full["base"]), tmp_path / f"adapter-{jobs}",
                 settings=settings, subspaces=NO_CACHE, jobs=jobs)  # fmt: skip
    for what in ("model", "adapter"):
        one, three = (folder_bytes(tmp_path / f"{what}-{j}") for j in (1, 3))
        weights = [name for name in one if name.endswith(".safetensors")]
        assert weights and all(one[name] == three[name] for name in weights), what
        modules = [json.loads(b["csulora_report.json"])["modules"] for b in (one, three)]
        assert modules[0] == modules[1] and any(0 < m["k"] for m in modules[0]), what


def test_audit_model_gates_without_writing(full, tmp_path):
    result = audit_model(full["model"], str(full["aligned"]), subspaces=NO_CACHE)
    assert result.output is None and len(result.report.modules) == 14
    args = ["audit", "--model", full["model"], "--aligned", full["aligned"], "-q"]
    assert run_cli(*args, in_process=True).returncode == 0
    # embeddings, norms and the head differ but no method corrects them: listed, not failed (docs/models.md)
    kept = run_cli(*args, "--fail-on-kept", "--json", in_process=True)
    assert kept.returncode == 0, kept.stderr
    listed = {k["key"]: k["kind"] for k in json.loads(kept.stdout)["reports"][0]["kept"]}
    assert listed["model.embed_tokens.weight"] == "outside-method"
    only = run_cli(*args, "--target-modules", r"self_attn\.(q|v)_proj", "--json", in_process=True)
    document = json.loads(only.stdout)
    assert len(document["reports"][0]["modules"]) == 4
    # weights left out by --target-modules could have been corrected: --fail-on-kept fails on them
    failed = run_cli(*args, "--target-modules", r"self_attn\.(q|v)_proj", "--fail-on-kept", in_process=True)
    assert failed.returncode == 1 and "self_attn.k_proj.weight (excluded by --target-modules" in failed.stderr
    assert "model.embed_tokens.weight" not in failed.stderr


def test_identical_weights_are_left_alone(full, llama_pair, tmp_path):
    """Layers a fine-tune did not touch equal the aligned weights: no update, written as they are (realign's
    β·D_k would otherwise be added to them)."""
    model = tmp_path / "half"
    shutil.copytree(full["model"], model)
    aligned = tensors(full["aligned"])
    for shard in model.glob("*.safetensors"):
        t = load_file(shard)
        t = {k: aligned[k] if ".layers.1." in k else v for k, v in t.items()}
        save_file(t, shard, metadata={"format": "pt"})
    result = sanitize_model(model, str(full["aligned"]), None, tmp_path / "out", settings=Settings(beta=0.5),
                            subspaces=NO_CACHE)  # fmt: skip
    assert {m.module.split(".")[2] for m in result.report.modules} == {"0"}
    out = tensors(tmp_path / "out")
    assert all(torch.equal(out[k], aligned[k]) for k in out if ".layers.1." in k)


def _adapter_as_model(tmp, full, peft_adapter):
    return ["--model", peft_adapter], "--adapter"


def _file(tmp, full, peft_adapter):
    return ["--model", full["model"] / "config.json"], "not a file"


def _other_shape(tmp, full, peft_adapter):
    model = shutil.copytree(full["model"], tmp / "other")
    shard = next(s for s in model.glob("*.safetensors") if "model.layers.0.self_attn.q_proj.weight" in load_file(s))
    t = load_file(shard)
    t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 32)
    save_file(t, shard, metadata={"format": "pt"})
    return ["--model", model], "not a fine-tune of the aligned model"


def _missing_shard(tmp, full, peft_adapter):
    model = shutil.copytree(full["model"], tmp / "missing")
    next(iter(sorted(model.glob("*.safetensors")))).unlink()
    return ["--model", model], "missing"


def _top_n(tmp, full, peft_adapter):
    return ["--model", full["model"], "--method", "safe-lora", "--top-n", "2"], "--threshold"


def _block(tmp, full, peft_adapter):
    return ["--model", full["model"], "--form", "block"], "--form applies to adapters"


def _no_target(tmp, full, peft_adapter):
    return ["--model", full["model"], "--target-modules", "nothing_like_this"], "matching --target-modules"


def _both(tmp, full, peft_adapter):
    return ["--model", full["model"], "--adapter", peft_adapter], "one of them"


@pytest.mark.parametrize("case", [_adapter_as_model, _file, _other_shape, _missing_shard, _top_n, _block, _no_target,
                                  _both])  # fmt: skip
def test_bad_model_input_exits_2_with_one_line_and_writes_nothing(full, peft_adapter, tmp_path, case):
    args, needle = case(tmp_path, full, peft_adapter)
    before = folder_bytes(full["model"])
    out = tmp_path / "out"
    proc = run_cli("sanitize", *args, "--aligned", full["aligned"], "-o", out, in_process=True)
    assert_one_line_error(proc, needle)
    assert not out.exists() and folder_bytes(full["model"]) == before


def test_expert_stacks_of_a_model_are_corrected_one_expert_at_a_time(tmp_path):
    """A model whose experts are stored as 3-D stacks: every expert is a module, written slice by slice."""
    from tests.test_adapter_kinds import fused_copy, make_pair

    pair = make_pair(tmp_path, "mixtral")
    aligned, base = fused_copy(pair["aligned"], tmp_path / "chat-fused"), fused_copy(pair["base"], tmp_path / "b")
    (aligned / "README.md").write_text(f"---\nbase_model: {base}\n---\n")
    W_a, W_b = load_file(aligned / "model.safetensors"), load_file(base / "model.safetensors")
    g = torch.Generator().manual_seed(3)
    ft = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in W_a.items()}
    ft["model.layers.1.mlp.experts.down_proj"][2] = W_a["model.layers.1.mlp.experts.down_proj"][2]  # untouched
    (tmp_path / "ft").mkdir()
    save_file(ft, tmp_path / "ft" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "ft" / "config.json").write_bytes((aligned / "config.json").read_bytes())
    settings = Settings(method="realign", subspace_rank=2, exact_svd=True, **METHODS["realign"])
    result = sanitize_model(tmp_path / "ft", str(aligned), None, tmp_path / "out", settings=settings,
                            subspaces=NO_CACHE)  # fmt: skip
    rows = {m.module: m for m in result.report.modules}
    out = load_file(tmp_path / "out" / "model.safetensors")
    key = "model.layers.1.mlp.experts.down_proj"
    assert f"{key}[0]" in rows and f"{key}[2]" not in rows  # the untouched expert is no module
    assert torch.equal(out[key][2], ft[key][2])
    for e in (0, 1, 3):
        dW, D = ft[key][e].double() - W_a[key][e].double(), W_a[key][e].double() - W_b[key][e].double()
        X = expected_delta("realign", METHODS["realign"], dW, D, rows[f"{key}[{e}]"].k, None, "factored", False)
        assert float((out[key][e].double() - (W_a[key][e].double() + X)).abs().max()) < 1e-5 * float(dW.abs().max())


def test_sweep_of_a_model_writes_whole_models_and_picks_one(full, tmp_path, monkeypatch):
    """``sweep --model``: each point a sanitized copy of the model, evaluated and picked as adapter points are;
    the disk it needs is said first, and a sweep that would not fit is refused before anything is written."""
    out = tmp_path / "sweep"
    metric = ("python -c \"import json, sys, pathlib; r = json.loads((pathlib.Path(sys.argv[1]) / "
              "'csulora_report.json').read_text()); print(json.dumps({'retained': r['totals']['retained_norm']}))\" "
              "{model}")  # fmt: skip
    args = ["sweep", "--model", full["model"], "--aligned", full["aligned"], "--method", "realign", "--method",
            "resta", "--lambdas", "1,inf", "--gammas", "0.1", "-q"]  # fmt: skip
    proc = run_cli(*args, "-o", out, "--eval-cmd", metric, "--maximize", "retained", in_process=True)
    assert proc.returncode == 0, proc.stderr
    assert "every point is a whole model: 3 points ×" in proc.stderr
    document = json.loads((out / "sweep.json").read_text())
    assert [p["status"] for p in document["points"]] == ["ok"] * 3 and document["picked"]
    for p in document["points"]:
        assert sorted(f.name for f in (out / p["id"]).glob("*.safetensors")) == sorted(
            f.name for f in full["model"].glob("*.safetensors"))
        card = (out / p["id"] / "README.md").read_text()
        assert "csulora sanitize --model" in card and "--form" not in card
    assert (out / "picked" / "model.safetensors.index.json").is_file()
    import csulora.tuning.sweep

    monkeypatch.setattr(csulora.tuning.sweep.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1, 1, 1000))
    refused = run_cli(*args, "-o", tmp_path / "sweep2", in_process=True)
    assert_one_line_error(refused, "needed", "are free")
    assert not (tmp_path / "sweep2" / "sweep.json").exists()
