"""The cast's loss on written updates (issue 22, items 2, 8, 9): the report's ``write_error`` per method, form and
dtype on one synthetic module whose update lies mostly in the subspace (so that erasing ``F`` leaves a small
``X*``: the terms of the block form cancel), and ``correction_lost`` of a bf16 full weight.

    .venv/bin/python scripts/write_loss.py   # prints a Markdown table (docs/methods.md, docs/models.md)
"""

from __future__ import annotations

import math

import torch

from csulora import Settings
from csulora.io.adapters import DenseModule, LoraModule
from csulora.io.layouts import Target
from csulora.methods import METHODS
from csulora.methods.base import DenseUpdate
from csulora.subspace import safety_subspace

D_OUT, D_IN, R, K = 512, 384, 8, 8


def orthonormal(n: int, k: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, k, generator=g, dtype=torch.float64)).Q


def world(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    U, V = orthonormal(D_OUT, 32, g), orthonormal(D_IN, 32, g)
    D = (U * (0.05 * 1.15 ** -torch.arange(32.0, dtype=torch.float64))) @ V.T
    # an update whose factors lie mostly in the top-K subspace: ‖X*‖ ≈ 0.1 ‖ΔW‖ once F is erased
    B = U[:, :R] @ torch.randn(R, R, generator=g, dtype=torch.float64) + 0.01 * torch.randn(D_OUT, R, generator=g,
                                                                                           dtype=torch.float64)
    A = torch.randn(R, R, generator=g, dtype=torch.float64) @ V[:, :R].T
    return D.float(), 1e-2 * A, 1e-2 * B


def main() -> None:
    D, A, B = world()
    sub = safety_subspace(D, rank=K, exact=True)
    cases = [("realign", {"lam": math.inf, "beta": 0.0}), ("realign", {"lam": 4.0, "beta": 0.25}),
             ("csulora", {"lam": 64.0}), ("resta", {"gamma": 0.5})]  # fmt: skip
    print("| method | settings | dtype | factored write_error | block write_error | ‖X‖/‖ΔW‖ (block) |")
    print("|---|---|---|---|---|---|")
    for method, values in cases:
        for dtype in (torch.bfloat16, torch.float16):
            errors, ratio = {}, None
            for form in ("factored", "block"):
                module = LoraModule("m", A.to(dtype), B.to(dtype), rank=R, alpha=2.0 * R, scaling=2.0)
                res = METHODS[method].correct(module, sub, Settings(method=method, form=form, subspace_rank=K,
                                                                    **values), None)  # fmt: skip
                errors[form] = res.row.write_error
                if form == "block":
                    ratio = res.row.update_norm_after / res.row.update_norm
            words = ", ".join(f"{k} = {v:g}" for k, v in values.items())
            print(f"| {method} | {words} | {str(dtype).removeprefix('torch.')} | {errors['factored']:.3%} | "
                  f"{errors['block']:.3%} | {ratio:.3f} |")
    print()
    g = torch.Generator().manual_seed(1)
    print("| bf16 full weight | method | ‖X − ΔW‖/‖ΔW‖ | correction_lost | write_error |")
    print("|---|---|---|---|---|")
    for scale in (3e-3, 3e-2):
        W_a = (0.5 * torch.randn(D_OUT, D_IN, generator=g)).bfloat16()
        W = (W_a.float() + scale * torch.randn(D_OUT, D_IN, generator=g)).bfloat16()
        for method, values in (("csulora", {"lam": 64.0}), ("realign", {"lam": 4.0, "beta": 0.25})):
            update = DenseUpdate.of(DenseModule("m", "m.weight", W, Target("m.weight")), W_a, torch.device("cpu"))
            res = METHODS[method].correct_dense(update, sub, Settings(method=method, subspace_rank=K, **values), None)
            row = res.row
            print(f"| entries of W ≈ 0.5, of ΔW ≈ {scale:g} | {method} | {row.correction_norm / row.update_norm:.3f} | "
                  f"{row.correction_lost:.1%} | {row.write_error:.2%} |")


if __name__ == "__main__":
    main()
