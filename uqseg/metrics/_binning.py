"""Per-block kernels of the streaming calibration statistics (numpy only).

One block of ``b`` images by ``v`` voxels arrives as ``K`` contiguous class planes. The kernels
take the top-label confidence and label with a few passes over the planes, bin the confidences
exactly like ``np.searchsorted`` on the bin edges (in the data's dtype) and histogram them with
one scatter of packed weights. For float32 and 2, 3, 5, 7 or 15 bins the binning, packing and
scatter are fused (:func:`fused_histogram`); otherwise :func:`uniform_bins` and
:func:`packed_histogram` (or :func:`separate_histogram`). Where the time goes is in
``docs/benchmarks.md`` ("Memory bandwidth (issue 21)").
"""

from __future__ import annotations

import functools
import math

import numpy as np


def top_label(planes, work_dtype):
    """``(confidence, predicted label)`` of the class planes (first maximum wins, as argmax).

    Numpy reduces a short class axis slowly; one pass per class plane is faster.
    """
    k = len(planes)
    small = np.int8 if k < 128 else np.intp
    better = np.greater(planes[1], planes[0])
    conf = np.maximum(planes[0], planes[1], dtype=work_dtype)
    pred = better.view(np.int8) if small is np.int8 else better.astype(small)
    if k > 2:
        flag = np.empty_like(better)
        step = np.empty_like(pred)
        for c in range(2, k):
            np.greater(planes[c], conf, out=flag)
            # pred = where(flag, c, pred) as max(pred, c * flag): c exceeds every earlier label
            # (integer arithmetic; a masked copy is 50x slower)
            np.multiply(flag.view(np.int8) if small is np.int8 else flag, small(c), out=step)
            np.maximum(pred, step, out=pred)
            np.maximum(conf, planes[c], out=conf)
    return conf, pred


def rows_look_valid(p, planes, conf, work_dtype) -> bool:
    """Values in ``[-1e-6, 1 + 1e-6]`` and class sums within 1e-3 of 1 (NaN fails), as
    ``check_scores`` asks; ``conf`` is the class maximum, so it gives the largest value."""
    lo, hi = float(p.min()), float(conf.max())
    total = np.add(planes[0], planes[1], dtype=work_dtype)
    for pc in planes[2:]:
        np.add(total, pc, out=total)
    # |s - 1| is exact in floating point near 1, so the extremes give max |s - 1|
    dev = max(float(total.max()) - 1.0, 1.0 - float(total.min()))
    return lo >= -1e-6 and hi <= 1 + 1e-6 and dev <= 1e-3


def uniform_bins(conf, n_bins: int, inner_edges):
    """Bin of each confidence for ``n_bins`` equal-width bins ``(lo, hi]`` on [0, 1]: equal to
    ``np.searchsorted(inner_edges, conf)`` (int32).

    ``trunc(conf * n_bins)`` is that bin unless the product lies within rounding distance of an
    integer (edges are rounded too); those few confidences are binned by ``searchsorted``.
    """
    t = conf * conf.dtype.type(n_bins)
    b = t.astype(np.int32)
    np.minimum(b, n_bins - 1, out=b)  # confidences up to 1 + 1e-6 are allowed
    gap = np.rint(t)
    gap -= t
    np.abs(gap, out=gap)
    # rounding of the product and of the edges: below n_bins * 2 eps; 4x margin
    near = 4 * n_bins * float(np.finfo(conf.dtype).eps)
    if gap.size and float(gap.min()) < near:
        idx = np.flatnonzero(gap < near)
        b[idx] = np.searchsorted(inner_edges, conf[idx], side="left")
    return b


@functools.lru_cache(maxsize=8)
def _run_offsets(n: int, q: int, n_bins: int):
    """Each voxel's run ``i >> q`` times the bins of a run, read-only (cached per block shape)."""
    off = (np.arange(n, dtype=np.int32) >> q) * np.int32(2 * n_bins)
    off.flags.writeable = False
    return off


def packed_run_log2(conf) -> int | None:
    """Largest ``q`` whose runs of ``2**q`` float32 confidences pack exactly into float64
    (see :func:`packed_histogram`); None when none does (other dtypes, tiny confidences)."""
    if conf.dtype != np.float32 or conf.size == 0:
        return None
    cmin = float(conf.min())
    if not cmin > 0:
        return None
    low = math.frexp(cmin)[1] - 24  # lowest bit a float32 >= cmin can have
    # run sums stay below 2**(2q + 2); every bit from 2**low up must fit in 53
    q = min(13, (51 + low) // 2)
    return q if q >= 8 else None


def packed_histogram(b, correct, conf, n_bins: int, q: int):
    """``(counts (n_bins, 2) by correctness, confidence sums (n_bins,))`` from one bincount.

    Each voxel weighs ``conf + 2**(q + 1)``: a float64 sum over at most ``2**q`` voxels holds
    the count in its high bits and the confidence sum, exactly, in its low bits (``q`` from
    :func:`packed_run_log2` keeps every bit within the 53-bit mantissa). The block is cut into
    runs of ``2**q`` voxels with bins of their own. Exact, so the result equals
    :func:`separate_histogram` bit for bit at about half the cost.
    """
    col = np.left_shift(b, 1)
    col += correct
    x = float(2 ** (q + 1))  # above any run's confidence sum (< 2**q * (1 + 1e-6))
    s = _scatter_runs(col, np.add(conf, np.float64(x)), q, 2 * n_bins)
    s = s.reshape(-1, n_bins, 2)
    counts = np.floor(s * (1.0 / x))
    s -= counts * x
    return counts.sum(axis=0), s.sum(axis=(0, 2))


def separate_histogram(b, correct, conf, n_bins: int):
    """The same as :func:`packed_histogram` with two bincounts (any dtype, any range)."""
    b2 = np.left_shift(b, 1, dtype=np.intp)
    b2 += correct
    counts = np.bincount(b2, minlength=2 * n_bins).reshape(n_bins, 2)
    return counts, np.bincount(b, weights=conf, minlength=n_bins)


# ---------------------------------------------------------------- fused float32 path
try:  # scipy's sparse-to-dense scatter: the histogram loop without bincount's extra passes
    from scipy.sparse._sparsetools import csr_todense as _csr_todense
except ImportError:  # pragma: no cover - private scipy module moved: bincount below
    _csr_todense = None


@functools.lru_cache(maxsize=16)
def ceil_multiplier(n_bins: int):
    """``float32(n_bins)`` when ``ceil(float32(n_bins * x)) - 1 == searchsorted(e, x)`` for
    every float32 ``x`` in ``(0, 1 + 1e-6]`` (``e`` the float32 inner edges), else None (then
    :func:`uniform_bins` bins).

    ``x -> ceil(fl(m * x))`` is non-decreasing, so agreeing on each edge and on the next float32
    above it is agreeing everywhere: checked here exactly. It holds for 2, 3, 5, 7 and 15 bins
    (not for 10 or 20, where the rounded product of an edge's neighbour lands on the edge).
    """
    if n_bins > 61:  # column indices (below 2 * n_bins + 4) must fit int8
        return None
    e = np.linspace(0.0, 1.0, n_bins + 1).astype(np.float32)[1:-1]
    up = np.nextafter(e, np.float32(2))
    j = np.arange(1, n_bins, dtype=np.float32)
    m = np.float32(n_bins)
    one, top = np.ceil(m * np.float32([1.0, 1 + 1e-6]))  # 1 + 1e-6 still passes validation
    ok = np.all(np.ceil(e * m) <= j) and np.all(np.ceil(up * m) >= j + 1)
    return m if ok and one == n_bins and top <= n_bins + 1 else None


@functools.lru_cache(maxsize=8)
def _run_starts(n: int, q: int):
    """Row pointers of runs of ``2**q`` voxels (read-only, cached per block shape)."""
    ptr = np.minimum(np.arange(((n - 1) >> q) + 2, dtype=np.int64) << q, n).astype(np.int32)
    ptr.flags.writeable = False
    return ptr


_SCATTER_OK = [_csr_todense is not None]


def _scatter_runs(col, w, q: int, n_col: int):
    """``(runs, n_col)`` sums of ``w`` by column ``col`` within each run of ``2**q`` voxels."""
    n = col.size
    n_run = ((n - 1) >> q) + 1
    if _SCATTER_OK[0] and n < 2**31:  # int32 row pointers
        # the private loop does not check bounds: an index outside would write anywhere
        if col.size and (int(col.min()) < 0 or int(col.max()) >= n_col):
            raise ValueError("histogram column out of range")
        out = np.zeros((n_run, n_col))
        try:
            _csr_todense(n_run, n_col, _run_starts(n, q), col.astype(np.int32), w, out)
            return out
        except (TypeError, ValueError):  # pragma: no cover - private signature changed
            _SCATTER_OK[0] = False
    idx = col.astype(np.intp)
    idx += _run_offsets(n, q, n_col // 2)
    return np.bincount(idx, weights=w, minlength=n_run * n_col).reshape(n_run, n_col)


def fused_histogram(conf, correct, n_bins: int, q: int, m):
    """:func:`packed_histogram` of :func:`uniform_bins` for float32 confidences in ``[0, 1]``
    (``m`` from :func:`ceil_multiplier`), in fewer passes, equal bit for bit.

    Column ``ceil(m * conf)`` (0: confidence 0, ``n_bins + 1``: just above 1), shifted by
    ``n_bins + 2`` when correct, is the voxel's cell: the end columns fold into the end bins.
    """
    t = conf * m
    np.ceil(t, out=t)
    col = t.astype(np.int8)
    shift = np.multiply(correct.view(np.int8), np.int8(n_bins + 2))
    col += shift
    x = float(2 ** (q + 1))  # above any run's confidence sum (< 2**q * (1 + 1e-6))
    w = conf.astype(np.float64)
    w += x
    s = _scatter_runs(col, w, q, 2 * n_bins + 4)
    counts = np.floor(s * (1.0 / x))
    s -= counts * x
    counts = counts.sum(axis=0).reshape(2, n_bins + 2)
    sums = s.sum(axis=0).reshape(2, n_bins + 2).sum(axis=0)
    counts[:, 1] += counts[:, 0]
    counts[:, n_bins] += counts[:, n_bins + 1]
    sums[1] += sums[0]
    sums[n_bins] += sums[n_bins + 1]
    return counts[:, 1:n_bins + 1].T, sums[1:n_bins + 1]
