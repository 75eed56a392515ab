"""Safety subspace of one layer from its displacement ``D = W_a − W_b`` (DESIGN.md §2).

Pure functions over tensors: no file access here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .precision import wide_dtype, widen

# The randomized SVD's tolerance (docs/design-notes.md, docs/rsvd.md): the computed k-dim subspace holds at least
# 1 − ENERGY_TOLERANCE of the exact top-k energy Σ_{i≤k} σ_i² of D, and the sanitized adapters of the shipped
# worlds stay within 1 % of the exact-SVD result. NITER and OVERSAMPLE are the cheapest setting measured to hold
# it on flat spectra (scripts/bench_rsvd.py). A change changes every subspace: the cache key holds both.
ENERGY_TOLERANCE = 0.01
OVERSAMPLE = 10
NITER = 3
FIRST_GUESS = 32  # initial rank of the adaptive randomized SVD when k is chosen by energy


@dataclass(frozen=True)
class Subspace:
    """``U_k`` ``(d_out, k)``, ``Σ_k`` ``(k,)``, ``V_k`` ``(d_in, k)`` and the energies that describe them."""

    U: Tensor
    S: Tensor
    V: Tensor
    total_energy: float  # ‖D‖_F², exact
    captured_energy: float  # ‖Uᵀ D V‖_F² = ‖P D Q‖_F², exact even when the SVD is randomized

    @property
    def k(self) -> int:
        return int(self.S.numel())

    @property
    def captured_fraction(self) -> float:
        # ≤ 1 up to float32 rounding of U, V; when k reaches the rank of D that rounding can show as 1 + 1e-7
        return min(1.0, self.captured_energy / self.total_energy) if self.total_energy > 0 else 0.0


def displacement(w_aligned: Tensor, w_base: Tensor) -> Tensor:
    """Displacement (§1): ``D = W_a − W_b``, computed in float32, or float64 when either weight is float64 (both
    widened exactly, then subtracted)."""
    a, b = widen(w_aligned), widen(w_base)
    dtype = wide_dtype(a, b)
    return a.to(dtype).sub_(b.to(dtype))


def energy_rank(S: Tensor, total_energy: float, eta: float) -> int:
    """Energy rule (§2): the smallest ``k`` with ``Σ_{i≤k} σ_i² ≥ η ‖D‖_F²`` (``len(S)`` if none)."""
    cumulative = torch.cumsum(S.double() ** 2, 0)
    reached = torch.nonzero(cumulative >= eta * total_energy)
    return int(reached[0]) + 1 if len(reached) else int(S.numel())


def exact_svd(D: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``D = U Σ Vᵀ`` (the oracle path)."""
    U, S, Vh = torch.linalg.svd(D, full_matrices=False)
    return U, S, Vh.T


def randomized_svd(D: Tensor, q: int, seed: int, niter: int = NITER) -> tuple[Tensor, Tensor, Tensor]:
    """Randomized SVD of rank ``q`` (Halko, Martinsson & Tropp 2011: the range finder with ``niter`` power
    iterations and a QR after every product, Alg. 4.4, then Alg. 5.1; what ``torch.svd_lowrank`` computes).

    Its own seeded generator makes it a function of ``D`` and ``seed`` alone, whichever thread runs it
    (``torch.svd_lowrank`` draws from the global generator, which worker threads share). Products by ``Dᵀ``
    are taken as ``(YᵀD)ᵀ``: the CPU's BLAS runs that 1.5–2× faster than a product by the transposed view."""
    g = torch.Generator(device=D.device).manual_seed(seed)
    Q = torch.linalg.qr(D @ torch.randn(D.shape[1], q, generator=g, device=D.device, dtype=D.dtype)).Q
    for _ in range(niter):
        Q = torch.linalg.qr((Q.mT @ D).mT).Q
        Q = torch.linalg.qr(D @ Q).Q
    U, S, Vh = torch.linalg.svd(Q.mT @ D, full_matrices=False)
    return Q @ U, S, Vh.mT


def _top(D: Tensor, want: int, exact: bool, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    """The top ``want`` singular triplets; exact when asked or when oversampling would cover D anyway."""
    if exact or want + OVERSAMPLE >= min(D.shape):
        U, S, V = exact_svd(D)
    else:
        U, S, V = randomized_svd(D, want + OVERSAMPLE, seed, NITER)
    return U[:, :want], S[:want], V[:, :want]


def squared_norm(D: Tensor) -> float:
    """``‖D‖_F²`` in one pass over ``D``: float32 row norms, their squares summed in float64 (relative error
    ~1e-8, where one float32 norm of a whole layer errs by up to 1e-3, and a float64 one is 20× slower). NaN or
    Inf anywhere in ``D`` makes it so."""
    return float((torch.linalg.vector_norm(D, dim=-1).double() ** 2).sum())


def safety_subspace(
    D: Tensor,
    *,
    rank: int | None = None,
    energy: float = 0.5,
    max_rank: int = 256,
    exact: bool = False,
    seed: int = 0,
    total: float | None = None,
) -> Subspace:
    """Safety subspace (§2): truncated SVD ``D ≈ U_k Σ_k V_kᵀ`` with ``k`` fixed or set by energy ``η``.

    With the energy rule the randomized SVD grows its rank (32, 64, …, ``max_rank``) until the
    computed spectrum reaches ``η``. A zero displacement gives an empty subspace (``k = 0``). ``total``:
    ``‖D‖_F²`` when the caller has it (``squared_norm(D)``). The captured energy ``‖Uᵀ D V‖² = Σ_{i≤k} σ_i²`` is exact
    for the randomized SVD too: its ``σ_i`` are the singular values of ``QᵀD`` and ``U = Q Ũ``, ``V = Ṽ`` its
    singular vectors, so ``Uᵀ D V = Σ``.
    """
    total = squared_norm(D) if total is None else total
    cap = min(max_rank, *D.shape)
    if total == 0.0 or cap == 0 or rank == 0:
        return _empty(D, total)
    if rank is not None:
        U, S, V = _top(D, min(rank, cap), exact, seed)
        k = min(rank, cap)
    else:
        want = cap if exact else min(FIRST_GUESS, cap)
        while True:
            U, S, V = _top(D, want, exact, seed)
            k = energy_rank(S, total, energy)
            if k < want or want == cap:
                break
            want = min(2 * want, cap)
    U, S, V = U[:, :k], S[:k], V[:, :k]
    # directions below the numerical rank of D carry no displacement, only rounding noise (rank_cut reports it)
    keep = S > S[0] * max(D.shape) * torch.finfo(D.dtype).eps if k else S > 0
    U, S, V = U[:, keep], S[keep], V[:, keep]
    return Subspace(U=U, S=S, V=V, total_energy=total, captured_energy=float((S.double() ** 2).sum()))


def rank_cut(k: int, shape: tuple[int, ...] | list[int], rank: int | None, max_rank: int) -> int | None:
    """The ``k`` the fixed-rank rule (§2) asked for, ``min(rank, cap, d_out, d_in)``, when the subspace holds fewer
    directions (``k``): ``safety_subspace`` drops those whose ``σ_i ≤ max(d_out, d_in)·ε·σ_1`` (``ε`` of ``D``'s
    dtype: numpy's ``matrix_rank`` tolerance), since their singular vectors are rounding noise. None when nothing
    was cut, or under the energy rule, where a dropped direction holds under ``(max(d)·ε)²`` of ``σ_1²``, too
    little to move the captured fraction."""
    if rank is None or k == 0:  # k = 0: D = 0, reported as an empty subspace
        return None
    want = min(rank, max_rank, *shape)
    return want if k < want else None


def _empty(D: Tensor, total: float) -> Subspace:
    d_out, d_in = D.shape
    return Subspace(
        U=D.new_zeros(d_out, 0), S=D.new_zeros(0), V=D.new_zeros(d_in, 0), total_energy=total, captured_energy=0.0
    )
