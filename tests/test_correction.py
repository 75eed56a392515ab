"""The math of DESIGN.md §3–§5 (correction.py), checked against dense float64 formulas (tests/oracle.py)
and against independent numerical minimisers of the stated objectives."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from csulora.correction import (
    COMPONENTS,
    attenuation,
    component_energies,
    factored_update,
    product_energy,
    relative_energies,
    safe_lora_score,
    safe_lora_score_subspace,
    split,
)
from tests import oracle

F64 = torch.float64
EXAMPLES = settings(max_examples=20, deadline=None, derandomize=True)  # reproducible in CI


def case(seed: int, d_out: int = 12, d_in: int = 9, r: int = 3, k: int = 2, disp_rank: int = 4) -> dict:
    """Random factors, a displacement of rank ``disp_rank`` and its exact top-``k`` singular vectors."""
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=F64)
    B = torch.randn(d_out, r, generator=g, dtype=F64)
    D = torch.randn(d_out, disp_rank, generator=g, dtype=F64) @ torch.randn(disp_rank, d_in, generator=g, dtype=F64)
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    P, Q = oracle.projectors(D, k)
    return {"A": A, "B": B, "D": D, "U": U[:, :k], "S": S[:k], "V": Vh[:k].T, "P": P, "Q": Q, "k": k,
            "s": 0.5 + seed % 3}  # fmt: skip


def sanitized(A, B, s, U, V, lam):
    """The product's pipeline over the pure functions: split, energies, γ, factored update."""
    rho = relative_energies(component_energies(split(A, s * B, U, V)))
    g_out, g_in = attenuation(rho, lam)
    return factored_update(A, B, U, V, g_out, g_in)


shapes = st.tuples(
    st.integers(0, 10_000),  # seed
    st.integers(4, 14),  # d_out
    st.integers(4, 14),  # d_in
    st.integers(1, 4),  # r
    st.integers(1, 3),  # k
)


@EXAMPLES
@given(shapes)
def test_components_are_orthogonal_and_sum_to_the_update(dims):
    seed, d_out, d_in, r, k = dims
    c = case(seed, d_out, d_in, r, k)
    sp = split(c["A"], c["s"] * c["B"], c["U"], c["V"])
    parts = {"F": sp.B1 @ sp.A1, "H_in": sp.B1 @ sp.A2, "H_out": sp.B2 @ sp.A1, "O": sp.B2 @ sp.A2}
    dW = c["s"] * c["B"] @ c["A"]
    torch.testing.assert_close(sum(parts.values()), dW, rtol=0, atol=1e-12 * dW.abs().max())
    dense = oracle.components(dW, c["P"], c["Q"])
    scale = float((dW**2).sum())
    for name in COMPONENTS:
        torch.testing.assert_close(parts[name], dense[name], rtol=0, atol=1e-10 * math.sqrt(scale))
        for other in COMPONENTS:
            if other != name:
                assert abs(float((parts[name] * parts[other]).sum())) <= 1e-10 * scale


@EXAMPLES
@given(shapes)
def test_gram_energies_equal_dense_energies(dims):
    seed, d_out, d_in, r, k = dims
    c = case(seed, d_out, d_in, r, k)
    dW = c["s"] * c["B"] @ c["A"]
    energies = component_energies(split(c["A"], c["s"] * c["B"], c["U"], c["V"]))
    dense = {name: float((x**2).sum()) for name, x in oracle.components(dW, c["P"], c["Q"]).items()}
    total = float((dW**2).sum())
    for name in COMPONENTS:
        assert energies[name] == pytest.approx(dense[name], rel=1e-9, abs=1e-12 * total)
    assert sum(energies.values()) == pytest.approx(total, rel=1e-10)
    assert product_energy(c["s"] * c["B"], c["A"]) == pytest.approx(total, rel=1e-12)
    rho = relative_energies(energies)
    assert sum(rho.values()) == pytest.approx(1.0, rel=1e-12)


def test_relative_energies_of_a_zero_update_are_zero():
    assert relative_energies({c: 0.0 for c in COMPONENTS}) == {c: 0.0 for c in COMPONENTS}


def _lbfgs(objective, start: torch.Tensor) -> torch.Tensor:
    """Minimise ``objective`` from ``start`` with L-BFGS in float64 (an independent numerical solver)."""
    x = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=500, tolerance_grad=1e-14, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = objective(x)
        loss.backward()
        return loss

    opt.step(closure)
    return x.detach()


@pytest.mark.parametrize("seed,lam", [(0, 1.0), (1, 0.3), (2, 7.0), (3, 50.0)])
def test_closed_form_equals_a_numerical_minimiser_of_the_stated_objectives(seed, lam):
    """§4: B' = argmin ‖B'−B‖² + λρ_out‖P⊥B'‖², A' = argmin ‖A'−A‖² + λρ_in‖A'Q⊥‖², solved here by L-BFGS
    with dense projectors, from a start away from the answer, and by a dense linear solve."""
    c = case(seed, d_out=10, d_in=8, r=3, k=2)
    A, B, P, Q = c["A"], c["B"], c["P"], c["Q"]
    dW = c["s"] * B @ A
    comp = oracle.components(dW, P, Q)
    total = float((dW**2).sum())
    rho = {n: float((x**2).sum()) / total for n, x in comp.items()}
    rho_out, rho_in = rho["H_out"] + rho["O"], rho["H_in"] + rho["O"]
    assert rho_out > 0.05 and rho_in > 0.05, "the case must leave the subspace on both sides"
    Pp, Qp = torch.eye(10, dtype=F64) - P, torch.eye(8, dtype=F64) - Q

    B_num = _lbfgs(lambda X: ((X - B) ** 2).sum() + lam * rho_out * ((Pp @ X) ** 2).sum(), torch.zeros_like(B))
    A_num = _lbfgs(lambda X: ((X - A) ** 2).sum() + lam * rho_in * ((X @ Qp) ** 2).sum(), torch.zeros_like(A))
    # normal equations of the same objectives: (I + λρ_out P⊥) B' = B,  A' (I + λρ_in Q⊥) = A
    B_solve = torch.linalg.solve(torch.eye(10, dtype=F64) + lam * rho_out * Pp, B)
    A_solve = torch.linalg.solve(torch.eye(8, dtype=F64) + lam * rho_in * Qp, A.T).T

    A_new, B_new = sanitized(A, B, c["s"], c["U"], c["V"], lam)
    torch.testing.assert_close(B_new, B_num, rtol=0, atol=1e-7)
    torch.testing.assert_close(A_new, A_num, rtol=0, atol=1e-7)
    torch.testing.assert_close(B_new, B_solve, rtol=0, atol=1e-12)
    torch.testing.assert_close(A_new, A_solve, rtol=0, atol=1e-12)
    assert (B_new - B).abs().max() > 1e-3 and (A_new - A).abs().max() > 1e-3, "the correction must act"
    # and the product is the §4 matrix form F + γ_in H_in + γ_out H_out + γ_in γ_out O
    torch.testing.assert_close(c["s"] * B_new @ A_new, oracle.factored_delta(dW, P, Q, lam), rtol=0, atol=1e-12)


@EXAMPLES
@given(shapes, st.floats(0.01, 100.0))
def test_gauge_invariance(dims, lam):
    """(B G, G⁻¹ A) is the same update, so it must give the same ΔW'."""
    seed, d_out, d_in, r, k = dims
    c = case(seed, d_out, d_in, r, k)
    g = torch.Generator().manual_seed(seed + 1)
    G = torch.randn(r, r, generator=g, dtype=F64) + 3 * torch.eye(r, dtype=F64)  # well conditioned
    A_new, B_new = sanitized(c["A"], c["B"], c["s"], c["U"], c["V"], lam)
    A_g, B_g = sanitized(torch.linalg.solve(G, c["A"]), c["B"] @ G, c["s"], c["U"], c["V"], lam)
    ref = B_new @ A_new
    torch.testing.assert_close(B_g @ A_g, ref, rtol=0, atol=1e-9 * ref.abs().max())


@EXAMPLES
@given(shapes)
def test_lambda_zero_is_the_identity_bit_for_bit(dims):
    seed, d_out, d_in, r, k = dims
    c = case(seed, d_out, d_in, r, k)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        A, B = c["A"].to(dtype), c["B"].to(dtype)
        A_new, B_new = sanitized(A, B, c["s"], c["U"].to(dtype), c["V"].to(dtype), 0.0)
        assert A_new.dtype == dtype and B_new.dtype == dtype
        assert torch.equal(bits(A_new), bits(A)) and torch.equal(bits(B_new), bits(B))


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor, so that equality is bit for bit (−0.0 ≠ 0.0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


@pytest.mark.parametrize("seed", range(4))
def test_large_lambda_tends_to_the_fully_aligned_part(seed):
    c = case(seed)
    dW = c["s"] * c["B"] @ c["A"]
    F = oracle.components(dW, c["P"], c["Q"])["F"]
    errors = []
    for lam in (1e2, 1e4, 1e6):
        A_new, B_new = sanitized(c["A"], c["B"], c["s"], c["U"], c["V"], lam)
        errors.append(float(torch.linalg.norm(c["s"] * B_new @ A_new - F)))
    scale = float(torch.linalg.norm(dW))
    assert errors[-1] < 1e-5 * scale
    assert errors[0] > errors[1] > errors[2], errors  # monotone: converges, does not just happen to be close


def test_attenuation_factors():
    rho = {"F": 0.4, "H_in": 0.1, "H_out": 0.2, "O": 0.3}
    g_out, g_in = attenuation(rho, 2.0)
    assert g_out == pytest.approx(1 / (1 + 2 * 0.5)) and g_in == pytest.approx(1 / (1 + 2 * 0.4))
    assert attenuation(rho, 0.0) == (1.0, 1.0)


@EXAMPLES
@given(shapes, st.floats(0.0, 20.0))
def test_energies_of_the_corrected_factors_match_the_dense_corrected_update(dims, lam):
    """What the report measures on written factors (Gram energies of their split) against the dense components of
    §4's matrix form ``F + γ_in H_in + γ_out H_out + γ_in γ_out O``."""
    seed, d_out, d_in, r, k = dims
    c = case(seed, d_out, d_in, r, k)
    energies = component_energies(split(c["A"], c["s"] * c["B"], c["U"], c["V"]))
    g_out, g_in = attenuation(relative_energies(energies), lam)
    A_new, B_new = factored_update(c["A"], c["B"], c["U"], c["V"], g_out, g_in)
    dense_after = oracle.components(oracle.factored_delta(c["s"] * c["B"] @ c["A"], c["P"], c["Q"], lam), c["P"],
                                    c["Q"])  # fmt: skip
    total = sum(energies.values())
    for name, e in component_energies(split(A_new, c["s"] * B_new, c["U"], c["V"])).items():
        assert e == pytest.approx(float((dense_after[name] ** 2).sum()), rel=1e-8, abs=1e-12 * total)


@EXAMPLES
@given(shapes)
def test_safe_lora_score_equals_the_dense_cosine(dims):
    seed, d_out, d_in, r, _ = dims
    c = case(seed, d_out, d_in, r)
    expected = oracle.safe_lora_score(c["B"] @ c["A"], c["D"])
    assert safe_lora_score(c["A"], c["B"], c["D"]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the product passes float32 D and the stored (possibly low-precision) factors
    got32 = safe_lora_score(c["A"].float(), c["B"].float(), c["D"].float())
    assert got32 == pytest.approx(expected, abs=1e-5)
    assert safe_lora_score(c["A"], c["s"] * c["B"], c["D"]) == pytest.approx(expected, rel=1e-9)  # scaling cancels


def test_safe_lora_score_of_degenerate_inputs_is_zero():
    c = case(0)
    assert safe_lora_score(c["A"], c["B"], torch.zeros_like(c["D"])) == 0.0
    assert safe_lora_score(c["A"], torch.zeros_like(c["B"]), c["D"]) == 0.0


@EXAMPLES
@given(shapes)
def test_subspace_score_is_the_cosine_with_the_truncated_c(dims):
    """The score reported under the default method (and gated by --min-safe-lora-score):
    C_k = U_k Σ_k² U_kᵀ / ‖D‖_F. With k = rank(D) it is Safe LoRA's own score."""
    seed, d_out, d_in, r, k = dims
    c = case(seed, d_out, d_in, r, k)
    U, S, _ = torch.linalg.svd(c["D"], full_matrices=False)
    dW = c["B"] @ c["A"]
    Ck = U[:, :k] @ torch.diag(S[:k] ** 2) @ U[:, :k].T
    x = (Ck @ dW).flatten()
    expected = float(x @ dW.flatten() / (torch.linalg.norm(x) * torch.linalg.norm(dW)))
    assert safe_lora_score_subspace(c["A"], c["B"], U[:, :k], S[:k]) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    full = safe_lora_score_subspace(c["A"], c["B"], U[:, :4], S[:4])  # case() builds D of rank 4
    assert full == pytest.approx(oracle.safe_lora_score(dW, c["D"]), rel=1e-9, abs=1e-12)
    assert safe_lora_score_subspace(c["A"], c["B"], U[:, :0], S[:0]) == 0.0
