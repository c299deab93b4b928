"""Proper scoring rules for voxel-wise class probabilities: Brier score and NLL.

Both stream through :class:`~uqseg.metrics.streaming.CalibrationAccumulator` (bounded memory
for any volume size).
"""

from __future__ import annotations

from uqseg.metrics.streaming import _accumulate

__all__ = ["brier_score", "negative_log_likelihood"]


def brier_score(proba, y, mask=None, *, ignore_index=None) -> float:
    """Multi-class Brier score.

    Convention: the mean over voxels of ``sum_k (p_k - 1[y == k])^2`` (Brier's original
    multi-class form, range ``[0, 2]``). For two classes it is twice the binary Brier score
    ``mean((p_1 - 1[y == 1])^2)`` of scikit-learn.

    Parameters
    ----------
    proba : array_like of shape (N, K, *spatial)
    y : array_like of int, shape (N, *spatial)
    mask : array_like of bool, shape (N, *spatial), optional
    ignore_index : int, optional

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.8, 0.6]], [[0.2, 0.4]]]).transpose(1, 0, 2)
    >>> round(brier_score(p, np.array([[0, 1]])), 3)
    0.4
    """
    return _accumulate(proba, y, 1, "uniform", False, mask, ignore_index).brier


def negative_log_likelihood(proba, y, mask=None, *, eps: float = 1e-7, ignore_index=None) -> float:
    """Mean over voxels of ``-log p_y`` (cross-entropy), with ``p_y`` clipped below at ``eps``.

    Parameters
    ----------
    proba : array_like of shape (N, K, *spatial)
    y : array_like of int, shape (N, *spatial)
    mask : array_like of bool, shape (N, *spatial), optional
    eps : float, default=1e-7
    ignore_index : int, optional

    Returns
    -------
    float

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[0.5, 0.25]], [[0.5, 0.75]]]).transpose(1, 0, 2)
    >>> round(negative_log_likelihood(p, np.array([[0, 1]])), 4)   # (log 2 + log 4/3) / 2
    0.4904
    """
    return _accumulate(proba, y, 1, "uniform", False, mask, ignore_index, eps=eps).nll

