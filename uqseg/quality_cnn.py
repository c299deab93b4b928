"""The DeVries & Taylor quality CNN as its own estimator: a pretrained ONNX network, not refitted.

:class:`QualityCNN` runs a segmenter once per image, stacks the image, the probabilities and
the uncertainty map (:func:`uqseg.quality_features.maps_input`) and reads the per-class quality
off a pretrained network (``uqseg.training.quality_net`` trains and exports one). It does what
``QualityRegressor(estimator, regressor=<ONNX path>)`` does, which stays for saved folders and
old code; the network runs through the inference layer (:mod:`uqseg.quality_regressors`).
"""

from __future__ import annotations

import numbers
import os

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import run
from uqseg._validation import check_images
from uqseg.metrics.quality import quality_report
from uqseg.quality_features import check_uncertainty, chunks, maps_input, resolve_uncertainty
from uqseg.quality_regressors import (
    QualityNetwork,
    check_fit_labels,
    chunk_labels,
    flag_quality,
    quality_targets,
)
from uqseg.segmenter import resolve_segmenter

__all__ = ["QualityCNN"]

TARGETS = ("dice", "iou")


class QualityCNN(BaseEstimator):
    """Per-class Dice (or IoU) of a segmentation from a pretrained quality network (ONNX).

    ``fit(X, y)`` checks the network's interface on the segmenter's maps (input channels
    ``C + K + 1``, output ``(N, K - 1)``; clear errors otherwise) and records how well it
    predicts the true quality of ``X`` (``fit_report_``); the network itself is not retrained.

    Parameters
    ----------
    estimator : segmenter, EnsembleSegmenter or str
        Anything following the segmenter protocol; a path is wrapped in
        :class:`uqseg.OnnxSegmenter`; an unfitted segmenter is fitted with ``fit(X)``.
    model : str or path-like
        The ONNX quality network: input ``(N, C + K + 1, *spatial)``
        (:func:`~uqseg.quality_features.maps_input`), output ``(N, K - 1)`` in ``[0, 1]``.
    target : {"dice", "iou"}, default="dice"
        What the network predicts (DeVries & Taylor regress IoU): the targets of
        ``fit_report_`` and the conversion in :meth:`flag`.
    uncertainty : {"auto", "entropy", "mutual_information", "expected_entropy", "variance"}
        The uncertainty map fed to the network, as it was trained. ``"auto"``: mutual
        information for an ensemble, softmax entropy otherwise.
    empty_score : float, default=1.0
        Target where a class is absent from both prediction and truth.

    Attributes
    ----------
    estimator_ : segmenter
    n_classes_ : int
    uncertainty_kind_ : str
    fit_report_ : dict
        ``quality_report`` of predicted against true targets on the fitting images.

    Examples
    --------
    >>> from pathlib import Path
    >>> from uqseg import EnsembleSegmenter, datasets
    >>> from uqseg.quality_cnn import QualityCNN
    >>> cnn = Path(datasets.__file__).parent / "models/quality/quality_cnn.onnx"  # shipped
    >>> X, y = datasets.load_brain_tissue("val")
    >>> ens = EnsembleSegmenter(datasets.reference_models()).fit()
    >>> qc = QualityCNN(ens, cnn).fit(X[:4], y[:4])        # checks the network, no training
    >>> q = qc.predict(X[4:6])                              # Dice of grey and white matter
    >>> q.shape, bool(((q >= 0) & (q <= 1)).all())
    ((2, 2), True)
    """

    def __init__(self, estimator, model, target="dice", uncertainty="auto", empty_score=1.0):
        self.estimator = estimator
        self.model = model
        self.target = target
        self.uncertainty = uncertainty
        self.empty_score = empty_score

    def _check_params(self):
        if not isinstance(self.model, (str, os.PathLike)):
            raise TypeError(f"model must be a path to an ONNX quality network, got "
                            f"{type(self.model).__name__}")
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        check_uncertainty(self.uncertainty)
        if (isinstance(self.empty_score, bool) or not isinstance(self.empty_score, numbers.Real)
                or not 0 <= self.empty_score <= 1):
            raise ValueError(f"empty_score must be a number in [0, 1], got {self.empty_score!r}")

    def _network(self) -> QualityNetwork:
        if getattr(self, "_net", None) is None:
            self._net = QualityNetwork(self.model, self.n_classes_)
        return self._net

    def _passes(self, X):
        """``(slice, images, stacked maps, predicted labels)`` per chunk, one inference each."""
        kind = self.uncertainty_kind_
        for sl, xb in chunks(X):
            out = run(self.estimator_, xb, maps=(kind,))
            proba = np.asarray(out["proba"], dtype=np.float32)
            yield sl, xb, maps_input(xb, proba, np.asarray(out[kind]), kind), proba

    def fit(self, X, y):
        """Check the network on the segmenter's maps of ``X`` and score it against ``y``.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays
        y : array of int, shape (N, *spatial), or list of (*spatial) arrays
            True labels in ``[0, K)``.

        Returns
        -------
        self
        """
        self._check_params()
        X = check_images(X)
        est = resolve_segmenter(self.estimator, X, requires=("predict_proba",))
        kind = resolve_uncertainty(est, self.uncertainty, type(self).__name__,
                                   sigmoid_ok=False)
        y = check_fit_labels(X, y)
        self.estimator_, self.uncertainty_kind_ = est, kind
        self._net = None
        preds, targets = [], []
        for sl, _, maps, proba in self._passes(X):
            k = proba.shape[1]
            yb = chunk_labels(y, sl, k)
            if not preds:
                self.n_classes_ = int(k)
                self._network().check(maps)
            preds.append(self._network().predict(maps))
            targets.append(quality_targets(proba.argmax(axis=1), yb, k, self.target,
                                           self.empty_score))
        self.fit_report_ = quality_report(np.concatenate(preds), np.concatenate(targets))
        return self

    def predict(self, X) -> np.ndarray:
        """Predicted quality (Dice, or IoU for ``target="iou"``) per foreground class.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays

        Returns
        -------
        ndarray of shape (N, K - 1), values in ``[0, 1]``
        """
        check_is_fitted(self)
        X = check_images(X)
        return np.concatenate([self._network().predict(m) for _, _, m, _ in self._passes(X)])

    def _predict_outputs(self, xb, proba, unc, sig=None) -> np.ndarray:
        """Predicted quality from one pass's outputs (used by :func:`uqseg.assess`)."""
        return self._network().predict(maps_input(xb, proba, unc, self.uncertainty_kind_))

    def flag(self, X, min_dice=0.8, reduce="any") -> np.ndarray:
        """Images to route to human review: predicted Dice below ``min_dice``.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays
        min_dice : float in [0, 1], default=0.8
            A Dice threshold: with ``target="iou"`` the IoU ``J`` becomes ``2J / (1 + J)``.
        reduce : {"any", "mean"}, default="any"
            Flag when any foreground class (``"any"``) or their mean (``"mean"``) is below.

        Returns
        -------
        ndarray of bool, shape (N,)
        """
        check_is_fitted(self)
        flag_quality(np.zeros((1, 1)), self.target, min_dice, reduce)  # bad arguments first
        return flag_quality(self.predict(X), self.target, min_dice, reduce)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_net", None)  # engine sessions do not pickle; rebuilt lazily
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags
