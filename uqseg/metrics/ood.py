"""Out-of-distribution detection metrics.

Convention (the scikit-learn outlier convention, as ``score_samples`` of the uqseg detectors):
**scores are higher for more in-distribution samples**. A detector accepts a sample as
in-distribution when ``score >= threshold`` and flags it as OOD otherwise.

- :func:`ood_auroc`: probability that an in-distribution score exceeds an OOD score (ties count
  half); 1 = perfect separation, 0.5 = chance.
- :func:`fpr_at_tpr`: with the threshold that keeps (accepts) a fraction ``tpr`` of the
  in-distribution samples, the fraction of OOD samples that are accepted too.
- :func:`ood_aupr`: average precision, with OOD (default) or in-distribution as the positives.
- :func:`detection_report`: accuracy, sensitivity and specificity at a given threshold.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import rankdata

__all__ = ["detection_report", "fpr_at_tpr", "ood_aupr", "ood_auroc"]


def _scores(s, name):
    a = np.asarray(s)
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")
    a = a.astype(np.float64).ravel()
    if a.size == 0:
        raise ValueError(f"{name} is empty: at least one score is required")
    if not np.isfinite(a).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return a


def ood_auroc(scores_in, scores_out) -> float:
    """Area under the ROC curve for separating in-distribution from OOD samples.

    Parameters
    ----------
    scores_in : array_like of shape (n_in,)
        Scores of in-distribution samples (higher = more in-distribution).
    scores_out : array_like of shape (n_out,)
        Scores of OOD samples.

    Returns
    -------
    float
        ``P(s_in > s_out) + 0.5 P(s_in = s_out)`` (Mann-Whitney U / (n_in n_out)).

    Examples
    --------
    >>> ood_auroc([3.0, 2.0, 1.0], [0.0, 1.0])
    0.9166666666666666
    """
    a, b = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    ranks = rankdata(np.concatenate([a, b]))  # average ranks give ties half credit
    u = ranks[: a.size].sum() - a.size * (a.size + 1) / 2.0
    return float(u / (a.size * b.size))


def _average_precision(y_true: np.ndarray, score: np.ndarray) -> float:
    order = np.argsort(-score, kind="mergesort")
    s, t = score[order], y_true[order]
    # one operating point per distinct score (ties enter together)
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(t)[last]
    precision = tps / (last + 1.0)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def ood_aupr(scores_in, scores_out, positive: str = "out") -> float:
    """Area under the precision-recall curve (average precision).

    Parameters
    ----------
    scores_in, scores_out : array_like
        Scores, higher = more in-distribution.
    positive : {"out", "in"}, default="out"
        "out" ranks samples by ``-score`` with OOD as positives (AUPR-Out); "in" ranks by
        ``score`` with in-distribution as positives (AUPR-In).

    Returns
    -------
    float
        Average precision ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (the
        definition scikit-learn's ``average_precision_score`` uses).

    Examples
    --------
    >>> ood_aupr([3.0, 2.0], [0.0, 2.5])
    0.8333333333333333
    """
    if positive not in ("out", "in"):
        raise ValueError(f"positive must be 'out' or 'in', got {positive!r}")
    a, b = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    score = np.concatenate([a, b])
    is_out = np.r_[np.zeros(a.size), np.ones(b.size)]
    if positive == "out":
        return _average_precision(is_out, -score)
    return _average_precision(1.0 - is_out, score)


def fpr_at_tpr(scores_in, scores_out, tpr: float = 0.95) -> float:
    """False positive rate at a given true positive rate (FPR@95TPR by default).

    The threshold is the highest one that still accepts (``score >= threshold``) at least a
    fraction ``tpr`` of the in-distribution samples; the result is the fraction of OOD samples
    accepted by it. Lower is better.

    Parameters
    ----------
    scores_in, scores_out : array_like
        Scores, higher = more in-distribution.
    tpr : float, default=0.95
        In ``(0, 1]``.

    Returns
    -------
    float

    Examples
    --------
    >>> fpr_at_tpr([5.0, 4.0, 3.0, 2.0], [3.5, 1.0], tpr=0.75)   # threshold 3: keeps 3.5
    0.5
    """
    if not (isinstance(tpr, (int, float, np.floating)) and 0 < tpr <= 1):
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")
    a, b = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    # smallest count of accepted in-distribution samples that reaches the rate (guard 0.95*20)
    k = max(1, math.ceil(tpr * a.size - 1e-9))
    threshold = np.sort(a)[::-1][k - 1]
    return float(np.mean(b >= threshold))


def detection_report(scores_in, scores_out, threshold: float) -> dict:
    """Accuracy, sensitivity and specificity of OOD flagging at ``threshold``.

    A sample is flagged OOD when ``score < threshold``. OOD is the positive class:
    sensitivity = flagged OOD / all OOD; specificity = accepted in-distribution / all
    in-distribution; accuracy = correct decisions / all samples.

    Parameters
    ----------
    scores_in, scores_out : array_like
        Scores, higher = more in-distribution.
    threshold : float

    Returns
    -------
    dict
        ``accuracy``, ``sensitivity``, ``specificity``, ``auroc`` (threshold free), ``n_in``,
        ``n_out``.

    Examples
    --------
    >>> r = detection_report([3.0, 2.0, 0.5], [0.0, 1.0], threshold=1.5)
    >>> r["accuracy"], r["sensitivity"], r["specificity"]
    (0.8, 1.0, 0.6666666666666666)
    """
    a, b = _scores(scores_in, "scores_in"), _scores(scores_out, "scores_out")
    t = float(threshold)
    if not np.isfinite(t):
        raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    tn = int(np.sum(a >= t))  # in-distribution accepted
    tp = int(np.sum(b < t))  # OOD flagged
    return {
        "accuracy": (tp + tn) / (a.size + b.size),
        "sensitivity": tp / b.size,
        "specificity": tn / a.size,
        "auroc": ood_auroc(a, b),
        "n_in": int(a.size),
        "n_out": int(b.size),
    }
