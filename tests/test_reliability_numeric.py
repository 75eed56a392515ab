"""Numerical edge cases (issue 6): zero adapter, zero displacement, rank 1, r above the subspace rank,
subspace rank above the layer's dimensions, fp16 adapters with large values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from csulora import sanitize
from csulora.api import Settings
from csulora.synthetic import write_adapter, write_pair
from tests import oracle
from tests.conftest import assert_one_line_error, run_cli

Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"
SHAPES = {Q: (24, 16), V: (8, 16)}
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 4e-2}


def strict_json(path: Path) -> dict:
    """The report is strict JSON: no NaN or Infinity anywhere."""

    def refuse(token):
        raise AssertionError(f"{path.name} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def check_against_oracle(adapter: Path, out: Path, pair, lam: float, dtype=torch.float32, scaling: float = 2.0):
    """Each module's written ``ΔW'`` equals DESIGN.md §4 on the exact subspace of the reported rank."""
    report = strict_json(out / "csulora_report.json")
    before, after = oracle.load_factors(adapter), oracle.load_factors(out)
    for row in report["modules"]:
        name = row["module"]
        A, B = before[name]
        A2, B2 = after[name]
        expected = oracle.expected_delta(A, B, scaling, oracle.displacement(pair, name), row["k"], lam)
        got = scaling * B2 @ A2
        err = float((got - expected).norm() / max(float(expected.norm()), 1e-30))
        assert err < TOL[dtype], (name, err)
    return report


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return write_pair(tmp_path_factory.mktemp("pair"), SHAPES)


def run(adapter: Path, pair, out: Path, **settings) -> None:
    settings = {"method": "csulora", "subspace_rank": 3, "lam": 1.0, **settings}  # the paper's closed form
    sanitize(adapter, str(pair["aligned"]), str(pair["base"]), out, settings=Settings(exact_svd=True, **settings))


def test_zero_adapter_is_returned_unchanged(pair, tmp_path):
    adapter = write_adapter(tmp_path / "a", SHAPES, b_std=0.0)
    run(adapter, pair, tmp_path / "out")
    report = strict_json(tmp_path / "out" / "csulora_report.json")
    assert all(r["update_norm"] == 0 and "zero update" in r["notes"] for r in report["modules"])
    assert all(r["gamma_in"] == 1 and r["gamma_out"] == 1 and r["retained_norm"] == 1 for r in report["modules"])
    a, b = load_file(adapter / "adapter_model.safetensors"), load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_zero_displacement_in_one_layer_is_attenuated_and_reported(pair, tmp_path):
    half = tmp_path / "half-aligned"
    half.mkdir()
    aligned = load_file(pair["aligned"] / "model.safetensors")
    aligned[f"{V}.weight"] = load_file(pair["base"] / "model.safetensors")[f"{V}.weight"]
    save_file(aligned, str(half / "model.safetensors"))
    adapter = write_adapter(tmp_path / "a", SHAPES)
    half_pair = {"base": pair["base"], "aligned": half}
    run(adapter, half_pair, tmp_path / "out")
    report = check_against_oracle(adapter, tmp_path / "out", half_pair, 1.0)
    rows = {r["module"]: r for r in report["modules"]}
    assert rows[V]["k"] == 0 and rows[V]["displacement_norm"] == 0 and "empty subspace" in rows[V]["notes"]
    # DESIGN.md §3-4 with P = Q = 0: the whole update is off-subspace, γ_in = γ_out = 1/(1 + λ)
    assert rows[V]["rho"]["O"] == pytest.approx(1) and rows[V]["gamma_in"] == rows[V]["gamma_out"] == 0.5
    assert any(V in w and "equal" in w and "attenuated" in w for w in report["warnings"])
    assert rows[Q]["k"] == 3 and rows[Q]["gamma_in"] < 1


def test_rank_one_adapter(pair, tmp_path):
    adapter = write_adapter(tmp_path / "a", SHAPES, r=1, alpha=2)
    run(adapter, pair, tmp_path / "out")
    check_against_oracle(adapter, tmp_path / "out", pair, 1.0, scaling=2.0)


def test_adapter_rank_above_subspace_rank(pair, tmp_path):
    adapter = write_adapter(tmp_path / "a", SHAPES, r=8, alpha=16)
    run(adapter, pair, tmp_path / "out", subspace_rank=1, lam=5.0)
    report = check_against_oracle(adapter, tmp_path / "out", pair, 5.0)
    assert {r["k"] for r in report["modules"]} == {1}


def test_subspace_rank_above_the_layer_dimensions(pair, tmp_path):
    """k is capped by min(d_out, d_in): for v_proj (8 × 16) the output side is the whole space, P = I."""
    adapter = write_adapter(tmp_path / "a", SHAPES, r=4)
    run(adapter, pair, tmp_path / "out", subspace_rank=100)
    report = check_against_oracle(adapter, tmp_path / "out", pair, 1.0)
    rows = {r["module"]: r for r in report["modules"]}
    assert rows[V]["k"] == 8 and rows[Q]["k"] == 16
    assert rows[V]["rho"]["H_out"] == pytest.approx(0, abs=1e-12) and rows[V]["gamma_out"] == pytest.approx(1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_values_are_computed_wide(dtype, pair, tmp_path):
    """Values near fp16's range (3e4): energies (squares ~1e9, sums beyond fp16) come out right because the
    math runs in float64; the factors are cast back and match the oracle to the dtype's precision."""
    adapter = write_adapter(tmp_path / "a", SHAPES, dtype=dtype, b_std=1e4)
    assert float(load_file(adapter / "adapter_model.safetensors")[f"base_model.model.{Q}.lora_B.weight"]
                 .float().abs().max()) > 2e4  # fmt: skip
    run(adapter, pair, tmp_path / "out")
    report = check_against_oracle(adapter, tmp_path / "out", pair, 1.0, dtype=dtype)
    for row in report["modules"]:
        assert sum(row["rho"].values()) == pytest.approx(1.0)
    out = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(t.dtype == dtype and torch.isfinite(t).all() for t in out.values())


def test_fp16_values_that_no_longer_fit_exit_2(tmp_path):
    """Projecting B on the subspace can make one entry larger than any input entry. With B's column
    (6e4, 6e4, 6e4, 6e4) and the subspace direction u ∝ (1, .1, .1, .1), P·b has a first entry of ~7.6e4,
    beyond fp16's 65504: csulora refuses (exit 2, naming the tensor) rather than write Inf or clamp."""
    torch.manual_seed(0)
    d_in = 6
    u = torch.tensor([1.0, 0.1, 0.1, 0.1]) / torch.tensor([1.0, 0.1, 0.1, 0.1]).norm()
    v = torch.nn.functional.normalize(torch.randn(d_in), dim=0)
    base = torch.randn(4, d_in)
    pair = {"base": tmp_path / "base", "aligned": tmp_path / "aligned"}
    for kind, W in (("base", base), ("aligned", base + torch.outer(u, v))):
        pair[kind].mkdir()
        save_file({f"{Q}.weight": W}, str(pair[kind] / "model.safetensors"))
    adapter = write_adapter(tmp_path / "a", {Q: (4, d_in)}, r=1, alpha=1, dtype=torch.float16)
    tensors = load_file(adapter / "adapter_model.safetensors")
    tensors[f"base_model.model.{Q}.lora_B.weight"] = torch.full((4, 1), 6e4, dtype=torch.float16)
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    args = ["--aligned", pair["aligned"], "--base", pair["base"], "-o", tmp_path / "out", "-q", "--exact-svd",
            "--method", "csulora"]
    result = run_cli("sanitize", "--adapter", adapter, *args, "--subspace-rank", "1", "--lambda", "1e6",
                     in_process=True)  # fmt: skip
    assert_one_line_error(result, f"{Q}.lora_B.weight", "does not fit float16", "float32")
    assert not (tmp_path / "out").exists()
    # the same adapter with a milder λ fits and is written
    ok = run_cli("sanitize", "--adapter", adapter, *args, "--subspace-rank", "1", "--lambda", "0.01", in_process=True)
    assert ok.returncode == 0, ok.stderr
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "out" / "adapter_model.safetensors").values())


def test_lambda_zero_is_bit_identical(pair, tmp_path):
    adapter = write_adapter(tmp_path / "a", SHAPES, dtype=torch.bfloat16)
    run(adapter, pair, tmp_path / "out", lam=0.0)
    a, b = load_file(adapter / "adapter_model.safetensors"), load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)


def test_cast_back_refuses_nan_inf_and_values_out_of_range_in_its_one_pass():
    """``cast_back`` checks finiteness and range with one ``aminmax``: a single NaN, +Inf or −Inf anywhere, or one
    value beyond the target dtype's range (either sign), is an error; a fitting tensor is cast unchanged."""
    from csulora.errors import CsuloraError
    from csulora.precision import cast_back

    x = torch.linspace(-3, 3, 1000, dtype=torch.float64).reshape(10, 100)
    assert torch.equal(cast_back(x, torch.float16, "m"), x.to(torch.float16))
    assert cast_back(x[:0], torch.float16, "m").numel() == 0
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[7, 42] = bad
        with pytest.raises(CsuloraError, match="not finite"):
            cast_back(y, torch.bfloat16, "m")
    for big in (7e4, -7e4):
        y = x.clone()
        y[3, 3] = big
        with pytest.raises(CsuloraError, match="does not fit float16"):
            cast_back(y, torch.float16, "m")
        assert cast_back(y, torch.bfloat16, "m").dtype == torch.bfloat16
