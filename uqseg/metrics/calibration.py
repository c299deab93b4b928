"""Binned calibration metrics: ECE, MCE, adaptive ECE, class-wise variants, reliability curve.

Binning follows Guo et al. (2017): bin ``b`` holds the confidences in ``(e_b, e_{b+1}]`` (the
first bin also holds 0). ECE is the count-weighted mean of ``|accuracy - confidence|`` over the
bins, MCE the largest gap over non-empty bins. "Top-label" uses the confidence
``max_k p_k`` and the correctness of ``argmax_k p_k``; "class-wise" uses, for each class ``k``,
``p_k`` against ``1[y == k]`` and averages over classes. Every metric streams through
:class:`~uqseg.metrics.streaming.CalibrationAccumulator`; :func:`foreground_roi` gives the
region of Mehrtash et al.'s segment-level metrics.

The proper scoring rules live in :mod:`uqseg.metrics.scoring`, the reliability diagram in
:mod:`uqseg.plotting`; both stay importable from here as before.
"""

from __future__ import annotations

import numpy as np

from uqseg._validation import check_labels
from uqseg.metrics.scoring import brier_score, negative_log_likelihood
from uqseg.metrics.streaming import CalibrationAccumulator, _accumulate

__all__ = [
    "CalibrationAccumulator",
    "adaptive_calibration_error",
    "brier_score",
    "expected_calibration_error",
    "foreground_roi",
    "maximum_calibration_error",
    "negative_log_likelihood",
    "reliability_curve",
]


def expected_calibration_error(
    proba,
    y,
    n_bins: int = 15,
    *,
    strategy: str = "uniform",
    classwise: bool = False,
    mask=None,
    ignore_index=None,
) -> float:
    """Expected calibration error over voxels.

    Parameters
    ----------
    proba : array_like of shape (N, K, *spatial)
        Class probabilities (class axis 1), 2-D or 3-D spatial.
    y : array_like of int, shape (N, *spatial)
        True labels.
    n_bins : int, default=15
    strategy : {"uniform", "quantile"}, default="uniform"
        Equal-width bins (Guo et al.; Mehrtash et al.) or equal-mass bins at the exact
        quantiles of the confidences (adaptive ECE).
    classwise : bool, default=False
        False: top-label ECE. True: mean over classes of the one-vs-rest ECE of ``p_k``.
    mask : array_like of bool, shape (N, *spatial), optional
        Only voxels where True count, e.g. :func:`foreground_roi` for the segment-level ECE.
    ignore_index : int, optional
        Voxels with this label are skipped.

    Returns
    -------
    float
        In ``[0, 1]``; NaN when no voxel is selected.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.8, 0.6]], [[0.2, 0.4]]]).transpose(1, 0, 2)   # (1, 2, 2)
    >>> round(expected_calibration_error(p, np.array([[0, 1]]), n_bins=10), 3)
    0.4
    """
    acc = _accumulate(proba, y, n_bins, strategy, classwise, mask, ignore_index, scores=False)
    return acc.classwise_ece if classwise else acc.ece


def maximum_calibration_error(
    proba,
    y,
    n_bins: int = 15,
    *,
    strategy: str = "uniform",
    classwise: bool = False,
    mask=None,
    ignore_index=None,
) -> float:
    """Largest ``|accuracy - confidence|`` over non-empty bins.

    Parameters and binning as in :func:`expected_calibration_error`; ``classwise=True`` gives
    the mean over classes of the one-vs-rest MCE.

    Returns
    -------
    float
        In ``[0, 1]``; NaN when no voxel is selected.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.8, 0.6]], [[0.2, 0.4]]]).transpose(1, 0, 2)
    >>> round(maximum_calibration_error(p, np.array([[0, 1]]), n_bins=10), 3)
    0.6
    """
    acc = _accumulate(proba, y, n_bins, strategy, classwise, mask, ignore_index, scores=False)
    return acc.classwise_mce if classwise else acc.mce


def adaptive_calibration_error(
    proba, y, n_bins: int = 15, *, classwise: bool = False, mask=None, ignore_index=None
) -> float:
    """ECE with equal-mass bins: ``expected_calibration_error(..., strategy="quantile")``.

    Parameters
    ----------
    proba, y, n_bins, classwise, mask, ignore_index
        As in :func:`expected_calibration_error`.

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.8, 0.6]], [[0.2, 0.4]]]).transpose(1, 0, 2)
    >>> round(adaptive_calibration_error(p, np.array([[0, 0]]), n_bins=2), 3)   # bins {0.6}, {0.8}
    0.3
    """
    return expected_calibration_error(
        proba,
        y,
        n_bins,
        strategy="quantile",
        classwise=classwise,
        mask=mask,
        ignore_index=ignore_index,
    )


def reliability_curve(
    proba, y, n_bins: int = 15, *, strategy: str = "uniform", mask=None, ignore_index=None
):
    """Top-label reliability curve.

    Parameters
    ----------
    proba, y, n_bins, strategy, mask, ignore_index
        As in :func:`expected_calibration_error`.

    Returns
    -------
    confidence : ndarray of shape (n_bins,)
        Mean confidence per bin (NaN for an empty bin).
    accuracy : ndarray of shape (n_bins,)
        Fraction correct per bin (NaN for an empty bin).
    count : ndarray of int, shape (n_bins,)
        Voxels per bin.

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.8, 0.6]], [[0.2, 0.4]]]).transpose(1, 0, 2)
    >>> conf, acc, count = reliability_curve(p, np.array([[0, 1]]), n_bins=2)
    >>> conf, acc, count
    (array([nan, 0.7]), array([nan, 0.5]), array([0, 2]))
    """
    acc = _accumulate(proba, y, n_bins, strategy, False, mask, ignore_index, scores=False)
    return acc.reliability_curve()


def foreground_roi(y_or_pred, margin=10, *, background: int = 0) -> np.ndarray:
    """Bounding box of the non-background voxels of each image, grown by ``margin`` voxels.

    Mehrtash et al. compute "segment-level" calibration metrics inside such a box so that the
    easy background does not dominate. An image without foreground gets an empty ROI.

    Parameters
    ----------
    y_or_pred : array_like of int, shape (N, *spatial)
        Labels (truth or prediction).
    margin : int or sequence of int, default=10
        Voxels added on each side, per spatial axis or one for all; clipped at the image border.
    background : int, default=0

    Returns
    -------
    ndarray of bool, shape (N, *spatial)

    Examples
    --------
    >>> import numpy as np
    >>> y = np.zeros((1, 5, 5), int); y[0, 2, 2] = 1
    >>> foreground_roi(y, margin=1)[0].astype(int)
    array([[0, 0, 0, 0, 0],
           [0, 1, 1, 1, 0],
           [0, 1, 1, 1, 0],
           [0, 1, 1, 1, 0],
           [0, 0, 0, 0, 0]])
    """
    lab = check_labels(y_or_pred, name="y_or_pred")
    nd = lab.ndim - 1
    marg = np.broadcast_to(np.asarray(margin), (nd,))
    if not np.issubdtype(marg.dtype, np.integer) or (marg < 0).any():
        raise ValueError(f"margin must be a non-negative integer or {nd} of them, got {margin!r}")
    roi = np.zeros(lab.shape, bool)
    for i in range(lab.shape[0]):
        fg = lab[i] != background
        if not fg.any():
            continue
        box = []
        for ax in range(nd):
            hit = np.flatnonzero(fg.any(axis=tuple(a for a in range(nd) if a != ax)))
            lo = max(int(hit[0]) - int(marg[ax]), 0)
            hi = min(int(hit[-1]) + int(marg[ax]) + 1, lab.shape[ax + 1])
            box.append(slice(lo, hi))
        roi[(i, *box)] = True
    return roi
