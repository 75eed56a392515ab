"""Numbers to the last bit (issue 22): the reproductions of an independent float64 review, each a test that failed
on the code before the fix. Safe LoRA's norm, λ = 0 in the block form, a zero update's report, "after" values
measured on what is written, fp16 underflow, float64 checkpoints kept wide, one rounding to bf16 / fp16, the
numerical-rank cut, the cast's loss on full weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from csulora import Settings
from csulora.api import audit, sanitize
from csulora.correction import safe_lora_project
from csulora.io.adapters import CONFIG, WEIGHTS, DenseModule, LoraModule
from csulora.io.layouts import Target
from csulora.methods import METHODS
from csulora.methods.base import DenseUpdate
from csulora.precision import cast_back, widen
from csulora.subspace import displacement, rank_cut, safety_subspace
from tests import reference64 as ref

F64 = torch.float64


def module_of(A: torch.Tensor, B: torch.Tensor, alpha: float | None = None) -> LoraModule:
    r = A.shape[0]
    alpha = float(r) if alpha is None else alpha
    return LoraModule("m", A, B, rank=r, alpha=alpha, scaling=alpha / r)


def spectrum_pair(d_out: int, d_in: int, seed: int, decay: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=F64)).Q[:, : min(d_out, d_in)]
    V = torch.linalg.qr(torch.randn(d_in, d_in, generator=g, dtype=F64)).Q[:, : min(d_out, d_in)]
    S = 0.1 * decay ** -torch.arange(min(d_out, d_in), dtype=F64)
    return (U * S) @ V.T


# ------------------------------------------------------------------ item 1: Safe LoRA's ‖D‖_F


def test_safe_lora_divides_by_the_one_pass_norm():
    """The issue's reproduction: 4.6e-4 relative error with a float32 whole-matrix norm."""
    g = torch.Generator().manual_seed(0)
    D = (torch.randn(5632, 2048, generator=g) * 1e-3).float()
    B = (torch.randn(5632, 8, generator=g) * 1e-2).float()
    Dd = D.double()
    want = Dd @ (Dd.T @ B.double()) / Dd.norm()
    err = float((safe_lora_project(B, D).double() - want).norm() / want.norm())
    assert err < 1e-5, err


# ------------------------------------------------------------------ item 3: λ = 0 in the block form


def test_block_form_at_lambda_zero_is_the_input_bit_for_bit(llama_pair, peft_adapter, tmp_path):
    for method in ("csulora", "realign"):
        out = tmp_path / method
        settings = Settings(method=method, form="block", lam=0.0, exact_svd=True, subspace_rank=4)
        result = sanitize(peft_adapter, str(llama_pair["aligned"]), str(llama_pair["base"]), out, settings=settings)
        a, b = load_file(peft_adapter / WEIGHTS), load_file(out / WEIGHTS)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
        assert (out / CONFIG).read_bytes() == (peft_adapter / CONFIG).read_bytes()
        assert not result.report.rank_changed
        assert all(m.rank_after is None and m.write_error == 0.0 for m in result.report.modules)


# ------------------------------------------------------------------ item 4: a zero update (B = 0)


@pytest.mark.parametrize("method, values", [("realign", {"lam": 4.0, "beta": 1.0}), ("resta", {"gamma": 0.5})])
def test_zero_update_gets_absolute_after_values(method, values):
    """PEFT's initial state B = 0: realign λ = 4, β = 1 writes X* = cβD_k, RESTA γD_k; the report says what was
    written in absolute terms and leaves the ratios to ‖ΔW‖ = 0 undefined (None), not 0."""
    D = spectrum_pair(24, 20, 1, decay=1.3)
    g = torch.Generator().manual_seed(2)
    A, B = torch.randn(4, 20, generator=g), torch.zeros(24, 4)
    sub = safety_subspace(D.float(), rank=8, exact=True)
    res = METHODS[method].correct(module_of(A, B), sub, Settings(method=method, **values, subspace_rank=8), None)
    row = res.row
    written = row.scaling * res.B.double() @ res.A.double()
    Dk = ref.truncated(D, sub.k)
    X = (0.8 * 1.0 if method == "realign" else 0.5) * Dk  # c β D_k, or γ D_k
    best = ref.best_rank(X, 4)
    assert row.update_norm == 0 and "zero update" in row.notes
    assert row.truncation_loss is None and row.truncation_energy == pytest.approx(float(((X - best) ** 2).sum()),
                                                                                   rel=1e-6)
    assert row.truncation_energy > 0
    assert row.retained is None and row.to_dict()["retained_norm"] is None
    assert row.update_norm_after == pytest.approx(float(written.norm()), rel=1e-6)
    P, Q = ref.projectors(D, sub.k)
    parts = ref.components(written, P, Q)
    total = float((written**2).sum())
    for c, x in parts.items():
        assert row.energy_after[c] == pytest.approx(float((x**2).sum()), rel=1e-5, abs=1e-12 * total)
        assert row.rho_after[c] == pytest.approx(float((x**2).sum()) / total, rel=1e-5, abs=1e-9)


def test_zero_update_under_csulora_stays_zero_and_reads_so():
    D = spectrum_pair(16, 12, 3)
    sub = safety_subspace(D.float(), rank=4, exact=True)
    A, B = torch.randn(2, 12), torch.zeros(16, 2)
    for form in ("factored", "block"):
        res = METHODS["csulora"].correct(module_of(A, B), sub, Settings(lam=5.0, form=form, subspace_rank=4), None)
        assert float((res.B.double() @ res.A.double()).abs().max()) == 0.0
        assert res.row.retained == 1.0 and res.row.update_norm_after == 0.0 and res.row.write_error == 0.0


# ------------------------------------------------------------------ item 5 and issue 23: "after" as written


def test_after_values_are_measured_on_the_written_bf16_factors():
    """RESTA γ = 0.5 on a bf16 adapter: erosion_after and rho_after are those of the factors as written (after
    the cast), and rho_after are the written update's own shares, as audit of the written adapter reports."""
    D = spectrum_pair(64, 48, 4, decay=1.05)
    g = torch.Generator().manual_seed(5)
    A = (torch.randn(4, 48, generator=g) * 0.05).bfloat16()
    B = (torch.randn(64, 4, generator=g) * 0.02).bfloat16()
    sub = safety_subspace(D.float(), rank=8, exact=True)
    for form in ("factored", "block"):
        module = module_of(A, B, alpha=8.0)
        res = METHODS["resta"].correct(module, sub, Settings(method="resta", gamma=0.5, form=form, subspace_rank=8),
                                       None)  # fmt: skip
        scale = module.scaling if form == "factored" else 1.0
        written = scale * res.B.double() @ res.A.double()  # the bf16 factors as written, widened exactly
        assert res.B.dtype == torch.bfloat16
        Dk = ref.truncated(D, sub.k)
        # 1e-5: the float32 subspace against the float64 SVD; the cast moves these values by ~1e-3
        assert res.row.erosion_after == pytest.approx(float((written * Dk).sum() / (Dk * Dk).sum()), rel=1e-5)
        P, Q = ref.projectors(D, sub.k)
        total = float((written**2).sum())
        for c, x in ref.components(written, P, Q).items():
            assert res.row.rho_after[c] == pytest.approx(float((x**2).sum()) / total, rel=1e-5, abs=1e-9)


@pytest.mark.parametrize("method, form, values", [
    ("csulora", "factored", {"lam": 64.0}), ("csulora", "block", {"lam": 8.0}),
    ("realign", "factored", {"lam": 4.0, "beta": 0.25}), ("safe-lora", "factored", {"threshold": 1.0}),
])  # fmt: skip
def test_after_values_are_what_audit_of_the_output_reports(llama_pair, peft_adapter, tmp_path, method, form, values):
    """Issue 23: a run's "after" values (JSON rows and totals, what the Markdown, terminal, card and HTML show)
    are the "before" values of `audit` on its output, so the gate compares what the report showed."""
    settings = Settings(method=method, form=form, exact_svd=True, subspace_rank=4, **values)
    aligned, base = str(llama_pair["aligned"]), str(llama_pair["base"])
    done = sanitize(peft_adapter, aligned, base, tmp_path / "out", settings=settings).report
    again = audit(tmp_path / "out", aligned, base, settings=settings).report
    rows = {m.module: m for m in again.modules}
    for m in done.modules:
        assert m.rho_after == pytest.approx(rows[m.module].rho, rel=1e-9, abs=1e-12)
        assert m.erosion_after == pytest.approx(rows[m.module].erosion, rel=1e-9, abs=1e-12)
        assert m.update_norm_after == pytest.approx(rows[m.module].update_norm, rel=1e-9)
    t, u = done.totals(), again.totals()
    for after, before in (("off_energy_after", "off_energy_before"), ("leaving_energy_after", "leaving_energy_before"),
                          ("erosion_after", "erosion_before")):  # fmt: skip
        assert t[after] == pytest.approx(u[before], rel=1e-9, abs=1e-12)
    # the Markdown report shows all four "after" shares of each row, as audit of the output reports them
    markdown = (tmp_path / "out" / "csulora_report.md").read_text()
    assert "**Columns.**" in markdown
    for m in again.modules:
        line = next(row for row in markdown.splitlines() if row.startswith(f"| {m.module} |"))
        assert line.rstrip(" |").endswith(" / ".join(f"{100 * m.rho[c]:.1f}%" for c in ("F", "H_in", "H_out", "O")))


# ------------------------------------------------------------------ item 2: fp16 underflow


@pytest.mark.parametrize("scale", [0.018, 0.0054])
def test_fp16_safe_lora_projection_does_not_underflow_silently(scale):
    """The issue's table: C·B of an fp16 adapter falls into the subnormal range (1.6 % and 5.8 % error). The
    written product now errs by about fp16's rounding, and the loss is measured in the row either way."""
    g = torch.Generator().manual_seed(6)
    d_out, d_in, r = 256, 128, 8
    D = spectrum_pair(d_out, d_in, 7, decay=1.02)
    D = (D * (scale / float(D.norm()))).float()
    A = (torch.randn(r, d_in, generator=g) * 0.05).half()
    B = (torch.randn(d_out, r, generator=g) * 1e-3).half()
    module = module_of(A, B, alpha=16.0)
    sub = safety_subspace(D, rank=8, exact=True)
    method = METHODS["safe-lora"]
    res = method.correct(module, sub, Settings(method="safe-lora", threshold=1.0, subspace_rank=8), D)
    method.finish({"m": res}, Settings(method="safe-lora", threshold=1.0, subspace_rank=8))
    assert res.row.safe_lora_projected and res.B.dtype == torch.float16 and res.A.dtype == torch.float16
    exact = ref.safe_lora_matrix(D) @ B.double() @ A.double()
    got = res.B.double() @ res.A.double()
    err = float((got - exact).norm() / exact.norm())
    assert err < 4 * 2**-11, err  # within four unit roundoffs of fp16
    assert res.row.write_error == pytest.approx(err, rel=0.05, abs=1e-6)


# ------------------------------------------------------------------ item 7: widening and one rounding


def test_float64_weights_are_not_narrowed():
    g = torch.Generator().manual_seed(8)
    W_a = torch.randn(12, 10, generator=g, dtype=F64)
    W = W_a + 1e-3 * torch.randn(12, 10, generator=g, dtype=F64)
    assert widen(W).dtype == F64 and torch.equal(widen(W), W)
    assert torch.equal(displacement(W, W_a), W - W_a)
    update = DenseUpdate.of(DenseModule("m", "m.weight", W, Target("m.weight")), W_a, torch.device("cpu"))
    assert update.dW.dtype == F64 and torch.equal(update.dW, W - W_a)


def test_float64_model_is_corrected_in_float64():
    """csulora's exact form on an F64 weight: the written weight matches the float64 reference to ~1e-15 of
    ‖X‖ (float32 narrowing gave 1.8e-6 to 4.9e-6)."""
    D = spectrum_pair(40, 32, 9, decay=1.1)
    g = torch.Generator().manual_seed(10)
    W_a = torch.randn(40, 32, generator=g, dtype=F64)
    W = W_a + 0.05 * torch.randn(40, 32, generator=g, dtype=F64)
    sub = safety_subspace(D, rank=6, exact=True)
    update = DenseUpdate.of(DenseModule("m", "m.weight", W, Target("m.weight")), W_a, torch.device("cpu"))
    res = METHODS["csulora"].correct_dense(update, sub, Settings(lam=3.0, subspace_rank=6), None)
    assert res.W.dtype == F64
    P, Q = ref.projectors(D, 6)
    X = ref.csulora_block(W - W_a, P, Q, 3.0)
    err = float(((res.W - W_a) - X).norm() / X.norm())
    assert err < 1e-12, err


def test_float64_to_16_bits_rounds_once():
    x = torch.tensor([1 + 2**-8 + 2**-30, -(1 + 2**-8 + 2**-30)], dtype=F64)
    assert cast_back(x, torch.bfloat16, "x").tolist() == [1.0078125, -1.0078125]
    y = torch.tensor([1 + 2**-11 + 2**-40], dtype=F64)
    assert cast_back(y, torch.float16, "y").item() == 1 + 2**-10
    g = torch.Generator().manual_seed(11)
    exponents = torch.randint(-26, 12, (100_000,), generator=g).double()  # fp16's subnormals included
    z = torch.randn(100_000, generator=g, dtype=F64) * torch.exp2(exponents)
    for dtype in (torch.bfloat16, torch.float16):
        got = cast_back(z, dtype, "z")
        err = (got.double() - z).abs()
        for direction in (math.inf, -math.inf):  # no representable neighbour is nearer
            other = torch.nextafter(got, torch.full_like(got, direction)).double()
            assert bool(((other - z).abs() >= err).all())


# ------------------------------------------------------------------ item 6: the numerical-rank cut


def test_rank_cut_near_full_rank_is_reported(tmp_path):
    """σ_i = 0.1·1.2⁻ⁱ on a 96 × 80 layer: --subspace-rank 256 keeps k = 63 in float32; the row records the 80
    asked for."""
    D = spectrum_pair(96, 80, 12, decay=1.2).float()
    sub = safety_subspace(D, rank=256, exact=True)
    assert sub.k < 80
    assert rank_cut(sub.k, [96, 80], 256, 256) == 80
    assert rank_cut(sub.k, [96, 80], sub.k, 256) is None and rank_cut(sub.k, [96, 80], None, 256) is None


# ------------------------------------------------------------------ items 8, 9: the cast's loss on full weights


def test_bf16_full_weight_reports_the_correction_the_cast_lost():
    """|W| ≈ 0.5, |ΔW| ≈ 3e-3: most of a small correction vanishes in a bf16 weight; the row says how much."""
    g = torch.Generator().manual_seed(13)
    W_a = (0.5 * torch.randn(64, 48, generator=g)).bfloat16()
    W = (W_a.float() + 3e-3 * torch.randn(64, 48, generator=g)).bfloat16()
    D = spectrum_pair(64, 48, 14, decay=1.1).float()
    sub = safety_subspace(D, rank=4, exact=True)
    update = DenseUpdate.of(DenseModule("m", "m.weight", W, Target("m.weight")), W_a, torch.device("cpu"))
    res = METHODS["csulora"].correct_dense(update, sub, Settings(lam=0.5, subspace_rank=4), None)
    dW = widen(W).double() - widen(W_a).double()
    P, Q = ref.projectors(D, 4)
    X = ref.csulora_block(dW, P, Q, 0.5)
    X_w = widen(res.W).double() - widen(W_a).double()
    lost = float((X_w - X).norm() / (X - dW).norm())
    assert res.row.correction_lost == pytest.approx(lost, rel=1e-4) and lost > 0.3
    assert res.row.write_error == pytest.approx(float((X_w - X).norm() / X.norm()), rel=1e-4)
    assert any("lost" in n for n in res.row.notes)


def test_zero_adapter_under_realign_writes_every_output(tmp_path):
    """PEFT's initial state through the whole pipeline: realign with β > 0 writes cβD_k into a zero adapter; the
    JSON (schema-valid, null ratios), Markdown, HTML and card render, and the retained norm reads n/a."""
    import json
    from importlib import resources

    import jsonschema

    from csulora.synthetic import write_adapter, write_pair

    shapes = {"model.layers.0.self_attn.q_proj": (24, 16), "model.layers.0.self_attn.v_proj": (8, 16)}
    pair = write_pair(tmp_path / "pair", shapes)
    adapter = write_adapter(tmp_path / "a", shapes, b_std=0.0)
    settings = Settings(method="realign", lam=4.0, beta=1.0, subspace_rank=3, exact_svd=True)
    sanitize(adapter, str(pair["aligned"]), str(pair["base"]), tmp_path / "out", settings=settings)
    report = json.loads((tmp_path / "out" / "csulora_report.json").read_text())
    schema = json.loads(resources.files("csulora").joinpath("report.schema.json").read_text())
    jsonschema.validate(report, schema)
    assert report["totals"]["retained_norm"] is None and report["totals"]["update_norm_after"] > 0
    assert all(m["truncation_loss"] is None and m["truncation_energy"] >= 0 for m in report["modules"])
    assert "n/a" in (tmp_path / "out" / "csulora_report.md").read_text()
    assert (tmp_path / "out" / "README.md").is_file() and (tmp_path / "out" / "csulora_report.html").is_file()


def test_rank_cut_is_in_the_row_the_notes_and_the_warnings(llama_pair, peft_adapter, tmp_path):
    """llama_pair's displacements have rank 4: --subspace-rank 8 keeps k = 4, and the report says so."""
    settings = Settings(method="csulora", lam=1.0, subspace_rank=8, exact_svd=True)
    report = sanitize(peft_adapter, str(llama_pair["aligned"]), str(llama_pair["base"]), tmp_path / "out",
                      settings=settings).report  # fmt: skip
    assert report.modules and all(m.k == 4 and m.k_requested == 8 for m in report.modules)
    assert all(any("subspace rank cut: k = 4 of the 8" in n for n in m.notes) for m in report.modules)
    assert any(w.startswith(f"{len(report.modules)} module(s): subspace rank cut") for w in report.warnings)
    exact = sanitize(peft_adapter, str(llama_pair["aligned"]), str(llama_pair["base"]), tmp_path / "four",
                     settings=Settings(method="csulora", lam=1.0, subspace_rank=4, exact_svd=True)).report
    assert all(m.k_requested is None for m in exact.modules)


def test_block_form_of_a_small_realigned_update_keeps_bf16_precision():
    """Item 8: realign at λ = ∞, β = 0 erasing F from a bf16 update that lies mostly in the subspace. The spec's
    blocks [sB | U_k Z], [A ; V_kᵀ] cancel and lose several % of X* in the cast; the written blocks lose about one
    rounding, like the factored form, and the report's write_error says so."""
    g = torch.Generator().manual_seed(15)
    d_out, d_in, r, k = 192, 128, 4, 4
    U = torch.linalg.qr(torch.randn(d_out, 16, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(d_in, 16, generator=g, dtype=F64)).Q
    D = ((U * (0.05 * 1.15 ** -torch.arange(16.0, dtype=F64))) @ V.T).float()
    B = U[:, :r] @ torch.randn(r, r, generator=g, dtype=F64) + 0.01 * torch.randn(d_out, r, generator=g, dtype=F64)
    A = torch.randn(r, r, generator=g, dtype=F64) @ V[:, :r].T
    module = module_of((1e-2 * A).bfloat16(), (1e-2 * B).bfloat16(), alpha=8.0)
    sub = safety_subspace(D, rank=k, exact=True)
    settings = Settings(method="realign", lam=math.inf, beta=0.0, form="block", subspace_rank=k)
    res = METHODS["realign"].correct(module, sub, settings, None)
    A64, sB = module.A.double(), module.scaling * module.B.double()
    X = ref.realign(sB @ A64, D.double(), k, math.inf, 0.0)
    assert float(X.norm()) < 0.2 * float((sB @ A64).norm())  # F was most of the update
    err = float((res.B.double() @ res.A.double() - X).norm() / X.norm())
    Us, Vs = sub.U.double(), sub.V.double()
    Z = -(Us.T @ sB) @ (A64 @ Vs)  # the spec's blocks, cast to bf16 each
    spec = torch.cat([sB, Us @ Z], 1).bfloat16().double() @ torch.cat([A64, Vs.T], 0).bfloat16().double()
    spec_err = float((spec - X).norm() / X.norm())
    assert err < 4 * 2**-8 < spec_err, (err, spec_err)
    assert res.row.write_error == pytest.approx(err, rel=0.05)
