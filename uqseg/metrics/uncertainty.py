"""Metrics that judge an uncertainty map against the errors of a segmentation.

- :func:`uncertainty_error_overlap` (UEO, Jungo & Reyes 2019): Dice between the thresholded
  uncertainty map and the error map, maximised over thresholds.
- :func:`segment_uncertainty` (Mehrtash et al. 2020): mean binary entropy of ``p_k`` over the
  predicted segment ``S_k`` (or its boundary), one value per image and foreground class.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from scipy.special import xlogy

from uqseg._validation import check_labels, check_mask, check_scores

__all__ = ["binary_entropy", "segment_uncertainty", "uncertainty_error_overlap"]


def binary_entropy(p: np.ndarray) -> np.ndarray:
    """Entropy (natural log) of a Bernoulli variable with probability ``p``.

    Parameters
    ----------
    p : array_like
        Probabilities in ``[0, 1]``, any shape.

    Returns
    -------
    ndarray
        ``-(p log p + (1 - p) log(1 - p))`` with ``0 log 0 = 0``; same shape as ``p``,
        values in ``[0, log 2]``.

    Examples
    --------
    >>> import numpy as np
    >>> binary_entropy(np.array([0.0, 0.5, 1.0])).round(4)
    array([0.    , 0.6931, 0.    ])
    """
    p = np.asarray(p)
    if not np.issubdtype(p.dtype, np.floating):
        p = p.astype(np.float64)
    h = -(xlogy(p, p) + xlogy(1 - p, 1 - p))
    # rounding can give -0.0 or a tiny negative value at p in {0, 1}
    return np.maximum(h, 0, out=h) if isinstance(h, np.ndarray) else np.maximum(h, 0)


def _default_thresholds(unc: np.ndarray, n: int = 100) -> np.ndarray:
    lo, hi = float(unc.min()), float(unc.max())
    if hi <= lo:
        return np.array([lo - 1.0])  # constant map: the only informative cut keeps everything
    return np.linspace(lo, hi, n + 1)[:-1]


def _ueo_curve(unc: np.ndarray, err: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Dice(unc > t, err) for every t, in one pass (bincount of threshold positions)."""
    order = np.argsort(thresholds, kind="stable")
    ts = thresholds[order]
    # number of thresholds strictly below each voxel's uncertainty: unc > t_j iff j < pos
    pos = np.searchsorted(ts, unc, side="left")
    nt = ts.size
    n_err_at = np.bincount(pos[err], minlength=nt + 1)
    n_all_at = np.bincount(pos, minlength=nt + 1)
    # voxels above t_j are those with pos > j: reverse cumulative sums
    above_err = np.cumsum(n_err_at[::-1])[::-1][1:]
    above_all = np.cumsum(n_all_at[::-1])[::-1][1:]
    n_err = int(err.sum())
    denom = above_all + n_err
    dice = np.divide(2.0 * above_err, denom, out=np.full(nt, np.nan), where=denom > 0)
    out = np.empty(nt)
    out[order] = dice
    return out


def uncertainty_error_overlap(
    unc,
    pred,
    y,
    thresholds=None,
    *,
    mask=None,
    per_image: bool = False,
    return_threshold: bool = False,
):
    """Uncertainty-error overlap (UEO) of Jungo & Reyes (2019).

    ``UEO = max_t Dice(unc > t, pred != y)``: how well high uncertainty marks the voxels that
    are wrong. 1 is a perfect overlap.

    Parameters
    ----------
    unc : array_like of shape (N, *spatial)
        Voxel-wise uncertainty (any scale; higher = less certain).
    pred, y : array_like of int, shape (N, *spatial)
        Predicted and true labels.
    thresholds : array_like of float, optional
        Candidate thresholds. Default: 100 values evenly spaced over ``[min, max)`` of ``unc``
        (per image when ``per_image=True``).
    mask : array_like of bool, shape (N, *spatial), optional
        Only voxels where ``mask`` is True are used (a region of interest).
    per_image : bool, default=False
        False pools all voxels into one score; True returns one score per image.
    return_threshold : bool, default=False
        Also return the maximising threshold(s).

    Returns
    -------
    ueo : float or ndarray of shape (N,)
        NaN where the error map is empty (nothing to overlap) or no voxel is selected.
    threshold : float or ndarray of shape (N,)
        Only when ``return_threshold=True``; NaN where ``ueo`` is NaN.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.zeros((1, 4, 4), int)
    >>> pred = y.copy(); pred[0, 0, :2] = 1          # two wrong voxels
    >>> unc = np.zeros((1, 4, 4)); unc[0, 0, :2] = 0.9
    >>> float(uncertainty_error_overlap(unc, pred, y))
    1.0
    """
    u = np.asarray(unc)
    if not (np.issubdtype(u.dtype, np.floating) or np.issubdtype(u.dtype, np.integer)):
        raise TypeError(f"unc must hold real numbers, got dtype {u.dtype}")
    if u.ndim < 2:
        raise ValueError(f"unc must have shape (N, *spatial), got shape {u.shape}")
    if not np.isfinite(u).all():
        raise ValueError("unc contains NaN or infinite values")
    pred = check_labels(pred, shapes=u.shape, name="pred")
    y = check_labels(y, shapes=u.shape, name="y")
    m = np.ones(u.shape, bool) if mask is None else check_mask(mask, u.shape)
    t_given = None
    if thresholds is not None:
        t_given = np.asarray(thresholds, dtype=np.float64).ravel()
        if t_given.size == 0 or not np.isfinite(t_given).all():
            raise ValueError(
                f"thresholds must be a non-empty array of finite numbers, got {thresholds!r}"
            )

    def one(uu, ee):
        if uu.size == 0 or not ee.any():
            return np.nan, np.nan
        ts = _default_thresholds(uu) if t_given is None else t_given
        curve = _ueo_curve(uu.astype(np.float64), ee, ts)
        j = int(np.nanargmax(curve))
        return float(curve[j]), float(ts[j])

    err = pred != y
    if per_image:
        res = [one(u[i][m[i]], err[i][m[i]]) for i in range(u.shape[0])]
        ueo = np.array([r[0] for r in res])
        thr = np.array([r[1] for r in res])
    else:
        ueo, thr = one(u[m], err[m])
    return (ueo, thr) if return_threshold else ueo


def segment_uncertainty(proba, pred=None, region: str = "segment") -> np.ndarray:
    """Segment-level uncertainty of Mehrtash et al. (2020).

    For each image and foreground class ``k``: the mean binary entropy of ``p_k`` (class ``k``
    versus the rest) over the voxels of the predicted segment ``S_k = {pred == k}``
    (``region="segment"``) or over its inner boundary, the voxels of ``S_k`` that touch a voxel
    outside it along an axis (``region="boundary"``).

    Parameters
    ----------
    proba : array_like of shape (N, K, *spatial)
        Class probabilities.
    pred : array_like of int, shape (N, *spatial), optional
        Predicted labels; default ``proba.argmax(axis=1)``.
    region : {"segment", "boundary"}, default="segment"

    Returns
    -------
    ndarray of shape (N, K - 1)
        NaN for an empty predicted segment.

    Examples
    --------
    >>> import numpy as np
    >>> p1 = np.array([[[0.9, 0.5], [0.1, 0.1]]])
    >>> proba = np.stack([1 - p1, p1], axis=1)
    >>> segment_uncertainty(proba).round(4)    # S_1 = voxels with p1 > 0.5: only the 0.9 one
    array([[0.3251]])
    """
    if region not in ("segment", "boundary"):
        raise ValueError(f"region must be 'segment' or 'boundary', got {region!r}")
    proba = check_scores(proba, name="proba", kind="proba")
    n, k = proba.shape[:2]
    if pred is None:
        pred = proba.argmax(axis=1)
    else:
        pred = check_labels(pred, n_classes=k, shapes=(n, *proba.shape[2:]), name="pred")
    structure = ndimage.generate_binary_structure(proba.ndim - 2, 1)
    out = np.full((n, k - 1), np.nan)
    for i in range(n):
        for c in range(1, k):
            seg = pred[i] == c
            if region == "boundary":
                seg = seg & ~ndimage.binary_erosion(seg, structure)
            if seg.any():
                out[i, c - 1] = float(binary_entropy(proba[i, c][seg].astype(np.float64)).mean())
    return out
