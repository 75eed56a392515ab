"""The block form (DESIGN.md §4) and Safe LoRA (§5) as pure functions, against the dense oracle."""

from __future__ import annotations

import pytest
import torch

from csulora.correction import (
    block_attenuation,
    block_update,
    component_energies,
    relative_energies,
    safe_lora_project,
    safe_lora_score,
    split,
)
from csulora.methods.safe_lora import selection as safe_lora_selection
from csulora.subspace import exact_svd
from tests import oracle


def _case(seed: int, d_out=24, d_in=18, r=3, k=4):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    sB = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    D = torch.randn(d_out, 6, generator=g, dtype=torch.float64) @ torch.randn(6, d_in, generator=g, dtype=torch.float64)
    U, _, V = exact_svd(D)
    return A, sB, D, U[:, :k], V[:, :k]


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 7.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_block_update_equals_dense_formula(seed, lam):
    A, sB, D, U, V = _case(seed)
    sp = split(A, sB, U, V)
    energies = component_energies(sp)
    gamma_h, gamma_o = block_attenuation(relative_energies(energies), lam)
    A_new, B_new = block_update(sp, gamma_h, gamma_o)
    assert A_new.shape == (2 * A.shape[0], A.shape[1]) and B_new.shape == (sB.shape[0], 2 * sB.shape[1])
    P, Q = oracle.projectors(D, U.shape[1])
    expected = oracle.block_delta(sB @ A, P, Q, lam)
    torch.testing.assert_close(B_new @ A_new, expected, rtol=1e-10, atol=1e-10)
    # the energies the report states are those of the written update
    after = oracle.components(B_new @ A_new, P, Q)
    for c, e in component_energies(split(A_new, B_new, U, V)).items():
        assert float((after[c] ** 2).sum()) == pytest.approx(e, rel=1e-9, abs=1e-12)


def test_block_update_minimises_its_objective():
    """X is the minimiser of ‖X − ΔW‖² + λ(ρ_H ‖Π_H X‖² + ρ_O ‖Π_O X‖²) with Π_F X = F: any feasible step
    (Π_F E = 0) raises the objective."""
    A, sB, D, U, V = _case(3)
    lam = 2.0
    P, Q = oracle.projectors(D, U.shape[1])
    dW = sB @ A
    c = oracle.components(dW, P, Q)
    total = sum(float((x**2).sum()) for x in c.values())
    rho_h = float((c["H_in"] ** 2).sum() + (c["H_out"] ** 2).sum()) / total
    rho_o = float((c["O"] ** 2).sum()) / total

    def objective(X):
        parts = oracle.components(X, P, Q)
        h = float((parts["H_in"] ** 2).sum() + (parts["H_out"] ** 2).sum())
        return float(((X - dW) ** 2).sum()) + lam * (rho_h * h + rho_o * float((parts["O"] ** 2).sum()))

    X = oracle.block_delta(dW, P, Q, lam)
    g = torch.Generator().manual_seed(9)
    for _ in range(20):
        E = torch.randn(dW.shape, generator=g, dtype=torch.float64)
        E = E - P @ E @ Q  # keep Π_F X = F
        assert objective(X + 1e-3 * E) > objective(X)


def test_block_update_lambda_zero_keeps_the_product():
    A, sB, _, U, V = _case(4)
    A_new, B_new = block_update(split(A, sB, U, V), 1.0, 1.0)
    torch.testing.assert_close(B_new @ A_new, sB @ A, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed", [0, 5])
def test_safe_lora_projection_and_score_equal_dense_formula(seed):
    A, B, D, _, _ = _case(seed)
    C = oracle.safe_lora_matrix(D)
    torch.testing.assert_close(safe_lora_project(B, D), C @ B, rtol=1e-10, atol=1e-12)
    assert safe_lora_score(A, B, D) == pytest.approx(oracle.safe_lora_score(B @ A, D), rel=1e-9)


def test_safe_lora_selection_rules():
    scores = {"a": 0.9, "b": 0.2, "c": 0.5, "d": -0.1, "e": 0.2}
    assert safe_lora_selection(scores, 0.5, None) == ["b", "c", "d", "e"]  # ≤ τ, inclusive
    assert safe_lora_selection(scores, 0.0, None) == ["d"]
    assert safe_lora_selection(scores, 0.5, 2) == ["b", "d"]  # the 2 lowest, ties by name
    assert safe_lora_selection(scores, 0.5, 10) == sorted(scores)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "safe-lora", "form": "block"}, "--form block does not apply to it"),
        ({"method": "safe-lora", "top_n": 0}, "--top-n must be ≥ 1"),
        ({"form": "blocky"}, "use one of factored, block"),
        ({"method": "safelora"}, "use one of csulora, realign, safe-lora"),
    ],
)
def test_method_settings_refuse_bad_combinations(kwargs, message):
    from csulora import Settings
    from csulora.errors import CsuloraError
    from csulora.methods import validate

    with pytest.raises(CsuloraError, match=message):
        validate(Settings(**kwargs))


def test_cli_takes_one_safe_lora_rule():
    from csulora.errors import CsuloraError
    from csulora.options import Options
    from csulora.settings import METHOD_DEFAULTS

    with pytest.raises(CsuloraError, match="pass one"):
        Options(method="safe-lora", threshold=0.3, top_n=2).settings()
    with pytest.raises(CsuloraError, match="apply to --method safe-lora only"):
        Options(method="csulora", top_n=2).settings()
    with pytest.raises(CsuloraError, match="--beta applies to --method realign only"):
        Options(method="csulora", beta=0.5).settings()
    assert Options(method="safe-lora").settings().resolved().threshold == METHOD_DEFAULTS["safe-lora"]["threshold"]
    assert Options(method="safe-lora", threshold=0.5).settings().resolved().threshold == 0.5  # the paper's τ
