"""Float32-or-wider arithmetic on narrow inputs: widen each input exactly once, cast each result back once.

The math runs in float32 (dense weights of 16- and 32-bit checkpoints), float64 (factors, and dense weights of
float64 checkpoints); checkpoints and adapters are often bf16 or fp16.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import CsuloraError

NARROW = (torch.bfloat16, torch.float16)


def all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite, in one float64 sum: NaN and Inf propagate through it, and finite values of any
    float dtype (≤ 3.4e38 each) cannot overflow it. 8× faster than ``isfinite(t).all()`` on bf16 here."""
    return math.isfinite(float(t.sum(dtype=torch.float64)))
WRITE_LOSS_ULPS = 4  # a written product erring by more than this many unit roundoffs of its dtype is reported
WRITE_LOSS_FLOOR = 1e-4  # ... and by more than this (float32's 4 u, 2.4e-7, is noise where terms cancel)


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32 or wider, a new tensor: bfloat16 by moving its bits into the upper half of a float32
    (exact), float16 through numpy's converter, both vectorized (3× faster than torch's CPU casts here); float32
    and float64 are copied as they are (DESIGN.md §10: "float32 or wider", so float64 is never narrowed)."""
    if t.dtype == torch.float64:
        return t.clone()
    if t.device.type != "cpu" or t.dtype not in NARROW:
        return t.to(torch.float32, copy=True)
    if t.dtype == torch.float16:
        return torch.from_numpy(t.contiguous().view(torch.int16).numpy().view(np.float16).astype(np.float32))
    out = np.empty(t.shape, dtype=np.uint32)
    np.left_shift(t.contiguous().view(torch.int16).numpy().view(np.uint16), 16, out=out, dtype=np.uint32)
    return torch.from_numpy(out.view(np.float32))


def wide_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the math on ``tensors`` runs in: float64 if any is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half the distance from 1 to the next value of ``dtype``: the relative error of one correct rounding."""
    return torch.finfo(dtype).eps / 2 if dtype.is_floating_point else 0.0


def write_loss_limit(dtype: torch.dtype) -> float:
    """The relative error of a written product past which the report notes it and warns: ``4 u`` of the dtype
    (bf16 1.6 %, fp16 0.2 %; one correct rounding costs about ``u/√3``), at least ``1e-4``."""
    return max(WRITE_LOSS_ULPS * unit_roundoff(dtype), WRITE_LOSS_FLOOR)


def round_to_odd_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` (float64) rounded to float32 *to odd*: truncated toward zero, with the last bit set when inexact.

    A float32 holds more than ``p + 2`` bits of a bf16 (``p = 8``) or fp16 (``p = 11``) value, so rounding the
    result of this correctly to bf16 or fp16 rounds ``x`` once, correctly (Boldo & Melquiond, "Emulation of
    FMA and correctly rounded sums: proved algorithms using rounding to odd", IEEE TC 2008). torch's own
    float64 → bf16 cast rounds to nearest float32 first, which can round twice."""
    y = x.to(torch.float32)
    wide = y.double()
    over = wide.abs() > x.abs()  # rounded away from zero: step back one float32 toward zero
    y = torch.where(over, torch.nextafter(y, torch.zeros_like(y)), y)
    inexact = y.double() != x
    return torch.where(inexact, y.view(torch.int32) | 1, y.view(torch.int32)).view(torch.float32)


def cast_back(x: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Cast a corrected tensor (computed in float32 or wider) back to the input's dtype on the CPU, once.

    Values that do not fit ``dtype`` (fp16 saturates at 65504) are an error, not a silent Inf or clamp:
    the written adapter must mean what the report says. A float64 tensor cast to bf16 or fp16 is rounded once,
    correctly (``round_to_odd_float32``), not through a float32 rounding first.
    """
    # one pass: aminmax propagates NaN and Inf, where isfinite, abs and max would be three (17× slower here)
    lo, hi = (float(v) for v in torch.aminmax(x)) if x.numel() else (0.0, 0.0)
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise CsuloraError(f"{what}: the corrected values are not finite; the adapter's values are too large")
    if dtype.is_floating_point:
        largest, limit = max(-lo, hi), torch.finfo(dtype).max
        if largest > limit:
            raise CsuloraError(
                f"{what}: a corrected value ({largest:.6g}) does not fit {str(dtype).removeprefix('torch.')} "
                f"(max {limit:.6g}); convert the input to float32 or bfloat16 and rerun"
            )
    if x.dtype == torch.float64 and dtype in NARROW:
        x = round_to_odd_float32(x)
    return x.to("cpu", dtype).contiguous()
