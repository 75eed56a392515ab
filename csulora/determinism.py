"""Same bytes whatever the thread count: the per-module linear algebra runs on one CPU thread.

MKL's LAPACK (QR and SVD inside the randomized SVD) and ATen's parallel reductions (norms, sums)
split their work by thread count, which changes the rounding of the results in the last bits, and
so the written adapter and report. Pinning the math to one intra-op thread makes the output a
function of the inputs and options only (on one machine and torch build). It costs little: reading
the checkpoints dominates, and the matrices of one module are small for a multi-threaded LAPACK.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MATH_THREADS = 1


@contextmanager
def fixed_threads(n: int = MATH_THREADS) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the caller's setting. Nested in a block that set
    ``n`` already (the module workers of ``parallel.py``), it touches nothing: the pool is not resized while
    other threads compute."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
