"""Modules processed side by side: one module per worker thread, results in the modules' order.

Each module's math runs on one intra-op thread (``determinism.py``), so its bytes do not depend on which worker
ran it or when; workers overlap one module's reading with another's SVD and use every core. Torch releases the
GIL in its kernels and file reads release it too, so threads are enough. At most ``2 × workers`` results wait
to be consumed: memory stays bounded when the consumer (a shard writer) is slower than the workers.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")
MAX_WORKERS = 8  # beyond this, reading the checkpoints is the limit, and memory grows with each worker


def default_workers(device: str = "cpu") -> int:
    """The cores this process may use (capped); one on a GPU, whose kernels are already parallel."""
    if device not in ("cpu", "auto"):
        return 1
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def ordered(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[tuple[T, R]]:
    """``(item, fn(item))`` in the order of ``items``, computed on ``workers`` threads with bounded lookahead.
    An exception in ``fn`` is raised here, at its item; the work not yet started is cancelled."""
    items = iter(items)
    if workers <= 1:
        for item in items:
            yield item, fn(item)
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="csulora") as pool:
        pending: deque = deque()
        try:
            for item in items:
                pending.append((item, pool.submit(fn, item)))
                if len(pending) >= 2 * workers:
                    item0, future = pending.popleft()
                    yield item0, future.result()
            while pending:
                item0, future = pending.popleft()
                yield item0, future.result()
        finally:
            for _, future in pending:
                future.cancel()
