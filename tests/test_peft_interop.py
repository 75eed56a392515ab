"""Round trip with the real client: adapters made by PEFT, sanitized by the real ``csulora`` command, loaded
back by PEFT, and their merged deltas checked module by module against DESIGN.md §4 (tests/oracle.py)."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from csulora.api import Settings
from csulora.cli import app
from tests import oracle
from tests.conftest import OUTPUT_FILES, load_llama, make_peft_adapter, run_cli

PATTERNS = {  # rsLoRA, per-module rank and alpha, and a regex-string target_modules
    "use_rslora": True,
    "r": 4,
    "lora_alpha": 8,
    "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
    "alpha_pattern": {"v_proj": 3, "up_proj": 20},
    "target_modules": r".*\.(q_proj|k_proj|v_proj|up_proj|down_proj)",
}

DEFAULTS = Settings(method="csulora").resolved()  # the paper's method with its defaults


@pytest.fixture(scope="session")
def sanitized(llama_pair, tmp_path_factory) -> dict[str, dict]:
    """Two PEFT adapters sanitized by the command: the plain one in a real subprocess with the default output
    location, the pattern one in process with -o and λ = 2.5. Built once for the session."""
    root = tmp_path_factory.mktemp("interop")
    runs = {}
    plain = make_peft_adapter(root / "plain", llama_pair["aligned"], seed=1)
    patterns = make_peft_adapter(root / "patterns", llama_pair["aligned"], seed=2, **PATTERNS)
    args = ["sanitize", "--aligned", str(llama_pair["aligned"]), "--exact-svd", "--method", "csulora"]
    proc = run_cli(*args, "--adapter", str(plain))
    assert proc.returncode == 0, proc.stderr
    runs["plain"] = {"adapter": plain, "out": root / "plain-sanitized", "lam": DEFAULTS.lam, "stdout": proc.stdout}
    result = CliRunner().invoke(app, [*args, "--adapter", str(patterns), "-o", str(root / "out"), "--lambda", "2.5"])
    assert result.exit_code == 0, result.output
    runs["patterns"] = {"adapter": patterns, "out": root / "out", "lam": 2.5, "stdout": result.stdout}
    for run in runs.values():
        assert f"wrote {run['out']}" in run["stdout"]
    return runs


def lora_layers(peft_model) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """PEFT's own view of each adapted module: (A, B, scaling) of the default adapter."""
    from peft.tuners.lora import LoraLayer

    layers = {}
    for name, module in peft_model.base_model.model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            A = module.lora_A["default"].weight.detach().double()
            B = module.lora_B["default"].weight.detach().double()
            layers[name] = (A, B, float(module.scaling["default"]))
    return layers


def load_peft(model, folder: Path, **kwargs):
    """``PeftModel.from_pretrained`` that fails on PEFT's "missing adapter keys" warning."""
    from peft import PeftModel

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(model, folder, **kwargs)
    missing = [str(w.message) for w in caught if "missing" in str(w.message).lower()]
    assert not missing, missing
    return peft_model


def check_merged_deltas(aligned: Path, base: Path, adapter: Path, out: Path, lam: float, k_of: dict[str, int],
                        load=load_llama, transpose: bool = False, atol: float = 1e-6) -> int:  # fmt: skip
    """``merge_and_unload()`` weights minus aligned weights equal ``oracle.factored_delta`` per module."""
    inputs = lora_layers(load_peft(load(aligned), adapter))
    merged = load_peft(load(aligned), out).merge_and_unload().state_dict()
    w_aligned, w_base = load(aligned).state_dict(), load(base).state_dict()
    assert set(k_of) == set(inputs)
    for name, (A, B, s) in inputs.items():
        key = f"{name}.weight"
        flip = (lambda t: t.T) if transpose else (lambda t: t)  # Conv1D stores (in, out)
        D = flip(w_aligned[key].double() - w_base[key].double())
        dW = s * B @ A
        expected = oracle.factored_delta(dW, *oracle.projectors(D, k_of[name]), lam)
        got = flip(merged[key].double() - w_aligned[key].double())
        tol = atol * float(dW.abs().max())
        torch.testing.assert_close(got, expected, rtol=0, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
        if lam > 0:  # the check can tell a corrected update from an untouched one
            assert float((expected - dW).abs().max()) > 10 * tol, name
    return len(inputs)


def report_of(out: Path) -> dict:
    return json.loads((out / "csulora_report.json").read_text())


@pytest.mark.parametrize("variant", ["plain", "patterns"])
def test_merged_deltas_match_the_closed_form(sanitized, llama_pair, variant):
    run = sanitized[variant]
    report = report_of(run["out"])
    assert report["settings"]["lambda"] == run["lam"] and report["settings"]["exact_svd"] is True
    assert report["inputs"]["base"]["source"] == "aligned model card"
    assert Path(report["inputs"]["base"]["ref"]) == llama_pair["base"]
    k_of = {m["module"]: m["k"] for m in report["modules"]}
    assert all(k >= 1 for k in k_of.values())
    n = check_merged_deltas(llama_pair["aligned"], llama_pair["base"], run["adapter"], run["out"], run["lam"], k_of)
    assert n == (14 if variant == "plain" else 10)


def test_patterns_reach_peft_and_the_report_alike(sanitized, llama_pair):
    """rank_pattern, alpha_pattern and rsLoRA: our per-module rank and scaling equal PEFT's own."""
    from peft import PeftModel

    run = sanitized["patterns"]
    layers = lora_layers(PeftModel.from_pretrained(load_llama(llama_pair["aligned"]), run["out"]))
    rows = {m["module"]: m for m in report_of(run["out"])["modules"]}
    assert set(rows) == set(layers)
    for name, (A, _, s) in layers.items():
        assert rows[name]["rank"] == A.shape[0]
        assert rows[name]["scaling"] == pytest.approx(s, rel=1e-12)
    q0, down1 = rows["model.layers.0.self_attn.q_proj"], rows["model.layers.1.mlp.down_proj"]
    assert (q0["rank"], q0["scaling"]) == (2, pytest.approx(8 / 2**0.5))  # rank_pattern + rsLoRA
    assert (down1["rank"], down1["scaling"]) == (6, pytest.approx(8 / 6**0.5))
    assert rows["model.layers.0.self_attn.v_proj"]["scaling"] == pytest.approx(3 / 2)  # alpha_pattern
    assert rows["model.layers.1.mlp.up_proj"]["scaling"] == pytest.approx(20 / 2)
    assert not any("o_proj" in m or "gate_proj" in m for m in rows)  # the regex target excludes them
    gqa = rows["model.layers.0.self_attn.k_proj"]["shape"]
    assert gqa == [32, 64], "k/v of the GQA model are narrower than hidden"


@pytest.mark.parametrize("variant", ["plain", "patterns"])
def test_output_loads_in_peft_without_missing_or_unexpected_keys(sanitized, llama_pair, variant):
    out = sanitized[variant]["out"]
    peft_model = load_peft(load_llama(llama_pair["aligned"]), out)
    result = peft_model.load_adapter(out, adapter_name="again")
    assert list(result.missing_keys) == [] and list(result.unexpected_keys) == []
    n_lora = sum(1 for k in peft_model.state_dict() if ".lora_A.again." in k)
    assert n_lora == len(report_of(out)["modules"])


@pytest.mark.parametrize("variant", ["plain", "patterns"])
def test_output_format_is_a_drop_in_replacement(sanitized, variant):
    from huggingface_hub import metadata_load

    run = sanitized[variant]
    src, dst = run["adapter"], run["out"]
    assert sorted(p.name for p in dst.iterdir()) == OUTPUT_FILES
    assert (dst / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    weights = "adapter_model.safetensors"
    with safe_open(src / weights, "pt") as a, safe_open(dst / weights, "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for key in a.keys():
            ta, tb = a.get_slice(key), b.get_slice(key)
            assert (ta.get_shape(), ta.get_dtype()) == (tb.get_shape(), tb.get_dtype()), key
        meta = b.metadata()
    assert meta["format"] == "pt"
    assert meta["csulora_lambda"] == str(run["lam"]) and meta["csulora_exact_svd"] == "True"
    assert meta["csulora_form"] == "factored" and meta["csulora_method"] == "csulora"
    assert meta["csulora_subspace_energy"] == str(DEFAULTS.subspace_energy)
    assert meta["csulora_max_subspace_rank"] == str(DEFAULTS.max_subspace_rank)
    assert "csulora_version" in meta
    card = metadata_load(dst / "README.md")
    config = json.loads((src / "adapter_config.json").read_text())
    assert card["library_name"] == "peft"
    assert card["base_model"] == Path(config["base_model_name_or_path"]).name  # a local path: its folder's name
    if variant == "plain":  # a real process: the card records its command line, local paths by their names
        assert (
            f"csulora sanitize --aligned {card['base_model']} --exact-svd --method csulora --adapter {src.name}"
            in (dst / "README.md").read_text()
        )


def test_lambda_zero_returns_the_input_tensors_bit_for_bit(sanitized, llama_pair, tmp_path):
    src = sanitized["patterns"]["adapter"]
    out = tmp_path / "zero"
    result = CliRunner().invoke(app, ["sanitize", "--adapter", str(src), "--aligned", str(llama_pair["aligned"]),
                                      "-o", str(out), "--lambda", "0", "--method", "csulora", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    before, after = load_file(src / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key, t in before.items():
        assert after[key].dtype == t.dtype
        assert after[key].contiguous().view(torch.uint8).tolist() == t.contiguous().view(torch.uint8).tolist(), key
    rows = report_of(out)["modules"]
    assert all(m["gamma_in"] == 1.0 and m["gamma_out"] == 1.0 for m in rows)


def test_bfloat16_adapter_keeps_its_dtype(sanitized, llama_pair, tmp_path):
    src = tmp_path / "bf16"
    shutil.copytree(sanitized["plain"]["adapter"], src)
    tensors = {k: v.bfloat16() for k, v in load_file(src / "adapter_model.safetensors").items()}
    save_file(tensors, src / "adapter_model.safetensors", metadata={"format": "pt"})
    result = CliRunner().invoke(app, ["sanitize", "--adapter", str(src), "--aligned", str(llama_pair["aligned"]),
                                      "--exact-svd", "--method", "csulora", "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    out = tmp_path / "bf16-sanitized"
    after = load_file(out / "adapter_model.safetensors")
    assert {k: v.dtype for k, v in after.items()} == {k: torch.bfloat16 for k in tensors}
    k_of = {m["module"]: m["k"] for m in report_of(out)["modules"]}
    # bf16 factors: the merged delta matches the closed form to bf16 precision
    check_merged_deltas(llama_pair["aligned"], llama_pair["base"], src, out, DEFAULTS.lam, k_of, atol=2e-2)


# --- fan_in_fan_out: GPT-2's Conv1D stores weights (in, out) ---------------------------------------------------

GPT2_TARGETS = ["c_attn", "c_fc"]


def load_gpt2(path: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(path, dtype=torch.float32)


@pytest.fixture(scope="module")
def gpt2_pair(tmp_path_factory) -> dict[str, Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64, n_positions=32))
    paths = {"base": root / "gpt2-tiny", "aligned": root / "gpt2-tiny-chat", "adapter": root / "adapter"}
    model.save_pretrained(paths["base"])
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[-1] in GPT2_TARGETS:
                d_in, d_out = module.weight.shape  # Conv1D
                module.weight += 0.05 * torch.randn(d_in, 3, generator=g) @ torch.randn(3, d_out, generator=g)
    model.save_pretrained(paths["aligned"])
    (paths["aligned"] / "README.md").write_text(f"---\nbase_model: {paths['base']}\n---\n")
    config = LoraConfig(r=4, lora_alpha=8, target_modules=GPT2_TARGETS, fan_in_fan_out=True, init_lora_weights=False)
    peft_model = get_peft_model(load_gpt2(paths["aligned"]), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(20)
    peft_model.save_pretrained(paths["adapter"])
    return paths


def test_fan_in_fan_out_conv1d_round_trip(gpt2_pair):
    assert json.loads((gpt2_pair["adapter"] / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    out = gpt2_pair["adapter"].with_name("adapter-sanitized")
    result = CliRunner().invoke(app, ["sanitize", "--adapter", str(gpt2_pair["adapter"]),
                                      "--aligned", str(gpt2_pair["aligned"]), "--exact-svd", "--method", "csulora",
                                      "-q"])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = report_of(out)["modules"]
    assert {tuple(m["shape"]) for m in rows} == {(96, 32), (128, 32)}  # (d_out, d_in) of c_attn and c_fc
    k_of = {m["module"]: m["k"] for m in rows}
    n = check_merged_deltas(gpt2_pair["aligned"], gpt2_pair["base"], gpt2_pair["adapter"], out, DEFAULTS.lam, k_of,
                            load=load_gpt2, transpose=True)  # fmt: skip
    assert n == 4


def test_fixed_subspace_rank(sanitized, llama_pair, tmp_path):
    """--subspace-rank 3 (the displacement has rank 4): every module uses k = 3 and still merges to §4."""
    run = sanitized["patterns"]
    out = tmp_path / "rank3"
    args = ["sanitize", "--adapter", run["adapter"], "--aligned", llama_pair["aligned"], "-o", out]
    options = ["--subspace-rank", "3", "--lambda", "4", "--method", "csulora", "-q"]
    result = CliRunner().invoke(app, [str(a) for a in args] + options)
    assert result.exit_code == 0, result.output
    report = report_of(out)
    assert report["settings"]["subspace_rank"] == 3
    k_of = {m["module"]: m["k"] for m in report["modules"]}
    assert set(k_of.values()) == {3}
    check_merged_deltas(llama_pair["aligned"], llama_pair["base"], run["adapter"], out, 4.0, k_of)
