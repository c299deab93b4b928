"""Masks with a finite-sample risk guarantee: conformal risk control and Learn-then-Test.

:class:`ConformalRiskController` wraps any segmenter's probabilities (an ONNX network, an
ensemble, a Pipeline ending in a calibrator, or probabilities themselves) and chooses per class
a probability threshold ``lambda_`` so that the mask ``{p_c >= lambda_[c]}`` controls a risk
on new images exchangeable with the calibration images:

- ``delta=None``: conformal risk control (Angelopoulos, Bates, Fisch, Lei, Schuster, ICLR
  2024): ``E[risk] <= alpha``;
- ``delta`` set: Learn-then-Test (Angelopoulos et al. 2021) with Hoeffding-Bentkus p-values
  and fixed-sequence testing: ``P(E[risk | lambda_] <= alpha) >= 1 - delta`` over the draw of
  the calibration set.

The calibration pass streams the images and keeps only per-image, per-class histograms of the
probabilities (see :mod:`uqseg._risk`), so 3-D volumes and thousands of images fit in memory
and the result does not depend on the batch size. :meth:`~ConformalRiskController.predict_set`
gives voxel-wise conformal prediction sets (LAC or APS scores) with an image-level coverage
guarantee. See ``docs/conformal.md``.
"""

from __future__ import annotations

import numbers
import os

import numpy as np
from sklearn.base import BaseEstimator
from sklearn.utils.validation import check_is_fitted

from uqseg import _risk
from uqseg._conformal_data import check_proba, check_truth, image_stats
from uqseg.segmenter import is_fitted, resolve_segmenter

__all__ = ["ConformalRiskController", "controlled_masks"]

SET_SCORES = ("lac", "aps")


def _check_unit(name, value, *, optional=False):
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < 1:
        raise ValueError(f"{name} must be a number in the open interval (0, 1)"
                         f"{' or None' if optional else ''}, got {value!r}")


class ConformalRiskController(BaseEstimator):
    """Per-class thresholds with a guarantee on the false-negative rate, FDR, Dice or volume.

    Parameters
    ----------
    estimator : segmenter, Pipeline, path to an ONNX file, or None
        Anything with ``predict_proba(X) -> (N, K, *spatial)`` (:class:`OnnxSegmenter`,
        :class:`EnsembleSegmenter`, a fitted ``Pipeline`` ending in a
        :class:`TemperatureCalibrator`). ``None``: ``X`` holds the probabilities.
    risk : {"fnr", "fdr", "dice", "volume"}, default="fnr"
        Per-image loss of the class mask: false-negative rate ``1 - TP/|truth|`` (monotone in
        the threshold), false-discovery rate ``FP/|mask|`` (0 for an empty mask), ``1 - Dice``
        (0 when mask and truth are both empty), or the relative volume error
        ``min(| |mask| - |truth| | / |truth|, 1)``. ``fnr`` and ``volume`` are undefined for an
        image without the class: those images are left out of that class's calibration and
        the guarantee holds for images that contain the class.
    alpha : float in (0, 1), default=0.1
        Risk level.
    delta : float in (0, 1) or None, default=None
        ``None``: conformal risk control, ``E[risk] <= alpha`` (``fnr`` and ``fdr`` only; ``fdr``
        through its monotone upper envelope). Set: Learn-then-Test, the expected risk at the
        chosen threshold is ``<= alpha`` with probability ``>= 1 - delta`` over the
        calibration draw (all risks).
    classes : sequence of int or None, default=None
        Classes (channels of the probabilities) to control; ``None``: the foreground classes
        ``1 .. K-1`` for label targets, every channel for indicator (sigmoid) targets.
    set_score : {"lac", "aps"}, default="lac"
        Non-conformity score of :meth:`predict_set`: LAC ``1 - p_k`` or APS with ``u = 0``
        (the probability mass of the classes strictly more likely than ``k``).
    mondrian : bool, default=False
        :meth:`predict_set` with one quantile per true class (class-conditional coverage).
    n_bins : int, default=1000
        Resolution of the probability grid: thresholds are multiples of ``1 / n_bins``. The
        guarantee is exact on the grid; a coarser grid can only give larger masks (FNR) than
        the best continuous threshold would.
    ignore_index : int or None, default=None
        Label of voxels that count nowhere.
    batch_size : int, default=8
        Images per ``predict_proba`` call.

    Attributes
    ----------
    classes_ : ndarray of int
    lambda_ : ndarray of float, shape (len(classes_),)
        Probability thresholds; the mask of class ``classes_[i]`` is ``p >= lambda_[i]`` on
        the grid (``inf``: the empty mask).
    threshold_index_ : ndarray of int
        ``lambda_ * n_bins``, what :meth:`predict` compares ``floor(p * n_bins)`` with.
    empirical_risk_ : ndarray of float
        Mean calibration loss at ``lambda_`` per class.
    n_calibration_ : ndarray of int
        Calibration images each class's threshold was chosen on.
    method_ : {"crc", "ltt"}
    n_images_, n_classes_ : int
    target_kind_ : {"labels", "indicator"}
    estimator_ : segmenter or None
    set_threshold_index_ : ndarray of int, shape (K,)
        Class ``k`` is in the prediction set where ``floor(score_k * n_bins) <=`` this.
    set_quantile_ : ndarray of float, shape (K,)
        ``(set_threshold_index_ + 1) / n_bins``: the score bound of the sets.
    mean_set_size_ : float
        Mean number of classes per voxel of the calibration images at ``set_quantile_``.
    set_error_ : str or None
        Why no prediction sets could be calibrated (then :meth:`predict_set` raises it).
    stats_ : dict of ndarray
        The per-image sufficient statistics (``true``, ``all``, ``set_true``, ``set_all``
        histograms ``(n, K, n_bins + 1)`` and ``n_voxels``).

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = (rng.random((40, 16, 16)) < 0.3).astype(int)
    >>> p1 = np.clip(0.6 * y + 0.4 * rng.random(y.shape), 0, 1).astype(np.float32)
    >>> proba = np.stack([1 - p1, p1], axis=1)                      # (40, 2, 16, 16)
    >>> crc = ConformalRiskController(risk="fnr", alpha=0.1).fit(proba, y)
    >>> crc.lambda_.round(3).tolist()
    [0.632]
    >>> crc.predict(proba).shape
    (40, 1, 16, 16)
    """

    def __init__(self, estimator=None, *, risk="fnr", alpha=0.1, delta=None, classes=None,
                 set_score="lac", mondrian=False, n_bins=1000, ignore_index=None,
                 batch_size=8):
        self.estimator = estimator
        self.risk = risk
        self.alpha = alpha
        self.delta = delta
        self.classes = classes
        self.set_score = set_score
        self.mondrian = mondrian
        self.n_bins = n_bins
        self.ignore_index = ignore_index
        self.batch_size = batch_size

    # ------------------------------------------------------------------ parameters
    def _check_params(self):
        if not isinstance(self.risk, str) or self.risk not in _risk.RISKS:
            raise ValueError(f"risk must be one of {tuple(_risk.RISKS)}, got {self.risk!r}")
        _check_unit("alpha", self.alpha)
        _check_unit("delta", self.delta, optional=True)
        if self.delta is None and _risk.RISKS[self.risk] is None:
            raise ValueError(
                f"risk={self.risk!r} is not monotone in the threshold and neither end of the "
                "grid is safe, so conformal risk control (delta=None) cannot bound it; pass "
                "delta (e.g. 0.1) to use Learn-then-Test")
        if self.set_score not in SET_SCORES:
            raise ValueError(f"set_score must be one of {SET_SCORES}, got {self.set_score!r}")
        if not isinstance(self.mondrian, (bool, np.bool_)):
            raise TypeError(f"mondrian must be True or False, got {self.mondrian!r}")
        for name, low in (("n_bins", 2), ("batch_size", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")
        if self.ignore_index is not None and (
                isinstance(self.ignore_index, bool)
                or not isinstance(self.ignore_index, numbers.Integral)):
            raise TypeError(f"ignore_index must be an integer or None, got {self.ignore_index!r}")

    def _check_classes(self, k, indicator):
        if self.classes is None:
            return np.arange(k) if indicator else np.arange(1, k)
        if isinstance(self.classes, (str, bytes)) or not hasattr(self.classes, "__iter__"):
            raise TypeError(f"classes must be a sequence of class indices or None, got "
                            f"{self.classes!r}")
        vals = list(self.classes)
        bad = [c for c in vals if isinstance(c, (bool, np.bool_))
               or not isinstance(c, numbers.Integral) or not 0 <= c < k]
        if not vals or bad:
            raise ValueError(f"classes must be a non-empty sequence of class indices in [0, {k})"
                             f", got {self.classes!r}")
        if len(set(int(c) for c in vals)) != len(vals):
            raise ValueError(f"classes must not repeat a class, got {self.classes!r}")
        return np.asarray(vals, dtype=np.int64)

    def _make_estimator(self, X):
        est = self.estimator
        if est is None:
            return None
        if isinstance(est, (str, os.PathLike)):
            return resolve_segmenter(est)
        if not callable(getattr(est, "predict_proba", None)):
            raise TypeError("estimator must be None, a path to an ONNX file or a segmenter with "
                            f"predict_proba(X); got {type(est).__name__}")
        from sklearn.pipeline import Pipeline

        if isinstance(est, Pipeline) and not is_fitted(est):
            raise ValueError("the Pipeline must be fitted (its calibrator on data apart from the "
                             "calibration set) before the risk controller uses it")
        return resolve_segmenter(est, X, requires=("predict_proba",))

    # ------------------------------------------------------------------ probabilities
    def _check_proba(self, arr, name, kind):
        return check_proba(arr, name, kind, getattr(self, "n_classes_", None))

    def _proba_batches(self, X, kind):
        """Yield validated float32 probabilities ``(n, K, *spatial)`` batch by batch (one image
        per batch for a list of images)."""
        est = self.estimator_
        bs = int(self.batch_size)
        if isinstance(X, (list, tuple)):
            if len(X) == 0:
                raise ValueError("X is an empty list: at least one image is required")
            for i, x in enumerate(X):
                out = np.asarray(x)[None] if est is None else est.predict_proba(
                    np.asarray(x)[None])
                yield self._check_proba(out, f"X[{i}]" if est is None else
                                        "the estimator's predict_proba output", kind)
            return
        if est is None:
            X = np.asarray(X)
            if X.ndim < 1 or X.shape[0] == 0:
                raise ValueError(f"X must hold at least one image, got shape {X.shape}")
        n = len(X)
        for s in range(0, n, bs):
            xb = X[s:s + bs]
            out = xb if est is None else est.predict_proba(xb)
            yield self._check_proba(out, "X" if est is None else
                                    "the estimator's predict_proba output", kind)

    # ------------------------------------------------------------------ calibration
    def _collect(self, X, y):
        items = list(y) if isinstance(y, (list, tuple)) else np.asarray(y)
        if not isinstance(items, list) and items.ndim < 3:
            raise ValueError(f"y must have shape (N, *spatial) or (N, K, *spatial), got shape "
                             f"{items.shape}")
        if hasattr(X, "__len__") and len(X) != len(items):
            raise ValueError(f"X has {len(X)} images but y has {len(items)} targets")
        kind = None
        stats = []
        pos = 0
        for proba in self._proba_batches(X, None):
            n = proba.shape[0]
            if pos + n > len(items):
                raise ValueError(f"X has more images than y has targets ({len(items)})")
            yb = items[pos:pos + n]
            yb = np.stack([np.asarray(v) for v in yb]) if isinstance(yb, list) else yb
            pos += n
            act = getattr(getattr(self, "estimator_", None), "activation_", None)
            got, truth = check_truth(yb, proba, act, self.ignore_index)
            if kind is None:
                kind, self.n_classes_ = got, proba.shape[1]
            elif got != kind:
                raise ValueError("y mixes label maps and indicator targets")
            if proba.shape[1] != self.n_classes_:
                raise ValueError(f"the probabilities have {proba.shape[1]} classes but earlier "
                                 f"batches had {self.n_classes_}")
            if kind == "labels":  # the label-target contract: probabilities sum to 1
                self._check_proba(proba, "the probabilities", "labels")
            stats.extend(image_stats(proba[i], truth[i], kind, self.n_bins, self.ignore_index,
                                     self.set_score) for i in range(n))
        if pos != len(items):
            raise ValueError(f"X has {pos} images but y has {len(items)} targets")
        self.target_kind_ = kind
        keys = stats[0].keys()
        self.stats_ = {key: np.asarray([s[key] for s in stats]) for key in keys}

    def _solve_class(self, c):
        losses, eligible = _risk.loss_curves(self.stats_["true"][:, c], self.stats_["all"][:, c],
                                             self.risk)
        n_eligible = int(eligible.sum())
        if n_eligible == 0:
            raise ValueError(f"class {c}: no calibration image contains it, so risk="
                             f"{self.risk!r} (relative to the true volume) cannot be calibrated")
        start = int(self.n_bins) // 2  # p >= 0.5: where Learn-then-Test starts without a safe end
        try:
            j, r = _risk.solve(losses, float(self.alpha), self.delta, _risk.RISKS[self.risk],
                               start)
        except _risk.NoValidThreshold as exc:
            raise ValueError(f"class {c} (risk={self.risk!r}): {exc}") from None
        return j, r, n_eligible

    def _solve_sets(self):
        """The quantile of ``predict_set``, or why there is none."""
        if self.target_kind_ != "labels":
            return ("prediction sets need label targets (one class per voxel); these were "
                    "indicator (multi-label) targets")
        try:
            q, size = _risk.set_thresholds(self.stats_["set_true"], self.stats_["set_all"],
                                           self.stats_["n_voxels"], float(self.alpha),
                                           bool(self.mondrian))
        except _risk.NoValidThreshold as exc:
            return f"prediction sets: {exc}"
        self.set_threshold_index_ = q
        self.set_quantile_ = (q + 1) / int(self.n_bins)
        self.mean_set_size_ = size
        return None

    def fit(self, X, y):
        """Calibrate the thresholds on images (or probabilities) and their targets.

        Parameters
        ----------
        X : array ``(N, C, *spatial)`` or list of images; probabilities ``(N, K, *spatial)``
            with ``estimator=None``.
        y : array of int ``(N, *spatial)`` (labels) or of bool ``(N, K, *spatial)``
            (indicator targets of sigmoid networks), or a list of them.

        Returns
        -------
        self
        """
        self._check_params()
        for attr in [a for a in vars(self) if a.endswith("_") and not a.startswith("_")]:
            delattr(self, attr)
        self.estimator_ = self._make_estimator(X)
        self._collect(X, y)
        self._solve_all()
        return self

    def _solve_all(self):
        """Every fitted attribute after ``stats_``, ``n_classes_`` and ``target_kind_``: a
        pure function of those and the parameters (what a check of a loaded folder can
        recompute and compare)."""
        self.classes_ = self._check_classes(self.n_classes_,
                                            self.target_kind_ == "indicator")
        solved = [self._solve_class(int(c)) for c in self.classes_]
        nb = int(self.n_bins)
        self.threshold_index_ = np.array([s[0] for s in solved], dtype=np.int64)
        self.lambda_ = np.where(self.threshold_index_ > nb, np.inf, self.threshold_index_ / nb)
        self.empirical_risk_ = np.array([s[1] for s in solved])
        self.n_calibration_ = np.array([s[2] for s in solved], dtype=np.int64)
        self.n_images_ = int(self.stats_["n_voxels"].shape[0])
        self.method_ = "crc" if self.delta is None else "ltt"
        for attr in ("set_threshold_index_", "set_quantile_", "mean_set_size_"):
            self.__dict__.pop(attr, None)
        self.set_error_ = self._solve_sets()

    def recalibrate(self, **params):
        """Choose the thresholds again from the stored statistics, with new parameters.

        No image is read and no network runs: ``stats_`` holds everything any risk, level
        or class selection needs, so e.g. ``crc.recalibrate(alpha=0.05)`` gives the same
        thresholds as refitting with ``alpha=0.05`` on the same calibration data.

        Parameters
        ----------
        **params : ``risk``, ``alpha``, ``delta``, ``classes``, ``set_score`` or
            ``mondrian`` (``n_bins``, ``ignore_index`` and the estimator shaped the
            statistics, so they need a new :meth:`fit`).

        Returns
        -------
        self
        """
        check_is_fitted(self, "stats_")
        allowed = ("risk", "alpha", "delta", "classes", "set_score", "mondrian")
        other = sorted(set(params) - set(allowed))
        if other:
            raise ValueError(f"recalibrate changes {allowed} only (the others shaped the "
                             f"stored statistics: refit for them), got {other}")
        old = {k: getattr(self, k) for k in params}
        self.set_params(**params)
        try:
            self._check_params()
            self._solve_all()
        except Exception:
            self.set_params(**old)
            self._solve_all()
            raise
        return self

    # ------------------------------------------------------------------ prediction
    def _map(self, X, fn):
        check_is_fitted(self, "lambda_")
        outs = [fn(p) for p in self._proba_batches(X, self.target_kind_)]
        if isinstance(X, (list, tuple)):
            return [o[0] for o in outs]
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _masks(self, proba):
        idx = self.threshold_index_.reshape((1, -1) + (1,) * (proba.ndim - 2))
        return _risk.bin_index(proba[:, self.classes_], int(self.n_bins)) >= idx

    def predict(self, X):
        """Risk-controlled masks, bool ``(N, len(classes_), *spatial)`` (``p >= lambda_``);
        masks of different classes may overlap.

        Parameters
        ----------
        X : images for the estimator, or probabilities with ``estimator=None``

        Returns
        -------
        ndarray of bool (a list for a list of images)
        """
        return self._map(X, self._masks)

    def predict_set(self, X):
        """Voxel-wise conformal prediction sets, bool ``(N, K, *spatial)``.

        Class ``k`` is in a voxel's set when its score (``set_score``) is at most
        ``set_quantile_`` (on the grid). The quantile is chosen by conformal risk control of
        the per-image fraction of voxels whose true class is outside the set: for a new image
        exchangeable with the calibration images, the *expected fraction of its voxels
        covered* is at least ``1 - alpha`` (with ``mondrian=True``: of its voxels of each
        class, among images that contain the class). Voxels within an image are not
        exchangeable, so no per-voxel statement is made. ``delta`` does not apply here.

        Parameters
        ----------
        X : images for the estimator, or probabilities with ``estimator=None``

        Returns
        -------
        ndarray of bool (a list for a list of images)
        """
        check_is_fitted(self, "lambda_")
        if self.set_error_ is not None:
            raise ValueError(self.set_error_)
        q = self.set_threshold_index_

        def sets(proba):
            scores = _risk.set_scores(np.moveaxis(proba, 1, 0), self.set_score)  # class-major
            inside = _risk.bin_index(scores, int(self.n_bins)) <= q.reshape(
                (-1,) + (1,) * (proba.ndim - 1))
            return np.moveaxis(inside, 0, 1)

        return self._map(X, sets)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags


def controlled_masks(controller, proba):
    """The masks of a fitted controller from probabilities computed elsewhere.

    For callers that already ran the controller's own estimator (``controller.estimator_``)
    on a scan, e.g. ``uqseg predict``: the guarantee holds only for probabilities from that
    same estimator (or from the same model the calibration probabilities came from).

    Parameters
    ----------
    controller : fitted ConformalRiskController
    proba : array ``(N, K, *spatial)`` (a batch: one image is ``proba[None]``)

    Returns
    -------
    ndarray of bool ``(N, len(controller.classes_), *spatial)``
    """
    if not isinstance(controller, ConformalRiskController):
        raise TypeError(f"controller must be a ConformalRiskController, got "
                        f"{type(controller).__name__}")
    check_is_fitted(controller, "lambda_")
    arr = controller._check_proba(proba, "proba", controller.target_kind_)
    return controller._masks(arr)
