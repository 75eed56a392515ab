"""Re-alignment (DESIGN.md §5b): the closed form against a dense oracle and a numerical minimiser of the stated
objective, both written forms, the erosion coefficient, the limits, and the method on whole modules."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora import Settings
from csulora.correction import (
    best_rank,
    erosion,
    realign_shift,
    realign_strength,
    shift_block_factors,
    subspace_block,
)
from csulora.io.adapters import LoraModule
from csulora.methods import METHODS
from csulora.subspace import safety_subspace
from tests import oracle
from tests.test_correction import case, shapes  # random factors and a displacement with its exact subspace

F64 = torch.float64
EXAMPLES = settings(max_examples=25, deadline=None, derandomize=True)
settings_of_realign = st.tuples(
    shapes,  # seed, d_out, d_in, r, k
    st.sampled_from([0.0, 0.3, 1.0, 7.0, math.inf]),  # λ
    st.sampled_from([0.0, 0.25, 1.0]),  # β
)


def realigned(c: dict, lam: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The product's pipeline over the pure functions: M, Z, the exact block factors."""
    sB = c["s"] * c["B"]
    Z = realign_shift(subspace_block(c["A"], sB, c["U"], c["V"]), c["S"], realign_strength(lam), beta)
    return shift_block_factors(c["A"], sB, c["U"], c["V"], Z)


@EXAMPLES
@given(settings_of_realign)
def test_block_form_equals_the_dense_closed_form(drawn):
    (seed, d_out, d_in, r, k), lam, beta = drawn
    c = case(seed, d_out, d_in, r, k)
    A_new, B_new = realigned(c, lam, beta)
    assert A_new.shape == (r + c["k"], d_in) and B_new.shape == (d_out, r + c["k"])
    expected = oracle.realign_delta(c["s"] * c["B"] @ c["A"], c["D"], c["k"], lam, beta)
    torch.testing.assert_close(B_new @ A_new, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lam, beta", [(0.5, 0.0), (3.0, 0.25), (40.0, 1.0)])
def test_closed_form_minimises_the_stated_objective(lam, beta):
    """An L-BFGS minimiser of ‖X − ΔW‖² + λ‖PXQ − βD_k‖², started at ΔW, lands on the closed form."""
    c = case(7, 10, 8, 3, 2)
    P, Q = oracle.projectors(c["D"], c["k"])
    dW, Dk = c["s"] * c["B"] @ c["A"], oracle.truncated(c["D"], c["k"])
    X = dW.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([X], max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            line_search_fn="strong_wolfe")  # fmt: skip

    def objective():
        opt.zero_grad()
        loss = ((X - dW) ** 2).sum() + lam * ((P @ X @ Q - beta * Dk) ** 2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    A_new, B_new = realigned(c, lam, beta)
    torch.testing.assert_close(X.detach(), B_new @ A_new, rtol=0, atol=1e-7)


def test_limits_lambda_zero_and_infinity():
    c = case(3, 9, 11, 2, 3)
    dW = c["s"] * c["B"] @ c["A"]
    A0, B0 = realigned(c, 0.0, 0.5)
    torch.testing.assert_close(B0 @ A0, dW, rtol=0, atol=1e-12)  # Z = 0
    A_inf, B_inf = realigned(c, math.inf, 0.5)
    P, Q = oracle.projectors(c["D"], c["k"])
    # c = 1: the in-subspace block is exactly β D_k, everything outside it is ΔW's
    torch.testing.assert_close(P @ (B_inf @ A_inf) @ Q, 0.5 * oracle.truncated(c["D"], c["k"]), rtol=0, atol=1e-10)
    torch.testing.assert_close((B_inf @ A_inf) - P @ (B_inf @ A_inf) @ Q, dW - P @ dW @ Q, rtol=0, atol=1e-10)
    assert realign_strength(math.inf) == 1.0 and realign_strength(3.0) == 0.75 and realign_strength(0.0) == 0.0


@EXAMPLES
@given(settings_of_realign)
def test_factored_form_is_the_best_rank_r_approximation(drawn):
    (seed, d_out, d_in, r, k), lam, beta = drawn
    c = case(seed, d_out, d_in, r, k)
    A_new, B_new = realigned(c, lam, beta)
    A_r, B_r, dropped = best_rank(A_new, B_new, r)
    assert A_r.shape == (r, d_in) and B_r.shape == (d_out, r)
    X = B_new @ A_new
    expected = oracle.best_rank(X, r)
    scale = float(X.abs().max()) or 1.0
    torch.testing.assert_close(B_r @ A_r, expected, rtol=0, atol=1e-9 * scale)
    assert dropped == pytest.approx(float(((X - expected) ** 2).sum()), rel=1e-8, abs=1e-12 * scale**2)
    # written balanced: both factors carry the same singular values
    torch.testing.assert_close(torch.linalg.norm(B_r, dim=0), torch.linalg.norm(A_r, dim=1), rtol=1e-8, atol=1e-12)


def test_best_rank_pads_when_the_product_has_fewer_singular_values():
    A, B = torch.randn(3, 2, dtype=F64), torch.randn(2, 3, dtype=F64)  # rank ≤ 2, r = 4 asked
    A_r, B_r, dropped = best_rank(A, B, 4)
    assert A_r.shape == (4, 2) and B_r.shape == (2, 4) and dropped == pytest.approx(0.0, abs=1e-20)
    torch.testing.assert_close(B_r @ A_r, B @ A, rtol=0, atol=1e-12)


@EXAMPLES
@given(shapes)
def test_erosion_coefficient_is_the_projection_on_d_k(dims):
    seed, d_out, d_in, r, k = dims
    c = case(seed, d_out, d_in, r, k)
    M = subspace_block(c["A"], c["s"] * c["B"], c["U"], c["V"])
    assert erosion(M, c["S"]) == pytest.approx(oracle.erosion(c["s"] * c["B"] @ c["A"], c["D"], c["k"]), rel=1e-9)
    assert erosion(M[:0, :0], c["S"][:0]) == 0.0  # empty subspace


def test_realign_to_the_displacement_gives_erosion_beta():
    """c = 1 puts exactly β D_k in the subspace, so the written update's erosion coefficient is β."""
    c = case(11, 12, 10, 3, 2)
    A_new, B_new = realigned(c, math.inf, 0.25)
    assert erosion(subspace_block(A_new, B_new, c["U"], c["V"]), c["S"]) == pytest.approx(0.25, rel=1e-10)


def test_result_is_invariant_to_the_lora_gauge():
    c = case(5, 10, 9, 3, 2)
    G = torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=F64) + 3 * torch.eye(3, dtype=F64)
    A_new, B_new = realigned(c, 2.0, 0.25)
    gauged = {**c, "A": torch.linalg.solve(G, c["A"]), "B": c["B"] @ G}
    A_g, B_g = realigned(gauged, 2.0, 0.25)
    torch.testing.assert_close(B_g @ A_g, B_new @ A_new, rtol=0, atol=1e-10)


# --- the method on one module (methods/realign.py) -------------------------------------------------------------


def module_and_subspace(seed: int = 0, dtype=torch.float32, k: int = 3):
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(16, 6, generator=g) @ torch.randn(6, 12, generator=g)
    A, B = torch.randn(4, 12, generator=g).to(dtype), torch.randn(16, 4, generator=g).to(dtype)
    module = LoraModule(name="model.layers.0.self_attn.q_proj", A=A, B=B, rank=4, alpha=8.0, scaling=2.0)
    return module, safety_subspace(D, rank=k, exact=True), D


@pytest.mark.parametrize("form", ["factored", "block"])
def test_lambda_zero_writes_the_input_bit_for_bit(form):
    module, sub, _ = module_and_subspace(dtype=torch.bfloat16)
    res = METHODS["realign"].correct(module, sub, Settings(method="realign", lam=0.0, beta=0.5, form=form), None)
    assert res.A is module.A and res.B is module.B and res.row.rank_after is None
    assert res.row.c == 0.0 and res.row.erosion_after == res.row.erosion and res.row.rho_after == res.row.rho


@pytest.mark.parametrize("form", ["factored", "block"])
def test_method_writes_what_the_closed_form_says(form):
    module, sub, D = module_and_subspace()
    settings = Settings(method="realign", lam=4.0, beta=0.25, form=form)
    res = METHODS["realign"].correct(module, sub, settings, None)
    dW = module.scaling * module.B.double() @ module.A.double()
    X = oracle.realign_delta(dW, D, sub.k, 4.0, 0.25)
    row = res.row
    if form == "block":  # scale 1, rank r + k
        assert row.rank_after == 4 + sub.k and res.A.shape == (4 + sub.k, 12)
        written = res.B.double() @ res.A.double()
        torch.testing.assert_close(written, X, rtol=0, atol=1e-4 * float(X.abs().max()))
        assert row.truncation_loss is None
    else:  # the config's scaling is kept, rank r
        assert row.rank_after is None and res.A.shape == module.A.shape and res.B.dtype == module.B.dtype
        written = module.scaling * res.B.double() @ res.A.double()
        torch.testing.assert_close(written, oracle.best_rank(X, 4), rtol=0, atol=1e-4 * float(X.abs().max()))
        loss = float(((X - oracle.best_rank(X, 4)) ** 2).sum() / (dW**2).sum())
        assert row.truncation_loss == pytest.approx(loss, rel=1e-5, abs=1e-12)
    assert row.c == pytest.approx(0.8) and row.beta == 0.25
    assert row.erosion == pytest.approx(oracle.erosion(dW, D, sub.k), rel=1e-5)
    assert row.erosion_after == pytest.approx(oracle.erosion(written, D, sub.k), rel=1e-4, abs=1e-6)
    P, Q = oracle.projectors(D, sub.k)
    f_after = float(((P @ written @ Q) ** 2).sum())
    # rho_after: the written update's own shares; input_share_after: the same energies over the input's ‖ΔW‖²
    assert row.rho_after["F"] == pytest.approx(f_after / float((written**2).sum()), rel=1e-4)
    assert row.input_share_after["F"] == pytest.approx(f_after / float((dW**2).sum()), rel=1e-4)


def test_empty_subspace_leaves_the_module_alone():
    module, _, _ = module_and_subspace()
    empty = safety_subspace(torch.zeros(16, 12))
    res = METHODS["realign"].correct(module, empty, Settings(method="realign", lam=math.inf, beta=1.0), None)
    assert res.A is module.A and res.B is module.B and res.row.k == 0 and "empty subspace" in res.row.notes
