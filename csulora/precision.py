"""Float32-or-wider arithmetic on narrow inputs: widen each input exactly once, cast each result back once.

The math runs in float32 (dense weights) or float64 (factors); checkpoints and adapters are often bf16 or fp16.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .errors import CsuloraError


def widen(t: torch.Tensor) -> torch.Tensor:
    """``t`` as float32, a new tensor: bfloat16 by moving its bits into the upper half of a float32 (exact), float16
    through numpy's converter, both vectorized (3× faster than torch's CPU casts here); float32 is copied."""
    if t.device.type != "cpu" or t.dtype not in (torch.bfloat16, torch.float16):
        return t.to(torch.float32, copy=True)
    if t.dtype == torch.float16:
        return torch.from_numpy(t.contiguous().view(torch.int16).numpy().view(np.float16).astype(np.float32))
    out = np.empty(t.shape, dtype=np.uint32)
    np.left_shift(t.contiguous().view(torch.int16).numpy().view(np.uint16), 16, out=out, dtype=np.uint32)
    return torch.from_numpy(out.view(np.float32))


def cast_back(x: torch.Tensor, dtype: torch.dtype, what: str) -> torch.Tensor:
    """Cast a corrected tensor (computed in float32 or wider) back to the input's dtype on the CPU, once.

    Values that do not fit ``dtype`` (fp16 saturates at 65504) are an error, not a silent Inf or clamp:
    the written adapter must mean what the report says.
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
    return x.to("cpu", dtype).contiguous()
