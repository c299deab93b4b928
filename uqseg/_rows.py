"""Per-image work on a batch split over threads.

The quality features are computed image by image from arrays already in memory; most of their
time is in numpy reductions and ufuncs, which release the GIL.
After the network pass the cores are idle, so splitting the batch's rows over threads shortens
the wall time of that serial tail (``uqseg.assess``, ``QualityRegressor.predict``); every row
is computed exactly as before, so the result is the same, bit for bit.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: below this many rows per thread the split costs more than it saves
MIN_ROWS_PER_THREAD = 4
MAX_THREADS = 4


def usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def map_rows(fn, *arrays, threads: int | None = None) -> np.ndarray:
    """``fn(*arrays)`` computed on row blocks in threads and stacked along axis 0.

    ``fn`` must treat each row (axis 0) independently and return an array with one row per
    input row; ``None`` entries of ``arrays`` are passed through unchanged. (Matrix products
    do not qualify: BLAS rounds a row differently with the number of rows.)
    """
    n = next(len(a) for a in arrays if a is not None)
    k = min(threads or usable_cpus(), MAX_THREADS, n // MIN_ROWS_PER_THREAD)
    if k < 2:
        return fn(*arrays)
    edges = np.linspace(0, n, k + 1).astype(int)

    def part(i):
        s = slice(edges[i], edges[i + 1])
        return fn(*(None if a is None else a[s] for a in arrays))

    with ThreadPoolExecutor(max_workers=k) as pool:
        return np.concatenate(list(pool.map(part, range(k))))
