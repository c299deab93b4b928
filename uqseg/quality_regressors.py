"""The second stage of quality prediction: what turns features or maps into qualities.

:func:`default_regressor` reads the feature table; any scikit-learn regressor may replace it
(:func:`resolve_regressor`). The DeVries & Taylor quality CNN, an ONNX file exported by
``uqseg.training.quality_net`` (or any network with the same interface), reads
:func:`uqseg.quality_features.maps_input` ``(N, C + K + 1, *spatial)`` and outputs ``(N, K - 1)``
qualities in ``[0, 1]``: :class:`QualityNetwork` checks that interface and runs the file through
the inference layer (``uqseg._network``). ``QualityRegressor(regressor=...)`` uses all three.
"""

from __future__ import annotations

import numbers
import os

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import ExtraTreesRegressor, RandomForestRegressor, VotingRegressor
from sklearn.linear_model import RidgeCV
from sklearn.multioutput import MultiOutputRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import get_tags

from uqseg._network import OnnxNetwork
from uqseg._validation import check_labels
from uqseg.metrics.segmentation import dice_score, iou_score

__all__ = [
    "QualityNetwork",
    "check_quality_output",
    "default_regressor",
    "predict_regressor",
    "resolve_regressor",
]


def default_regressor() -> VotingRegressor:
    """The feature regressor ``QualityRegressor(regressor=None)`` uses.

    The mean of extra trees and a standardised ridge regression (``VotingRegressor``; wrapped
    per output in ``MultiOutputRegressor`` by the estimator). Trees fit the kinds of failure they
    were shown closely but cannot extrapolate; the linear part can, so the average generalises
    better to degradations absent from the fitting set. Chosen by leave-one-degradation-kind-out
    cross-validation on the fitting set (``docs/quality.md``).
    """
    trees = ExtraTreesRegressor(n_estimators=300, min_samples_leaf=2, max_features=0.5,
                                random_state=0, n_jobs=1)
    linear = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    return VotingRegressor([("trees", trees), ("linear", linear)])


def resolve_regressor(regressor, regressor_input: str, n_out: int):
    """``(regressor, "features" or "maps")``: an ONNX path as a string (reads maps), ``None``
    as :func:`default_regressor`, a scikit-learn regressor cloned (and wrapped in
    ``MultiOutputRegressor`` when it reads features, has no native multi-output support and
    ``n_out > 1``)."""
    reg = regressor
    if isinstance(reg, (str, os.PathLike)):
        if regressor_input == "features":
            raise ValueError("regressor is an ONNX path, which reads maps; "
                             "regressor_input='features' cannot apply")
        return os.fspath(reg), "maps"
    if reg is None:
        reg = default_regressor()
    if not (callable(getattr(reg, "fit", None)) and callable(getattr(reg, "predict", None))):
        raise TypeError("regressor must be None, a path to an ONNX quality network or an "
                        f"object with fit and predict, got {type(reg).__name__}")
    kind = "maps" if regressor_input == "maps" else "features"
    reg = clone(reg) if hasattr(reg, "get_params") else reg
    if kind == "features" and n_out > 1 and isinstance(reg, BaseEstimator):
        if not get_tags(reg).target_tags.multi_output:
            reg = MultiOutputRegressor(reg)
    return reg, kind


def predict_regressor(reg, F: np.ndarray) -> np.ndarray:
    """``reg.predict(F)``, bit for bit, with the forests read tree by tree.

    scikit-learn's forest ``predict`` validates and dispatches every tree through joblib: for the
    few rows of one batch that costs ~10x the trees' own work (the default regressor holds
    300 trees per output). Forests, voting and multi-output wrappers of exactly scikit-learn's
    classes are read here through each tree's public ``tree_.apply`` / ``tree_.value``, summed
    in scikit-learn's order; anything else (subclasses included) runs its own ``predict``.
    """
    kind = type(reg)
    if kind is MultiOutputRegressor:
        return np.column_stack([predict_regressor(e, F) for e in reg.estimators_])
    if kind is VotingRegressor:
        weights = None if reg.weights is None else \
            [w for (_, est), w in zip(reg.estimators, reg.weights, strict=True) if est != "drop"]
        preds = np.asarray([predict_regressor(e, F) for e in reg.estimators_]).T
        return np.average(preds, axis=1, weights=weights)
    if kind in (ExtraTreesRegressor, RandomForestRegressor):
        F = np.asarray(F)
        if F.ndim != 2 or F.shape[1] != reg.n_features_in_ or F.dtype.kind != "f" \
                or not (np.abs(F) <= np.finfo(np.float32).max).all():
            return reg.predict(F)  # its own errors (NaN fails the comparison too)
        X = np.ascontiguousarray(F, dtype=np.float32)
        single = reg.n_outputs_ == 1
        y = np.zeros(len(X) if single else (len(X), reg.n_outputs_))
        for tree in reg.estimators_:
            value = tree.tree_.value[tree.tree_.apply(X)]
            y += value[:, 0, 0] if single else value[:, :, 0]
        y /= len(reg.estimators_)
        return y
    return reg.predict(F)


def check_quality_output(out, n_images: int, n_classes: int) -> np.ndarray:
    """``out`` as float64 ``(N, K - 1)`` clipped to ``[0, 1]``; another shape is an error."""
    want = (n_images, n_classes - 1)
    out = np.asarray(out, dtype=np.float64)
    if out.ndim == 1 and want[1] == 1:
        out = out[:, None]
    if out.shape != want:
        raise ValueError(f"the quality regressor must output shape (N, K - 1) = {want}, "
                         f"got {out.shape}")
    return np.clip(out, 0.0, 1.0)


class QualityNetwork:
    """A pretrained ONNX quality network (not retrained), loaded on first use.

    Parameters
    ----------
    path : str or path-like
    n_classes : int
        Classes of the segmenter whose maps it reads (it outputs ``n_classes - 1`` qualities).
    """

    def __init__(self, path, n_classes: int):
        self.path = os.fspath(path)
        self.n_classes = int(n_classes)
        self._net = OnnxNetwork(self.path, who=f"the ONNX regressor {self.path!r}", what="maps")

    def check(self, sample: np.ndarray) -> None:
        """Clear errors when the network cannot read maps like ``sample`` (N, C + K + 1, ...)
        or does not output ``(N, K - 1)``."""
        who = f"the ONNX regressor {self.path!r}"
        names = self._net.input_names
        if len(names) != 1:
            raise ValueError(f"{who} must take one input (the stacked maps), it takes {names}")
        want_c = sample.shape[1]
        shape = self._net.input_shape()
        if shape is not None and len(shape) != sample.ndim:
            raise ValueError(f"{who} takes rank-{len(shape)} input, expected "
                             f"(N, C + K + 1, *spatial) of rank {sample.ndim}")
        if shape is not None and shape[1] is not None and shape[1] != want_c:
            raise ValueError(
                f"{who} takes {shape[1]} input channels, expected {want_c} = image channels + "
                f"{self.n_classes} class probabilities + 1 uncertainty map")
        self.predict(sample[:1])

    def predict(self, maps: np.ndarray) -> np.ndarray:
        """Qualities ``(N, K - 1)`` in ``[0, 1]`` of stacked maps ``(N, C + K + 1, *spatial)``."""
        return check_quality_output(self._net(maps), maps.shape[0], self.n_classes)


# --------------------------------------------------------------------------- shared by estimators
def check_fit_labels(X, y):
    """``y`` checked against images ``X`` (a list of label maps for a list of images)."""
    if isinstance(X, list):
        if not isinstance(y, (list, tuple)):
            raise TypeError("X is a list of images, so y must be a list of label maps, got "
                            f"{type(y).__name__}")
        return check_labels(list(y), shapes=[x.shape[1:] for x in X])
    return check_labels(y, shapes=(X.shape[0], *X.shape[2:]))


def check_fit_targets(X, y, sigmoid: bool, n_channels=None):
    """``y`` checked against images ``X``: class labels (softmax segmenters, as
    :func:`check_fit_labels`) or 0/1 indicator arrays ``(N, C, *spatial)`` (sigmoid; binary
    ``(N, *spatial)`` labels for ``C = 1`` gain the channel axis). Each kind given for the
    other is an error that says which is expected."""
    ndim = X[0].ndim if isinstance(X, list) else X.ndim - 1  # of one image
    items = list(y) if isinstance(y, (list, tuple)) else None
    first = np.asarray(items[0] if items else y)
    indicator = first.ndim == (ndim if items is not None else ndim + 1)
    if not sigmoid:
        if indicator:
            raise ValueError(
                "the segmenter outputs softmax probabilities over exclusive classes: y must be "
                f"class labels (N, *spatial); got indicator targets of shape {first.shape}")
        return check_fit_labels(X, y)
    if not indicator:
        if n_channels != 1:
            raise ValueError(
                f"the segmenter outputs {n_channels} independent sigmoid channels: y must be "
                "indicator targets (N, C, *spatial), one 0/1 mask per channel; got class "
                f"labels of shape {first.shape}")
        y = check_fit_labels(X, y)
        return [v[None] for v in y] if isinstance(y, list) else y[:, None]
    if isinstance(X, list):
        if items is None:
            raise TypeError("X is a list of images, so y must be a list of indicator arrays")
        out = [check_labels(np.asarray(v)[None], n_classes=2, name=f"y[{i}] (indicators)")[0]
               for i, v in enumerate(items)]
        for i, (v, x) in enumerate(zip(out, X, strict=False)):
            if v.shape[1:] != x.shape[1:]:
                raise ValueError(f"y[{i}] has shape {v.shape}, expected (C, *{x.shape[1:]})")
        if len(out) != len(X):
            raise ValueError(f"y has {len(out)} indicator arrays for {len(X)} images")
        return out
    arr = check_labels(y, n_classes=2, name="y (indicators)")
    if arr.shape[0] != X.shape[0] or arr.shape[2:] != X.shape[2:]:
        raise ValueError(f"y has shape {arr.shape}, expected ({X.shape[0]}, C, "
                         f"*{X.shape[2:]})")
    return arr


def chunk_labels(y, sl: slice, k: int, sigmoid: bool = False) -> np.ndarray:
    """The labels of chunk ``sl``, checked to lie in ``[0, k)`` (``sigmoid``: indicators
    with ``k`` channels)."""
    yb = np.asarray(y[sl] if not isinstance(y, list) else y[sl.start:sl.stop])
    if sigmoid:
        if yb.shape[1] != k:
            raise ValueError(f"y holds indicator targets for {yb.shape[1]} channels but the "
                             f"segmenter outputs {k}")
        return yb.astype(bool)
    hi = int(yb.max())
    if yb.min() < 0 or hi >= k:
        raise ValueError(f"y holds labels in [{int(yb.min())}, {hi}] but the segmenter "
                         f"predicts {k} classes (valid labels 0..{k - 1})")
    return yb


def quality_targets(pred, y, k: int, target: str, empty_score: float) -> np.ndarray:
    """True per-class Dice (or IoU) ``(N, K - 1)``; ``empty_score`` where a class is absent from
    prediction and truth alike (NaN). Boolean masks and indicators ``(N, C, *spatial)``
    (sigmoid outputs) give one per channel, ``(N, C)``."""
    if pred.dtype == np.bool_ and pred.ndim == np.ndim(y):
        axes = tuple(range(2, pred.ndim))
        inter = (pred & y).sum(axis=axes, dtype=np.float64)
        tot = pred.sum(axis=axes, dtype=np.float64) + y.sum(axis=axes, dtype=np.float64)
        den = tot if target == "dice" else tot - inter
        num = 2 * inter if target == "dice" else inter
        return np.divide(num, den, out=np.full(den.shape, float(empty_score)), where=den > 0)
    fn = dice_score if target == "dice" else iou_score
    return np.nan_to_num(fn(pred, y, n_classes=k), nan=float(empty_score))


def flag_quality(q: np.ndarray, target: str, min_dice, reduce: str) -> np.ndarray:
    """Images whose predicted Dice (IoU converted) lies below ``min_dice`` (see ``flag``)."""
    if isinstance(min_dice, bool) or not isinstance(min_dice, numbers.Real) \
            or not 0 <= min_dice <= 1:
        raise ValueError(f"min_dice must be a number in [0, 1], got {min_dice!r}")
    if reduce not in ("any", "mean"):
        raise ValueError(f"reduce must be 'any' or 'mean', got {reduce!r}")
    if target == "iou":
        q = 2 * q / (1 + q)
    return (q < min_dice).any(axis=1) if reduce == "any" else q.mean(axis=1) < min_dice
