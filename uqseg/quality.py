"""Per-image segmentation quality prediction (Mehrtash et al. 2020; DeVries & Taylor 2018).

:class:`QualityRegressor` runs a segmenter (or an ensemble) once per image, summarises the
prediction and its uncertainty into a few dozen per-image features
(:class:`uqseg.quality_features.QualityFeatures`, plus the typicality and atlas-agreement
columns of :mod:`uqseg.quality_typicality` and :mod:`uqseg.quality_atlas`) and regresses the
true per-class Dice (or IoU) on them. A second option follows DeVries & Taylor: a small CNN
exported to ONNX that reads the stacked ``(image, probabilities, uncertainty map)`` and
outputs the quality directly.

:func:`uqseg.datasets.make_quality_set` widens a labelled split with corrupted copies so the
regressor sees a spread of good and bad segmentations (also importable from here, as are the
feature, typicality and atlas functions that lived in this module).
"""

from __future__ import annotations

import importlib
import numbers
import os
import sys

import numpy as np
from scipy.special import expit, logit
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import run
from uqseg._numeric import one_blas_thread
from uqseg._rows import map_rows
from uqseg._validation import check_images
from uqseg.metrics.quality import quality_report
from uqseg.quality_atlas import (
    atlas_agreement,
    atlas_bank,
    atlas_cross_fit,
    atlas_maps,
    atlas_names,
    label_key,
    resolve_atlas,
)
from uqseg.quality_features import (
    QualityFeatures,
    argmax_labels,
    check_n_bins,
    check_uncertainty,
    chunks,
    is_sigmoid,
    maps_input,
    resolve_uncertainty,
)
from uqseg.quality_regressors import (
    QualityNetwork,
    check_fit_targets,
    check_quality_output,
    chunk_labels,
    default_regressor,
    flag_quality,
    predict_regressor,
    quality_targets,
    resolve_regressor,
)
from uqseg.quality_typicality import (
    TYPICALITY_NAMES,
    resolve_typicality,
    signature,
    typicality_distances,
    typicality_layer,
    typicality_signatures,
)
from uqseg.segmenter import resolve_segmenter

__all__ = ["QualityRegressor", "atlas_agreement", "atlas_bank", "atlas_maps",  # noqa: F822
           "default_regressor",
           "make_quality_set", "maps_input", "typicality_distances", "TARGETS"]

TARGETS = ("dice", "iou")
TARGET_TRANSFORMS = ("identity", "logit")
REGRESSOR_INPUTS = ("auto", "features", "maps")
_EPS = 1e-3  # logit targets are clipped to [eps, 1 - eps]


# names that lived here before the split, still importable from here (tests, benchmarks and
# the checks of saved folders use some); uqseg.datasets is imported on first use only
_MOVED = {
    "make_quality_set": "uqseg.datasets:make_quality_set",
    "feature_names": "uqseg.quality_features:feature_names",
    "_features": "uqseg.quality_features:quality_features",
    "_is_ensemble": "uqseg.quality_features:is_ensemble",
    "_atlas_fit": "uqseg.quality_atlas:atlas_cross_fit",
    "_atlas_split": "uqseg.quality_atlas:atlas_blocks",
    **{n: f"uqseg.quality_atlas:{n}" for n in ("ATLAS_ANGLES", "ATLAS_FOLDS", "ATLAS_GRID")},
    **{n: f"uqseg.quality_typicality:{n}" for n in (
        "TYPICALITY_GRID", "TYPICALITY_K", "_feature_member", "_typicality_layer")},
}


def __getattr__(name):
    if name in _MOVED:
        module, attr = _MOVED[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'uqseg.quality' has no attribute {name!r}")


# --------------------------------------------------------------------------- estimator
class QualityRegressor(BaseEstimator):
    """Predict the per-class Dice (or IoU) of a segmentation without the ground truth.

    ``fit(X, y)`` runs the segmenter once per image, computes the true per-image, per-class
    Dice against ``y`` with :func:`uqseg.metrics.dice_score` and regresses it on features of
    the prediction and its uncertainty. Where a class is absent from both the prediction and
    the truth, Dice is undefined (NaN); the target is then ``empty_score`` (default 1: the
    network correctly found nothing).

    Sigmoid (binary or multi-label) segmenters: every channel is a structure, its mask
    ``p_c >= 0.5``; the targets ``y`` are indicator arrays ``(N, C, *spatial)`` (a binary
    ``(N, *spatial)`` array for ``C = 1``), the features are per channel (the channel's
    Bernoulli probabilities and its own uncertainty map) and :meth:`predict` gives ``(N, C)``,
    one Dice per channel. The maps input (ONNX quality networks) and the atlas features need a
    softmax segmenter.

    Parameters
    ----------
    estimator : segmenter, EnsembleSegmenter or str
        Anything following the segmenter protocol (``predict_proba``); an object with
        ``predict_members`` (an ensemble) gives mutual information too. A path is wrapped in
        :class:`uqseg.OnnxSegmenter`. A fitted estimator is used as is; an unfitted one is
        fitted with ``fit(X)``.
    regressor : sklearn regressor, object with fit/predict, str or path-like, optional
        ``None``: :func:`default_regressor`, the mean of extra trees and a standardised ridge
        regression on the features (chosen by leave-one-degradation-kind-out cross-validation,
        see ``docs/quality.md``).
        Any scikit-learn regressor is cloned and fitted on :meth:`features`; one without native
        multi-output support is wrapped in ``MultiOutputRegressor``. A path to an ONNX file is
        a pretrained quality network (DeVries & Taylor): it reads :func:`maps_input`
        ``(N, C + K + 1, *spatial)`` and outputs ``(N, K - 1)`` qualities in ``[0, 1]``; it is
        not retrained by ``fit``.
    target : {"dice", "iou"}, default="dice"
        What is regressed and returned by :meth:`predict` (DeVries & Taylor regress IoU).
    uncertainty : {"auto", "entropy", "mutual_information", "expected_entropy", "variance"}
        Uncertainty map summarised by the features (and fed to a quality CNN). ``"auto"``:
        mutual information for an ensemble, entropy of the softmax otherwise. Kinds other than
        ``"entropy"`` need an ensemble.
    target_transform : {"logit", "identity"}, default="logit"
        Fit the feature regressor on ``logit(clip(t, 1e-3, 1 - 1e-3))`` (as Mehrtash et al.
        regress logit(Dice)) or on ``t`` itself. Predictions are mapped back and clipped to
        ``[0, 1]``.
    n_bins : int, default=8
        Bins of the uncertainty histogram over the predicted foreground (plus a one-voxel rim).
    empty_score : float, default=1.0
        Target where a class is absent from both prediction and truth.
    regressor_input : {"auto", "features", "maps"}, default="auto"
        What a regressor object receives: the feature table, or the stacked maps of
        :func:`maps_input` (e.g. ``uqseg.training.quality_net.QualityNetRegressor``).
        ``"auto"``: maps for an ONNX path, features otherwise. Training on maps holds all of
        them in memory (``N x (C + K + 1)`` float32 images); an ONNX network runs chunk by chunk.
    typicality : {"auto", True, False}, default="auto"
        Add two *typicality* features (feature regressor only, :mod:`uqseg.quality_typicality`):
        the distance of the image's spectral signature (of the ``decoder_last`` feature maps of
        the segmenter, or of an ensemble's feature member, from the same pass) to the nearest
        reference signature and the mean distance to the 5 nearest. ``"auto"``: on when the
        regressor reads features and the segmenter exposes a feature layer through
        ``run(X, layers)``; ``True`` makes either missing an error. It lowers the error on
        unfitted degradation kinds (``docs/quality.md``).
    atlas : {"auto", True, False}, default="auto"
        Add ``K`` *atlas agreement* features (feature regressor, 2-D images,
        :mod:`uqseg.quality_atlas`): the best soft Dice, over in-plane poses, of the predicted
        label map with the fitting set's ground-truth maps, per class and jointly; a
        confident, consistent failure that uncertainty does not show scores low. At fit time
        an image meets only references outside its own of 5 contiguous blocks of ``groups``
        of :meth:`fit` (without them, of distinct label maps, which lets a rotated copy's
        truth leak: measured worse). ``"auto"``: on when ``groups`` is given, the images are
        2-D, the regressor reads features and ``y`` holds at least 2 distinct maps; ``True``
        also without ``groups`` and makes the other conditions errors.
    reference : array of shape (M, C, *spatial), list of arrays or None, default=None
        Clean images whose signatures are the reference (no labels needed; pass them
        intensity-normalised like the images to score, e.g. the clean copies
        ``make_quality_set`` puts first). ``None``: the fitting images themselves, each compared
        with the others (leave-one-out; weaker when the fitting set holds corrupted copies,
        which are then typical of each other). Used only when typicality is on.

    Attributes
    ----------
    estimator_ : segmenter
    regressor_ : estimator or str
        The fitted regressor, or the ONNX path.
    input_kind_ : {"features", "maps"}
    n_classes_ : int
    uncertainty_kind_ : str
    feature_names_ : list of str
    typicality_ : bool
        Whether the typicality features are used (``typicality`` resolved).
    reference_signatures_ : ndarray of shape (M, L)
        Only when typicality is on.
    typicality_layer_ : str
        Only when typicality is on.
    atlas_ : bool
        Whether the atlas agreement features are used (``atlas`` resolved).
    atlas_maps_ : ndarray of shape (M, K - 1, 32, 32)
        :func:`atlas_maps` of the distinct fitting label maps; only when ``atlas_`` is on.
    atlas_blocks_ : ndarray of shape (M,)
        Cross-fitting block of each reference map (predictions average over leaving each
        block out, as every fitting image missed its own).
    fit_report_ : dict
        ``quality_report`` of predicted against true targets on the fitting set (in-sample).

    Examples
    --------
    >>> from uqseg import QualityRegressor, datasets
    >>> X, y = datasets.load_brain_tissue("val")
    >>> qr = QualityRegressor(datasets.reference_models()[0]).fit(X[:32], y[:32])
    >>> qr.predict(X[32:34]).shape                          # Dice of grey and white matter
    (2, 2)
    >>> qr.flag(X[32:34], min_dice=0.0).tolist()            # nothing is below Dice 0
    [False, False]
    """

    def __init__(self, estimator, regressor=None, target="dice", uncertainty="auto",
                 target_transform="logit", n_bins=8, empty_score=1.0, regressor_input="auto",
                 typicality="auto", reference=None, atlas="auto"):
        self.estimator = estimator
        self.regressor = regressor
        self.target = target
        self.uncertainty = uncertainty
        self.target_transform = target_transform
        self.n_bins = n_bins
        self.empty_score = empty_score
        self.regressor_input = regressor_input
        self.typicality = typicality
        self.reference = reference
        self.atlas = atlas

    # ----------------------------------------------------------------- validation
    def _check_params(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target_transform not in TARGET_TRANSFORMS:
            raise ValueError(f"target_transform must be one of {TARGET_TRANSFORMS}, got "
                             f"{self.target_transform!r}")
        if self.regressor_input not in REGRESSOR_INPUTS:
            raise ValueError(f"regressor_input must be one of {REGRESSOR_INPUTS}, got "
                             f"{self.regressor_input!r}")
        check_n_bins(self.n_bins)
        if (isinstance(self.empty_score, bool) or not isinstance(self.empty_score, numbers.Real)
                or not 0 <= self.empty_score <= 1):
            raise ValueError(f"empty_score must be a number in [0, 1], got {self.empty_score!r}")
        for name in ("typicality", "atlas"):
            v = getattr(self, name)
            if not (isinstance(v, (bool, np.bool_)) or (isinstance(v, str) and v == "auto")):
                raise ValueError(f"{name} must be 'auto', True or False, got {v!r}")
        check_uncertainty(self.uncertainty)

    def _resolve_estimator(self, X):
        return resolve_segmenter(self.estimator, X, requires=("predict_proba",))

    # ----------------------------------------------------------------- inference
    def _maps(self, X, signatures=False):
        """Yield ``(slice, X chunk, proba, uncertainty, signatures or None)`` over chunks, one
        inference each (plus one pass of an ensemble's first member for signatures)."""
        est, kind = self.estimator_, self.uncertainty_kind_
        layer = getattr(self, "typicality_layer_", None) if signatures else None
        for sl, xb in chunks(X):
            # probabilities, the map and the feature member's features from one pass
            out = run(est, xb, layers=() if layer is None else [layer], maps=(kind,))
            sig = None if layer is None else signature(out[layer])
            yield sl, xb, np.asarray(out["proba"], dtype=np.float32), out[kind], sig

    _signature = staticmethod(signature)  # uqseg.assess computes signatures from its own pass

    def _base_features(self) -> QualityFeatures:
        """The base features (the transformer, set to this estimator's segmenter and kind)."""
        return QualityFeatures(self.estimator_, self.uncertainty_kind_, self.n_bins)._set_fitted(
            self.estimator_, self.uncertainty_kind_, self.n_classes_)

    def _atlas_bank(self) -> np.ndarray:
        """The rotated references, built on first use (not pickled)."""
        cache = self.__dict__.setdefault("_atlas_cache", {})
        if "bank" not in cache:
            cache["bank"] = atlas_bank(self.atlas_maps_)
        return cache["bank"]

    def _reads_maps(self) -> bool:
        return self.regressor_input == "maps" or isinstance(self.regressor, (str, os.PathLike))

    def _typicality(self, sig):
        return typicality_distances(sig, self.reference_signatures_)

    # ----------------------------------------------------------------- public API
    def fit(self, X, y, groups=None):
        """Run the segmenter once on ``X``, compute the true quality and fit the regressor.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays
        y : array of int, shape (N, *spatial), or list of (*spatial) arrays
            True labels in ``[0, K)``; for a sigmoid segmenter 0/1 indicator arrays
            ``(N, C, *spatial)`` (or a list of ``(C, *spatial)``).
        groups : array-like of shape (N,), optional
            Source (or subject) of each image, e.g. ``info["source"]`` of
            :func:`make_quality_set`. Turns on the atlas features (``atlas="auto"``), whose
            cross-fitting keeps the images of one group from serving as each other's
            references. Without it, identical label maps form a group, which does not join a
            source with its *rotated* copies (their labels differ).

        Returns
        -------
        self
        """
        self._check_params()
        X = check_images(X)
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (len(X),):
                raise ValueError(f"groups must have one entry per image, shape ({len(X)},); "
                                 f"got shape {groups.shape}")
        est = self._resolve_estimator(X)
        kind = resolve_uncertainty(est, self.uncertainty, type(self).__name__)
        sigm = is_sigmoid(est)
        if sigm and self._reads_maps():
            raise ValueError("a sigmoid segmenter's quality is regressed on features: the "
                             "maps input (regressor_input='maps', an ONNX quality network) "
                             "reads softmax maps; use regressor_input='features'")
        if sigm and self.atlas is True:
            raise ValueError("atlas=True compares label maps of exclusive classes; a sigmoid "
                             "segmenter's overlapping masks have none (use atlas='auto')")
        y = check_fit_targets(X, y, sigm, getattr(est, "n_classes_", None))
        self.estimator_ = est
        self.uncertainty_kind_ = kind
        for attr in ("reference_signatures_", "typicality_layer_", "atlas_maps_",
                     "atlas_blocks_", "_atlas_cache"):
            self.__dict__.pop(attr, None)
        typ = self.typicality_ = resolve_typicality(self.typicality, est, self._reads_maps())
        use_atlas = not sigm and resolve_atlas(self.atlas, X, groups, self._reads_maps())
        pmaps, ymaps, ykeys = [], [], []
        if typ:
            self.typicality_layer_ = typicality_layer(est)
        feats, targets, maps, onnx_pred, k, reg, sigs = [], [], [], [], None, None, []
        from tqdm.auto import tqdm

        # a bar in a terminal or notebook only (disable=None); the regressor's fit is the
        # last step
        bar = tqdm(total=len(X) + 1, desc="QualityRegressor.fit: segment", unit="img",
                   file=sys.stderr, leave=False, disable=None)
        for sl, xb, proba, unc, sig in self._maps(X, signatures=typ):
            bar.update(len(xb))
            k = proba.shape[1]
            yb = chunk_labels(y, sl, k, sigm)
            if reg is None:
                self.n_classes_ = int(k)
                self._runner = None
                base = self._base_features()
                reg, self.input_kind_ = resolve_regressor(self.regressor, self.regressor_input,
                                                          k if sigm else k - 1)
            pred = proba >= 0.5 if sigm else argmax_labels(proba)
            targets.append(quality_targets(pred, yb, k, self.target, self.empty_score))
            feats.append(map_rows(base.transform_maps, xb, proba, unc))
            if use_atlas:
                pmaps.append(atlas_maps(argmax_labels(proba), k))
                ymaps.append(atlas_maps(yb, k))
                ykeys += [label_key(v) for v in yb]
            if typ:
                sigs.append(sig)
            if isinstance(reg, str):
                # a pretrained network: checked on the first chunk, then run chunk by chunk
                m = maps_input(xb, proba, unc, kind)
                if not onnx_pred:
                    self.regressor_ = reg
                    self._network().check(m)
                onnx_pred.append(self._predict_maps(m))
            elif self.input_kind_ == "maps":
                maps.append(maps_input(xb, proba, unc, kind))
        bar.set_description("QualityRegressor.fit: regressor")
        self.feature_names_ = list(base.feature_names_)
        T = np.concatenate(targets)
        F = np.concatenate(feats)
        if typ:
            S = np.concatenate(sigs)
            self.reference_signatures_ = S if self.reference is None else \
                typicality_signatures(est, check_images(self.reference), self.typicality_layer_)
            F = np.hstack([F, self._typicality(S)])
            self.feature_names_ += list(TYPICALITY_NAMES)
        if use_atlas and min(len(set(ykeys)),
                             len(set(ykeys if groups is None else groups.tolist()))) < 2:
            if self.atlas is True:
                raise ValueError("atlas=True needs at least 2 distinct label maps in y and at "
                                 "least 2 groups to cross-fit over")
            use_atlas = False
        self.atlas_ = use_atlas
        if use_atlas:
            A, self.atlas_maps_, self.atlas_blocks_ = atlas_cross_fit(
                np.concatenate(pmaps), np.concatenate(ymaps), ykeys, groups)
            F = np.hstack([F, A])
            self.feature_names_ += atlas_names(k)
        if isinstance(reg, str):
            pred = np.concatenate(onnx_pred)
        elif self.input_kind_ == "maps":
            M = np.concatenate(maps)
            self.regressor_ = reg.fit(M, T)
            pred = self._predict_maps(M)
        else:
            Tt = logit(np.clip(T, _EPS, 1 - _EPS)) if self.target_transform == "logit" else T
            self.regressor_ = reg.fit(F, Tt if Tt.shape[1] > 1 else Tt.ravel())
            pred = self._predict_features(F)
        self.fit_report_ = quality_report(pred, T)
        bar.update(1)
        bar.close()
        return self

    def _network(self) -> QualityNetwork:
        if getattr(self, "_runner", None) is None:
            self._runner = QualityNetwork(self.regressor_, self.n_classes_)
        return self._runner

    def _predict_maps(self, maps: np.ndarray) -> np.ndarray:
        if isinstance(self.regressor_, str):
            return self._network().predict(maps)
        return check_quality_output(self.regressor_.predict(maps), maps.shape[0],
                                    self.n_classes_)

    def _predict_features(self, F: np.ndarray) -> np.ndarray:
        out = np.asarray(predict_regressor(self.regressor_, F), dtype=np.float64)
        out = out.reshape(F.shape[0], -1)
        if self.target_transform == "logit":
            out = expit(out)
        return np.clip(out, 0.0, 1.0)

    def features(self, X) -> np.ndarray:
        """Per-image features (columns named by ``feature_names_``), one inference per image.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays

        Returns
        -------
        ndarray of shape (N, len(feature_names_))
        """
        check_is_fitted(self)
        X = check_images(X)
        return np.concatenate([self._row_features(x, p, u, s)
                               for _, x, p, u, s in self._maps(X, signatures=True)])

    def _row_features(self, xb, proba, unc, sig):
        F = map_rows(self._base_features().transform_maps, xb, proba, unc)
        if sig is not None:
            F = np.hstack([F, self._typicality(sig)])
        if getattr(self, "atlas_", False):
            maps = atlas_maps(argmax_labels(proba), self.n_classes_)
            # as at fit time, one block of references is always missing (averaged over blocks)
            F = np.hstack([F, atlas_agreement(maps, self.atlas_maps_, bank=self._atlas_bank(),
                                              blocks=self.atlas_blocks_)])
        return F

    def predict(self, X) -> np.ndarray:
        """Predicted quality (Dice, or IoU for ``target="iou"``) per foreground class.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays

        Returns
        -------
        ndarray of shape (N, K - 1), values in ``[0, 1]`` (``(N, C)`` for a sigmoid
        segmenter: one per channel)
        """
        check_is_fitted(self)
        X = check_images(X)
        with one_blas_thread():
            return np.concatenate([self._predict_outputs(xb, p, u, s)
                                   for _, xb, p, u, s in self._maps(X, signatures=True)])

    def _predict_outputs(self, xb, proba, unc, sig) -> np.ndarray:
        """Predicted quality from one pass's probabilities, uncertainty map and typicality
        signatures (also used by :func:`uqseg.assess`)."""
        if self.input_kind_ == "maps":
            return self._predict_maps(maps_input(xb, proba, unc, self.uncertainty_kind_))
        return self._predict_features(self._row_features(xb, proba, unc, sig))

    def flag(self, X, min_dice=0.8, reduce="any") -> np.ndarray:
        """Images to route to human review: predicted Dice below ``min_dice``.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays
        min_dice : float in [0, 1], default=0.8
            Always a Dice threshold: with ``target="iou"`` the predicted IoU ``J`` is
            converted to Dice ``2J / (1 + J)`` first.
        reduce : {"any", "mean"}, default="any"
            ``"any"``: flag when any foreground class is predicted below ``min_dice``;
            ``"mean"``: when the mean over foreground classes is.

        Returns
        -------
        ndarray of bool, shape (N,)
        """
        check_is_fitted(self)
        flag_quality(np.zeros((1, 1)), self.target, min_dice, reduce)  # bad arguments first
        return flag_quality(self.predict(X), self.target, min_dice, reduce)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_runner", None)  # onnxruntime sessions do not pickle; rebuilt lazily
        state.pop("_atlas_cache", None)
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags
