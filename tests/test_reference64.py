"""Every method in every form, on small random inputs in float32, bfloat16 and float16, against the float64
reference of tests/reference64.py (explicit projectors, the spec's formulas, nothing shared with the product).

What is written is compared with the reference within a bound that the cast itself allows: each written entry errs
by at most one unit roundoff ``u`` of its dtype, so ``‖B_w A_w − X‖ ≤ (2u + u²) ‖|B_w| |A_w|‖`` for factors and
``‖X_w − X‖ ≤ u ‖W_a + X‖`` for a full weight, plus the float32 subspace's own error against the float64 SVD. The
report's numbers (ρ before and after, erosion, Safe LoRA score, truncation loss, write error) are checked too."""

from __future__ import annotations

import math

import pytest
import torch

from csulora import Settings
from csulora.io.adapters import DenseModule, LoraModule
from csulora.io.layouts import Target
from csulora.methods import METHODS
from csulora.methods.base import DenseUpdate
from csulora.precision import unit_roundoff, widen
from csulora.subspace import safety_subspace
from tests import reference64 as ref

F64 = torch.float64
D_OUT, D_IN, R, K = 40, 32, 4, 5
SUBSPACE = 1e-5  # the float32 SVD of D against the float64 one, relative (gaps of 1.3 between σ_i)
CASES = [  # method, form, settings
    ("csulora", "factored", {"lam": 3.0}),
    ("csulora", "block", {"lam": 3.0}),
    ("realign", "factored", {"lam": 4.0, "beta": 0.25}),
    ("realign", "block", {"lam": 4.0, "beta": 0.25}),
    ("realign", "block", {"lam": math.inf, "beta": 0.0}),  # F erased: the terms that cancel (issue 22, item 8)
    ("resta", "factored", {"gamma": 0.5}),
    ("resta", "block", {"gamma": 0.5}),
    ("safe-lora", "factored", {"threshold": 1.0}),
]
DENSE = [  # a full weight: every method's exact form (§6b, §10)
    ("csulora", {"lam": 3.0}),
    ("realign", {"lam": 4.0, "beta": 0.25}),
    ("realign", {"lam": math.inf, "beta": 0.0}),
    ("resta", {"gamma": 0.5}),
    ("safe-lora", {"threshold": 1.0}),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def displacement(seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    n = min(D_OUT, D_IN)
    U = torch.linalg.qr(torch.randn(D_OUT, n, generator=g, dtype=F64)).Q
    V = torch.linalg.qr(torch.randn(D_IN, n, generator=g, dtype=F64)).Q
    return ((U * (0.2 * 1.3 ** -torch.arange(n, dtype=F64))) @ V.T).float().double()  # exact in float32


def expected(method: str, form: str, values: dict, dW: torch.Tensor, A, sB, D: torch.Tensor) -> torch.Tensor:
    """The reference's X for an adapter module (``A``, ``sB``) or, with ``A = None``, a full weight."""
    P, Q = ref.projectors(D, K)
    dense = A is None
    if method == "csulora":
        if dense or form == "block":
            return ref.csulora_block(dW, P, Q, values["lam"])
        return ref.csulora_factored(A, sB, P, Q, values["lam"])
    if method == "safe-lora":
        return ref.safe_lora_matrix(D) @ dW
    X = ref.realign(dW, D, K, values["lam"], values["beta"]) if method == "realign" else (
        ref.resta(dW, D, None if dense else K, values["gamma"]))  # fmt: skip
    return X if dense or form == "block" else ref.best_rank(X, R)


def check_report(row, dW: torch.Tensor, written: torch.Tensor, D: torch.Tensor) -> None:
    P, Q = ref.projectors(D, K)
    total, total_w = float((dW**2).sum()), float((written**2).sum())
    for c, x in ref.components(dW, P, Q).items():
        assert row.rho[c] == pytest.approx(float((x**2).sum()) / total, rel=SUBSPACE * 10, abs=1e-6)
    for c, x in ref.components(written, P, Q).items():
        assert row.rho_after[c] == pytest.approx(float((x**2).sum()) / total_w, rel=SUBSPACE * 10, abs=1e-6)
    # e = ⟨ΔW, D_k⟩/‖D_k‖²: the subspace's error moves it by about SUBSPACE · ‖ΔW‖ / ‖D_k‖
    Dk = float(ref.truncated(D, K).norm())
    for got, update in ((row.erosion, dW), (row.erosion_after, written)):
        assert got == pytest.approx(ref.erosion(update, D, K), abs=SUBSPACE * 10 * float(update.norm()) / Dk)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("method, form, values", CASES, ids=lambda c: str(c))
def test_lora_module_against_the_float64_reference(method, form, values, dtype):
    D = displacement(1)
    g = torch.Generator().manual_seed(2)
    A = (0.1 * torch.randn(R, D_IN, generator=g)).to(dtype)
    B = (0.05 * torch.randn(D_OUT, R, generator=g)).to(dtype)
    module = LoraModule("m", A, B, rank=R, alpha=8.0, scaling=2.0)
    settings = Settings(method=method, form=form, subspace_rank=K, exact_svd=True, **values)
    sub = safety_subspace(D.float(), rank=K, exact=True)
    res = METHODS[method].correct(module, sub, settings, D.float())
    METHODS[method].finish({"m": res}, settings)
    scale = 1.0 if form == "block" else module.scaling
    A_w, B_w = res.A.double(), res.B.double()
    assert res.A.dtype == dtype and res.B.dtype == dtype
    written = scale * B_w @ A_w
    A64, sB = A.double(), module.scaling * B.double()
    dW = sB @ A64
    X = expected(method, form, values, dW, A64, sB, D)
    u = unit_roundoff(dtype)
    bound = (2 * u + u * u) * float((scale * B_w.abs() @ A_w.abs()).norm())
    err = float((written - X).norm())
    assert err <= bound + SUBSPACE * (float(X.norm()) + float(dW.norm())), (err, bound)
    check_report(res.row, dW, written, D)
    if method == "safe-lora":
        assert res.row.safe_lora_score == pytest.approx(ref.safe_lora_score(dW, D), rel=1e-6)
    if method in ("realign", "resta") and form == "factored":
        full = expected(method, "block", values, dW, A64, sB, D)
        loss = float(((full - X) ** 2).sum()) / float((dW**2).sum())
        assert res.row.truncation_loss == pytest.approx(loss, rel=1e-4, abs=1e-9)
    # the report's write error is the cast's: written product against the one computed wide
    assert res.row.write_error <= (bound / max(float(X.norm()), 1e-30)) * (1 + 1e-6) + 2 * SUBSPACE


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("method, values", DENSE, ids=lambda c: str(c))
def test_full_weight_against_the_float64_reference(method, values, dtype):
    D = displacement(3)
    g = torch.Generator().manual_seed(4)
    W_a = (0.5 * torch.randn(D_OUT, D_IN, generator=g)).to(dtype)
    W = (widen(W_a) + 0.05 * torch.randn(D_OUT, D_IN, generator=g)).to(dtype)
    settings = Settings(method=method, subspace_rank=K, exact_svd=True, **values)
    sub = safety_subspace(D.float(), rank=K, exact=True)
    update = DenseUpdate.of(DenseModule("m", "m.weight", W, Target("m.weight")), W_a, torch.device("cpu"))
    res = METHODS[method].correct_dense(update, sub, settings, D.float())
    METHODS[method].finish({"m": res}, settings)
    assert res.W.dtype == dtype
    Wa64 = widen(W_a).double()
    dW = widen(W).double() - Wa64
    X = expected(method, "exact", values, dW, None, None, D)
    written = widen(res.W).double() - Wa64
    u = unit_roundoff(dtype)
    err = float((written - X).norm())
    assert err <= u * float((Wa64 + X).norm()) + SUBSPACE * (float(X.norm()) + float(dW.norm())), err
    check_report(res.row, dW, written, D)
    lost = float((written - X).norm() / (X - dW).norm())
    assert res.row.correction_lost == pytest.approx(lost, rel=1e-3, abs=1e-6)
