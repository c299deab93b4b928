"""Walking probability arrays ``(N, K, *spatial)`` in bounded voxel blocks.

Shared by the streaming accumulator and the metric functions: block slicing, validation chunk
by chunk (so validation temporaries stay bounded too) and the exact equal-mass bin edges.
"""

from __future__ import annotations

import numpy as np

from uqseg._validation import check_mask, check_scores

DEFAULT_CHUNK = 2**16  # voxels per block: temporaries stay in L2 cache (measured fastest)


def _check_edges(edges, name):
    e = np.asarray(edges, dtype=np.float64)
    if e.ndim < 1 or e.shape[-1] < 2 or not np.isfinite(e).all() or np.any(np.diff(e) < 0):
        raise ValueError(
            f"{name} must be non-decreasing finite bin edges (at least 2), got {edges!r}"
        )
    return e


def _blocks(n_img: int, n_vox: int, chunk: int):
    """(image slice, voxel slice) pairs covering at most ``chunk`` voxels each."""
    if n_vox >= chunk:
        for i in range(n_img):
            for s in range(0, n_vox, chunk):
                yield slice(i, i + 1), slice(s, min(s + chunk, n_vox))
    else:
        step = max(1, chunk // n_vox)
        for i in range(0, n_img, step):
            yield slice(i, min(i + step, n_img)), slice(0, n_vox)


def _check_mask(mask, shape):
    return None if mask is None else check_mask(mask, shape, hint=" (N, *spatial)")


def _check_scores_chunked(scores, name, kind, chunk):
    """``check_scores`` applied chunk by chunk, so validation temporaries stay bounded too."""
    arr = np.asarray(scores)
    if arr.ndim < 3 or arr.size == 0:
        return check_scores(arr, name=name, kind=kind)
    # dtype, rank and class count from a one-voxel slice; values chunk by chunk below
    check_scores(
        arr[(slice(0, 1), slice(None)) + (slice(0, 1),) * (arr.ndim - 2)], name=name, kind=kind
    )
    s3 = arr.reshape(arr.shape[0], arr.shape[1], -1)
    for si, sv in _blocks(s3.shape[0], s3.shape[2], chunk):
        check_scores(s3[si, :, sv], name=name, kind=kind)
    return arr



def _quantile_edges(values: np.ndarray, n_bins: int) -> np.ndarray:
    if values.size == 0:
        return np.linspace(0.0, 1.0, n_bins + 1)
    e = np.quantile(values.astype(np.float64), np.linspace(0.0, 1.0, n_bins + 1))
    e[0], e[-1] = 0.0, 1.0  # catch every value, also rounding just outside the data range
    return np.maximum.accumulate(e)


def _collect(proba, y, mask, ignore_index, chunk, what):
    """Kept voxels' values of ``what`` (-1: top-label confidence, c: p_c), chunk by chunk."""
    n, k = proba.shape[:2]
    s3, y2 = proba.reshape(n, k, -1), y.reshape(n, -1)
    m2 = None if mask is None else mask.reshape(n, -1)
    out = []
    for si, sv in _blocks(n, s3.shape[2], chunk):
        p = s3[si, :, sv]
        v = p.max(axis=1) if what < 0 else p[:, what]
        keep = None if m2 is None else m2[si, sv]
        if ignore_index is not None:
            valid = y2[si, sv] != ignore_index
            keep = valid if keep is None else keep & valid
        out.append(v.ravel() if keep is None else v[keep])
    return np.concatenate(out)

