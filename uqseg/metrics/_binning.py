"""Per-block kernels of the streaming calibration statistics (numpy only).

One block of ``b`` images by ``v`` voxels arrives as ``K`` contiguous class planes. The kernels
take the top-label confidence and label with a few passes over the planes, bin the confidences
exactly like ``np.searchsorted`` on the bin edges (in the data's dtype) and histogram them with
a single ``np.bincount``: where the time of the streaming ECE goes (measured, 1e7 voxels of
3 classes) is the histogram, then the binning, then the class maximum.
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
            # pred = where(flag, c, pred) in integer arithmetic (a masked copy is 50x slower)
            np.subtract(small(c), pred, out=step)
            step *= flag.view(np.int8) if small is np.int8 else flag
            pred += step
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
    idx = np.left_shift(b, 1)
    idx += correct
    idx += _run_offsets(b.size, q, n_bins)
    x = float(2 ** (q + 1))  # above any run's confidence sum (< 2**q * (1 + 1e-6))
    s = np.bincount(idx, weights=np.add(conf, np.float64(x)),
                    minlength=2 * n_bins * (((b.size - 1) >> q) + 1))
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
