"""The calibration data of :class:`uqseg.ConformalRiskController`: probabilities and targets
(label maps or indicator masks) checked batch by batch, and each image reduced to per-class
histograms of its probabilities (:mod:`uqseg._risk`), all the controller keeps."""

from __future__ import annotations

import numpy as np

from uqseg import _risk
from uqseg._validation import check_labels


def check_proba(arr, name: str, kind, n_classes: int | None = None) -> np.ndarray:
    """Probabilities ``(N, K, *spatial)`` in [0, 1] (summing to 1 for label targets), float32."""
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be floating point probabilities (N, K, *spatial), got "
                        f"dtype {arr.dtype}")
    if arr.ndim not in (4, 5):
        raise ValueError(f"{name} must have shape (N, K, *spatial) with 2-D or 3-D spatial "
                         f"axes, got shape {arr.shape}")
    k = n_classes
    if k is not None and arr.shape[1] != k:
        raise ValueError(f"{name} has {arr.shape[1]} classes on axis 1 but the controller "
                         f"was fitted with {k}")
    lo, hi = (float(arr.min()), float(arr.max())) if arr.size else (0.0, 1.0)
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(f"{name} must hold probabilities in [0, 1], got values in "
                         f"[{lo:.3g}, {hi:.3g}] (are these logits?)")
    if kind == "labels":
        dev = float(np.abs(arr.sum(axis=1) - 1).max())
        if dev > 1e-3:
            raise ValueError(f"{name} must sum to 1 over the class axis (axis 1) for label "
                             f"targets; max deviation {dev:.3g}")
    return arr.astype(np.float32, copy=False)


def check_truth(yb, proba: np.ndarray, activation, ignore_index):
    """Labels ``(n, *spatial)`` or indicators ``(n, K, *spatial)`` of one batch, checked."""
    n, k = proba.shape[:2]
    yb = np.asarray(yb)
    act = activation
    if act == "sigmoid" and k > 1 and yb.ndim == proba.ndim - 1:
        raise ValueError(
            f"the segmenter outputs {k} independent sigmoid channels: y must be indicator "
            f"targets (N, {k}, *spatial), one boolean mask per channel; got class labels "
            f"of shape {yb.shape}")
    if act == "softmax" and yb.ndim == proba.ndim:
        raise ValueError(
            f"the segmenter outputs softmax probabilities over {k} exclusive classes: y "
            f"must be class labels (N, *spatial); got indicator targets of shape "
            f"{yb.shape}")
    if yb.ndim == proba.ndim:
        if yb.shape != proba.shape:
            raise ValueError(f"y holds indicator targets of shape {yb.shape} but the "
                             f"probabilities have shape {proba.shape}")
        if yb.dtype != np.bool_:
            if not np.issubdtype(yb.dtype, np.integer) or (yb.size and (
                    yb.min() < 0 or yb.max() > 1)):
                raise ValueError("indicator targets y (N, K, *spatial) must be boolean or "
                                 "0/1 integers")
            yb = yb.astype(bool)
        return "indicator", yb
    if yb.ndim != proba.ndim - 1:
        raise ValueError(f"y must have shape (N, *spatial) = {(n, *proba.shape[2:])} (labels)"
                         f" or (N, K, *spatial) (indicators), got shape {yb.shape}")
    if k == 1:  # one sigmoid channel: binary labels are its indicator
        yb = check_labels(yb, n_classes=2, shapes=(n, *proba.shape[2:]), name="y")
        return "indicator", yb[:, None].astype(bool)
    yb = check_labels(yb, n_classes=k, shapes=(n, *proba.shape[2:]),
                      ignore_index=ignore_index, name="y")
    return "labels", yb


def image_stats(p: np.ndarray, truth: np.ndarray, kind: str, n_bins: int, ignore_index,
                set_score: str) -> dict:
    """Histograms of one image ``p`` ``(K, *spatial)``."""
    k = p.shape[0]
    p = p.reshape(k, -1)
    nb = int(n_bins)
    if kind == "labels":
        t = truth.reshape(-1)
        if ignore_index is not None:
            keep = t != ignore_index
            p, t = p[:, keep], t[keep]
    else:
        t = truth.reshape(k, -1)
    true_h, all_h = _risk.class_histograms(_risk.bin_index(p, nb), t, nb)
    out = {"true": true_h, "all": all_h, "n_voxels": p.shape[1]}
    if kind == "labels":
        sb = _risk.bin_index(_risk.set_scores(p, set_score), nb)
        out["set_true"], out["set_all"] = _risk.class_histograms(sb, t, nb)
    return out
