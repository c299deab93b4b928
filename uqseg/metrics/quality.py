"""Agreement between predicted and true segmentation quality (e.g. Dice or IoU per image)."""

from __future__ import annotations

import numpy as np
from scipy import stats

__all__ = ["mean_absolute_error", "pearson_r", "quality_report", "spearman_rho"]


def _paired(pred, true):
    """Flattened float pairs with every pair holding a NaN dropped."""
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape:
        raise ValueError(
            f"pred_dice and true_dice must have the same shape, got {p.shape} and {t.shape}"
        )
    p, t = p.ravel(), t.ravel()
    if np.isinf(p).any() or np.isinf(t).any():
        raise ValueError("pred_dice and true_dice must not contain infinite values")
    keep = ~(np.isnan(p) | np.isnan(t))
    return p[keep], t[keep]


def mean_absolute_error(pred_dice, true_dice) -> float:
    """Mean ``|pred - true|`` over the pairs where neither is NaN (NaN if none).

    Parameters
    ----------
    pred_dice, true_dice : array_like of the same shape

    Returns
    -------
    float

    Examples
    --------
    >>> round(mean_absolute_error([0.9, 0.5, float("nan")], [0.8, 0.7, 0.1]), 6)
    0.15
    """
    p, t = _paired(pred_dice, true_dice)
    return float(np.abs(p - t).mean()) if p.size else float("nan")


def _correlation(pred, true, fn):
    p, t = _paired(pred, true)
    # undefined for fewer than two pairs or a constant side (scipy would warn)
    if p.size < 2 or np.ptp(p) == 0 or np.ptp(t) == 0:
        return float("nan")
    return float(fn(p, t)[0])


def pearson_r(pred_dice, true_dice) -> float:
    """Pearson correlation over the non-NaN pairs (NaN if undefined).

    Parameters
    ----------
    pred_dice, true_dice : array_like of the same shape

    Returns
    -------
    float

    Examples
    --------
    >>> round(pearson_r([0.1, 0.2, 0.3], [0.2, 0.4, 0.6]), 6)
    1.0
    """
    return _correlation(pred_dice, true_dice, stats.pearsonr)


def spearman_rho(pred_dice, true_dice) -> float:
    """Spearman rank correlation over the non-NaN pairs (NaN if undefined).

    Parameters
    ----------
    pred_dice, true_dice : array_like of the same shape

    Returns
    -------
    float

    Examples
    --------
    >>> spearman_rho([0.1, 0.2, 0.3], [0.2, 0.9, 0.95])
    1.0
    """
    return _correlation(pred_dice, true_dice, stats.spearmanr)


def quality_report(pred_dice, true_dice) -> dict:
    """MAE, Pearson r and Spearman rho of predicted against true quality.

    Parameters
    ----------
    pred_dice, true_dice : array_like of the same shape, e.g. (N, K - 1)
        Pairs holding a NaN (e.g. Dice undefined for an empty class) are ignored.

    Returns
    -------
    dict
        ``mae``, ``pearson_r``, ``spearman_rho`` and ``n`` (pairs used).

    Examples
    --------
    >>> r = quality_report([[0.9], [0.5], [0.7]], [[0.8], [0.4], [0.7]])
    >>> round(r["mae"], 3), r["spearman_rho"], r["n"]
    (0.067, 1.0, 3)
    """
    p, _ = _paired(pred_dice, true_dice)
    return {
        "mae": mean_absolute_error(pred_dice, true_dice),
        "pearson_r": pearson_r(pred_dice, true_dice),
        "spearman_rho": spearman_rho(pred_dice, true_dice),
        "n": int(p.size),
    }
