"""One pool of threads for work that lets go of the GIL (the C kernels through ctypes, numpy's sorts):
`each(work, count)` runs work(0) .. work(count - 1) at once, the last on the calling thread."""

from __future__ import annotations

import functools
import os
from concurrent.futures import ThreadPoolExecutor


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="composer-compute")


def each(work, count: int) -> None:
    pending = [_pool().submit(work, index) for index in range(count - 1)]
    if count:
        work(count - 1)
    for future in pending:
        future.result()
