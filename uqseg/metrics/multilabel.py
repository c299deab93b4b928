"""Metrics of sigmoid (binary and multi-label) outputs: each channel is its own binary problem.

A channel ``c`` with probability ``p_c`` and indicator target ``t_c`` is scored as the
two-class problem ``[1 - p_c, p_c]`` against labels ``t_c``, so every metric of
:mod:`uqseg.metrics.calibration` and :mod:`uqseg.metrics.scoring` applies per channel;
"pooled" scores all channels' voxels together (the channels' binary problems side by side).
"""

from __future__ import annotations

import numpy as np

from uqseg.metrics.calibration import expected_calibration_error
from uqseg.metrics.scoring import brier_score, negative_log_likelihood

__all__ = ["check_multilabel", "multilabel_report"]


def check_multilabel(proba, y) -> tuple[np.ndarray, np.ndarray]:
    """Validated ``(proba, targets)``: probabilities ``(N, C, *spatial)`` in [0, 1] and
    boolean indicators of the same shape (a binary ``(N, *spatial)`` target for ``C = 1``)."""
    p = np.asarray(proba)
    if p.dtype.kind != "f":
        raise TypeError(f"proba must be floating point, got dtype {p.dtype}")
    if p.ndim < 3:
        raise ValueError(f"proba must be (N, C, *spatial), got shape {p.shape}")
    t = np.asarray(y)
    if t.shape == p.shape[:1] + p.shape[2:] and p.shape[1] == 1:
        t = t[:, None]
    if t.shape != p.shape:
        raise ValueError(
            f"multi-label targets must be indicator arrays of the probabilities' shape "
            f"{p.shape} (a binary (N, *spatial) target for one channel), got {t.shape}; "
            "class labels (N, *spatial) belong to softmax networks")
    if t.dtype != bool:
        if t.dtype.kind not in "biu" or not np.isin(t, (0, 1)).all():
            raise ValueError("multi-label targets must be boolean or 0/1 indicators")
        t = t.astype(bool)
    if not np.isfinite(p).all():
        raise ValueError("proba contains NaN or infinite values")
    if p.min() < 0 or p.max() > 1:
        raise ValueError(f"proba must lie in [0, 1], got [{p.min():.3g}, {p.max():.3g}]")
    return p, t


def _binary(p: np.ndarray) -> np.ndarray:
    """``(N, *spatial)`` probability of one channel as two-class probabilities."""
    p = p.astype(np.float64)
    return np.stack([1 - p, p], axis=1)


def _dice(pred: np.ndarray, t: np.ndarray) -> float:
    inter = np.logical_and(pred, t).sum()
    total = pred.sum() + t.sum()
    return float("nan") if total == 0 else float(2 * inter / total)


def multilabel_report(proba, y, *, n_bins: int = 15, threshold: float = 0.5,
                      names=None) -> dict:
    """ECE, Brier score, NLL and Dice per channel and pooled over channels.

    The Brier score here is the binary one, ``mean((p_c - t_c)^2)`` (scikit-learn's; half
    of :func:`uqseg.metrics.brier_score` of the two-class problem).

    Parameters
    ----------
    proba : array ``(N, C, *spatial)``
        Independent per-channel probabilities (sigmoid outputs).
    y : array of bool ``(N, C, *spatial)`` (or ``(N, *spatial)`` for ``C = 1``)
    n_bins : int, default=15
        Bins of the binary ECE.
    threshold : float, default=0.5
        Masks for the Dice: ``p >= threshold``.
    names : sequence of str, optional
        Channel names (default ``"channel c"``).

    Returns
    -------
    dict
        ``{name: {"ece", "brier", "nll", "dice"}, ..., "pooled": {...}}``; Dice over all
        images' voxels (NaN where mask and target are both empty).

    Examples
    --------
    >>> import numpy as np
    >>> p = np.array([[[[0.9, 0.2]], [[0.6, 0.7]]]])      # (1, 2, 1, 2)
    >>> t = np.array([[[[True, False]], [[False, True]]]])
    >>> r = multilabel_report(p, t, names=["WT", "TC"])
    >>> round(r["WT"]["dice"], 3), round(r["TC"]["dice"], 3)
    (1.0, 0.667)
    """
    p, t = check_multilabel(proba, y)
    c = p.shape[1]
    names = list(names) if names is not None else [f"channel {i}" for i in range(c)]
    if len(names) != c:
        raise ValueError(f"names has {len(names)} entries for {c} channels")
    out = {}
    for i, name in enumerate(names):
        two, lab = _binary(p[:, i]), t[:, i].astype(np.int64)
        out[name] = {"ece": float(expected_calibration_error(two, lab, n_bins=n_bins)),
                     "brier": float(brier_score(two, lab)) / 2,
                     "nll": float(negative_log_likelihood(two, lab)),
                     "dice": _dice(p[:, i] >= threshold, t[:, i])}
    # pooled: the channels' binary problems as one set of voxels
    pc = np.moveaxis(p, 1, 0).reshape(c * p.shape[0], *p.shape[2:])
    tc = np.moveaxis(t, 1, 0).reshape(c * t.shape[0], *t.shape[2:])
    two, lab = _binary(pc), tc.astype(np.int64)
    out["pooled"] = {"ece": float(expected_calibration_error(two, lab, n_bins=n_bins)),
                     "brier": float(brier_score(two, lab)) / 2,
                     "nll": float(negative_log_likelihood(two, lab)),
                     "dice": _dice(pc >= threshold, tc)}
    return out
