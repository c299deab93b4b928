"""Temperature scaling for segmentation networks (Guo et al. 2017): global, class-wise, or
local (a temperature map, Ding et al. 2021, see :mod:`uqseg._local`), for softmax networks
and for sigmoid (binary and multi-label) ones.

The estimator is put together from one concept per private module: the scores and targets it
reads (:mod:`uqseg._calibration_inputs`), the stratified voxel sample it fits on
(:mod:`uqseg._voxel_sample`), the objectives (:mod:`uqseg._temperature_objectives`) and the
local map (:mod:`uqseg._local_fit`).
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize
from scipy.special import expit
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from uqseg import _local
from uqseg._calibration_inputs import ScoreStream
from uqseg._calibration_params import CalibratorParams
from uqseg._local_fit import LOCAL_MIN_VOXELS_PER_PARAMETER, LocalMap
from uqseg._temperature_objectives import (
    LOG_T_BOUNDS,
    _ece_objective,
    _minimize_ece,
    _nll_and_grad,
    _objective,
    sigmoid_objectives,
)
from uqseg._voxel_sample import CONFIDENCE_EDGES, VoxelSample, _water_fill
from uqseg.metrics.calibration import CalibrationAccumulator

__all__ = ["TemperatureCalibrator"]
# the names the tests and the loader import from here
_REEXPORTED = (CONFIDENCE_EDGES, LOCAL_MIN_VOXELS_PER_PARAMETER, LOG_T_BOUNDS, _ece_objective,
               _minimize_ece, _nll_and_grad, _objective, _water_fill)


class TemperatureCalibrator(CalibratorParams, ScoreStream, VoxelSample, LocalMap,
                            TransformerMixin, BaseEstimator):
    """Temperature scaling of a segmenter's logits, fitted by voxel-wise NLL (or ECE).

    ``softmax(z / T)`` with one temperature (``mode="global"``; never changes the predicted
    labels), one per class (``mode="classwise"``: vector scaling ``z_k / T_k``, which *can*
    change labels) or one per voxel (``mode="local"``: ``log T(x)`` linear in local features
    of the logits and the image, pulled towards the global temperature; never changes the
    labels). The log-temperature minimises the mean negative log-likelihood over the
    voxels with L-BFGS-B and the exact analytic gradient; ``objective="ece"`` instead picks the
    global temperature with the lowest expected calibration error on the fit data.

    Sigmoid (binary or multi-label) outputs: each channel ``c`` is a Bernoulli variable with
    probability ``sigmoid(z_c / T)`` (``mode="global"``: one temperature for all channels) or
    ``sigmoid(z_c / T_c)`` (``mode="classwise"``: one per channel), fitted by the binary NLL
    (the two-class softmax problem on ``[0, z_c]``); the masks ``z_c > 0`` never change. The
    targets are then indicator arrays ``(N, C, *spatial)`` (a binary ``(N, *spatial)`` array
    for ``C = 1``), ``predict`` gives boolean masks and ``transform`` the scaled logits
    ``z_c / T_c``. ``mode="local"`` fits one temperature map per channel: the features of
    each channel's two-class problem plus a per-channel intercept.

    Parameters
    ----------
    estimator : segmenter, str, path-like or None, default=None
        What produces the scores. A segmenter is any object with ``transform(X)`` giving
        logits or log-probabilities ``(N, K, *spatial)`` (``OnnxSegmenter``,
        ``EnsembleSegmenter``); a path is wrapped in ``OnnxSegmenter(path)``; None means that
        ``X`` itself holds the scores (e.g. as the step after a segmenter in a ``Pipeline``).
        A fitted estimator is used as is; an unfitted one is cloned and fitted on ``X``.
    mode : {"global", "classwise", "local"}, default="global"
    objective : {"nll", "ece"}, default="nll"
        What the temperature minimises on the fit data. ``"nll"`` is the proper scoring rule
        of Guo et al. ``"ece"`` (global mode only) minimises the top-label ECE with
        ``n_bins`` equal-width bins by grid + bounded scalar search, as Mukhoti et al. (2020)
        choose their temperature: NLL weighs the few confidently wrong voxels heavily and, on
        Dice-trained networks, lands on a larger temperature than the one that calibrates the
        bulk of the voxels (see docs/calibration.md).
    n_bins : int, default=15
        Bins of the ECE objective (``objective="ece"``).
    input_kind : {"logits", "proba"}, default="logits"
        What the scores are. Probabilities are turned into ``log(max(p, eps))`` and those are
        scaled (``p_k^(1/T)`` renormalised); sigmoid probabilities into their clipped logits
        ``log p - log(1 - p)``. Scores that look like the other kind are an error
        (probabilities given as logits, or values outside ``[0, 1]`` given as ``"proba"``).
    activation : {"auto", "softmax", "sigmoid"}, default="auto"
        What the scores are logits of. ``"auto"``: the estimator's ``activation_``; with
        ``estimator=None`` one channel means sigmoid and several mean softmax (pass
        ``"sigmoid"`` for the logits of a multi-label network).
    roi : {None, "foreground"}, default=None
        ``"foreground"``: fit only inside the bounding box of the true foreground (labels other
        than 0; for sigmoid outputs, of any channel) grown by ``margin`` voxels, so the easy
        background does not dominate.
    margin : int, default=10
        Margin of the ``"foreground"`` box, in voxels.
    ignore_index : int, optional
        Label whose voxels are left out of the fit and the score (sigmoid outputs: the
        indicator value whose (voxel, channel) entries are left out; not 0 or 1).
    max_voxels : int, default=2_000_000
        Budget of the stratified voxel sample kept for the fit (and for ``partial_fit``); the
        sample takes about ``max_voxels * (4 K + 10)`` bytes. Larger data are subsampled per
        stratum (true class x confidence bin) and reweighted, see the module docstring.
    batch_size : int, default=8
        Images passed to the estimator at once while streaming.
    random_state : int or None, default=0
        Seed of the sample's random keys.
    eps : float, default=1e-7
        Clipping of probabilities before the log (``input_kind="proba"``).
    alpha : float, default=1e-4
        Local mode: L2 penalty on the weights of the standardised features and on the
        intercept's distance from the global log-temperature, in units of the mean voxel
        loss; it pulls the map towards the global temperature.
    scales : sequence of float, default=(2.0, 6.0)
        Local mode: Gaussian smoothing widths (voxels) of the margin and entropy features.
    use_image : bool, default=True
        Local mode: with an ``estimator``, the image intensity (z-scored per image, one
        feature per channel) is a feature; it needs the network's output on the input grid.
    top_label_weight : float, default=1.0
        Local mode: the map minimises the NLL plus this many times the top-label log-loss
        (the NLL of "the predicted class is right" under the top-label confidence), so it
        calibrates the confidence the top-label ECE scores, not only the probability of the
        true class; 0 fits by NLL alone. On an ensemble's mean probability the two disagree
        (see docs/calibration.md).

    Attributes
    ----------
    activation_ : {"softmax", "sigmoid"}
    temperature_ : float or ndarray of shape (n_classes_,)
        Global temperature, or one per class (local mode: the global NLL fit the map is
        pulled towards).
    coef_ : ndarray of shape (n_features,)
        Local mode: ``log T(x) = intercept_ + coef_ . f(x)`` (clipped to T in [0.01, 100]).
    intercept_ : float
        Local mode.
    feature_names_ : list of str
        Local mode: the features ``f(x)``, see :func:`uqseg._local.feature_names`.
    n_classes_ : int
    n_voxels_fit_ : int
        Voxels the fit represents (all valid voxels seen, inside the ROI).
    n_voxels_sampled_ : int
        Voxels held in the sample (``<= max_voxels``).
    nll_before_, nll_after_ : float
        Estimated mean NLL over the fit voxels at ``T = 1`` and at the fitted temperature.
    ece_before_, ece_after_ : float
        Estimated top-label ECE (``n_bins`` bins) over the fit voxels at ``T = 1`` and at the
        fitted temperature(s) (global and local modes; NaN in class-wise mode).
    estimator_ : segmenter or None
    sample_ : dict of ndarray
        The weighted voxel sample (``scores``, ``labels``, ``strata``, ``keys``; local mode
        also ``features``) and the per-stratum voxel ``counts``; what ``partial_fit``
        continues from.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> z = rng.normal(size=(4, 3, 64, 64)).astype(np.float32) * 2
    >>> p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    >>> y = (p[:, :2].cumsum(1) < rng.random((4, 1, 64, 64))).sum(1)   # y ~ softmax(z)
    >>> cal = TemperatureCalibrator().fit(3 * z, y)                   # 3x over-confident
    >>> round(cal.temperature_, 1)
    3.0
    >>> bool((cal.predict(3 * z) == z.argmax(1)).all())
    True
    """

    def __init__(self, estimator=None, *, mode="global", objective="nll", n_bins=15,
                 input_kind="logits", activation="auto", roi=None, margin=10, ignore_index=None,
                 max_voxels=2_000_000, batch_size=8, random_state=0, eps=1e-7,
                 alpha=1e-4, scales=(2.0, 6.0), use_image=True, top_label_weight=1.0):
        self.estimator = estimator
        self.mode = mode
        self.objective = objective
        self.n_bins = n_bins
        self.input_kind = input_kind
        self.activation = activation
        self.roi = roi
        self.margin = margin
        self.ignore_index = ignore_index
        self.max_voxels = max_voxels
        self.batch_size = batch_size
        self.random_state = random_state
        self.eps = eps
        self.alpha = alpha
        self.scales = scales
        self.use_image = use_image
        self.top_label_weight = top_label_weight

    # ------------------------------------------------------------------ fitting
    def _start(self, k, img):
        self.activation_ = self._activation(k)
        self.n_classes_ = int(k)
        if self.mode == "local":
            c = img.shape[1] if self._wants_image() and img is not None else 0
            self.feature_names_ = (_local.sigmoid_feature_names if self._sigmoid() else
                                   _local.feature_names)(k, self._scales(), c)
        self._reset_sample(k)


    def _consume(self, X, y, first_call):
        rng = self._rng()
        seen = False
        for z, yb, mask, img in self._pairs(X, y):
            if first_call and not seen:
                self._start(z.shape[1], img)
            seen = True
            self._ingest(z, yb, mask, rng, img)
        if not seen:
            raise ValueError("X is empty: at least one image is required")

    def _solve(self):
        smp = self.sample_
        if smp["labels"].size == 0:
            raise ValueError("no voxel to fit on: every voxel is outside the ROI or has "
                             f"ignore_index={self.ignore_index}")
        w = self._weights()
        classwise = self.mode == "classwise"
        dim = self.n_classes_ if classwise else 1
        prev = getattr(self, "temperature_", None)
        x0 = np.zeros(dim)
        if prev is not None:  # warm start; mean log T when the mode changed in between
            log_prev = np.log(np.atleast_1d(prev))
            x0 = log_prev.copy() if log_prev.size == dim else np.full(dim, log_prev.mean())
        if self._sigmoid():
            fun, ece, ece_at = sigmoid_objectives(smp, w, self.n_classes_, not classwise,
                                                  int(self.n_bins))
        else:
            fun = _objective(smp["scores"], smp["labels"], w, classwise)
            ece = None if classwise else _ece_objective(smp["scores"], smp["labels"], w,
                                                        int(self.n_bins))
            ece_at = None if ece is None else (lambda x: ece(float(x[0])))
        if self.objective == "ece":
            log_t, n_iter = _minimize_ece(ece)
            x = np.array([log_t])
            self.nll_after_ = float(fun(x)[0])
        else:
            res = minimize(fun, x0, jac=True, method="L-BFGS-B", bounds=[LOG_T_BOUNDS] * dim)
            x, n_iter = res.x, int(res.nit)
            self.nll_after_ = float(res.fun)
        t = np.exp(x)
        self.temperature_ = t if classwise else float(t[0])
        self.nll_before_ = float(fun(np.zeros(dim))[0])
        self.ece_before_ = np.nan if ece_at is None else ece_at(np.zeros(dim))
        self.ece_after_ = np.nan if ece_at is None else ece_at(x)
        self.n_iter_ = n_iter
        self.n_voxels_fit_ = int(smp["counts"].sum())
        self.n_voxels_sampled_ = int(smp["labels"].size)
        if self.mode == "local":
            self._solve_local(w)

    def fit(self, X, y):
        """Fit the temperature(s) on validation images (or scores) and labels.

        Parameters
        ----------
        X : array ``(N, C, *spatial)`` or list of images, or scores ``(N, K, *spatial)``
            Images for the estimator; with ``estimator=None`` the logits (or probabilities,
            ``input_kind="proba"``) themselves.
        y : array of int ``(N, *spatial)`` or list of label maps

        Returns
        -------
        self

        Examples
        --------
        >>> import numpy as np
        >>> z = np.array([[[[4.0, -4.0]], [[0.0, 0.0]]]], np.float32)   # (1, 2, 1, 2)
        >>> TemperatureCalibrator().fit(z, np.array([[[0, 1]]])).temperature_ < 1   # both right
        True
        """
        self._check_params()
        for attr in ("temperature_", "n_classes_", "sample_", "coef_", "intercept_",
                     "feature_names_", "activation_"):
            self.__dict__.pop(attr, None)
        self.estimator_ = self._make_estimator(X)
        self._consume(X, y, first_call=True)
        self._solve()
        return self

    def partial_fit(self, X, y):
        """Add one batch to the voxel sample and refit the temperature on the whole sample.

        The first call starts the sample; later calls continue it (also after :meth:`fit`),
        warm-starting the optimiser from the current temperature. Feeding the batches of a
        data set one by one gives the same sample, hence nearly the same temperature, as
        :meth:`fit` on all of it.

        Parameters
        ----------
        X, y
            As in :meth:`fit`.

        Returns
        -------
        self

        Examples
        --------
        >>> import numpy as np
        >>> z = np.array([[[[4.0, -4.0]], [[0.0, 0.0]]]], np.float32)
        >>> cal = TemperatureCalibrator().partial_fit(z, np.array([[[0, 0]]]))
        >>> cal.partial_fit(z, np.array([[[0, 0]]])).n_voxels_fit_
        4
        """
        first = not hasattr(self, "sample_")
        if first:
            self._check_params()
            self.estimator_ = self._make_estimator(X)
        elif (self.mode == "local") != ("features" in self.sample_):
            raise ValueError("partial_fit cannot switch mode to or from 'local': the sample was "
                             "collected with" + ("out" if self.mode == "local" else "")
                             + " local features; call fit")
        self._consume(X, y, first_call=first)
        self._solve()
        return self

    # ------------------------------------------------------------------ prediction
    def _scale(self, z, img=None):
        if self.mode == "local":
            a = np.exp(-self._log_temperature(z, img))
            return z * (a if self._sigmoid() else a[:, None])
        t = np.asarray(self.temperature_, np.float32)
        shape = (1, -1) + (1,) * (z.ndim - 2)
        return z / (t.reshape(shape) if t.ndim else t)

    def _outputs(self, X, what):
        check_is_fitted(self)
        outs = []
        for z, img in self._batches(X):
            if z.shape[1] != self.n_classes_:
                raise ValueError(f"the scores have {z.shape[1]} classes on axis 1 but the "
                                 f"calibrator was fitted with {self.n_classes_}")
            sig = self._sigmoid()
            if what == "labels" and (sig or self.mode != "classwise"):
                # T > 0 keeps the sign and the order: the labels of the raw scores
                outs.append(z > 0 if sig else z.argmax(axis=1))
                continue
            if what == "temperature":
                t = np.exp(self._log_temperature(z, img)) if self.mode == "local" else \
                    np.full((z.shape[0], *z.shape[2:]), self.temperature_, np.float32)
                outs.append(t)
                continue
            if self.mode == "local" and not sig:  # class by class: cheaper than generic
                a = np.exp(-self._log_temperature(z, img))
                outs.append(_local.scaled_softmax(z, a, log=what == "logits"))
                continue
            u = self._scale(z, img)
            if sig:
                outs.append(u if what == "logits" else expit(u, out=u))
                continue
            u -= u.max(axis=1, keepdims=True)
            if what == "labels":
                outs.append(u.argmax(axis=1))
                continue
            np.exp(u, out=u)
            u /= u.sum(axis=1, keepdims=True)
            outs.append(np.log(u) if what == "logits" else u)
        if isinstance(X, (list, tuple)):  # one array per input image
            return [img for batch in outs for img in batch]
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def predict_proba(self, X):
        """Calibrated probabilities ``softmax(z / T)``, float32 ``(N, K, *spatial)`` (sigmoid
        outputs: ``sigmoid(z_c / T_c)`` per channel).

        Parameters
        ----------
        X : images for the estimator, or scores with ``estimator=None``

        Returns
        -------
        ndarray of float32 ``(N, K, *spatial)`` (a list for a list of differently sized inputs)

        Examples
        --------
        >>> import numpy as np
        >>> z = np.array([[[[4.0, -4.0]], [[0.0, 0.0]]]], np.float32)
        >>> cal = TemperatureCalibrator().fit(z, np.array([[[0, 1]]]))
        >>> cal.predict_proba(z).sum(axis=1).round(4).tolist()
        [[[1.0, 1.0]]]
        """
        return self._outputs(X, "proba")

    def temperature_map(self, X):
        """The temperature at every voxel, float32 ``(N, *spatial)``: the fitted map in local
        mode, the one global temperature everywhere in global mode (sigmoid outputs in local
        mode: one map per channel, ``(N, C, *spatial)``).

        Parameters
        ----------
        X : images for the estimator, or scores with ``estimator=None``

        Returns
        -------
        ndarray of float32 ``(N, *spatial)`` (a list for a list of differently sized inputs)

        Examples
        --------
        >>> import numpy as np
        >>> z = np.array([[[[4.0, -4.0]], [[0.0, 0.0]]]], np.float32)
        >>> cal = TemperatureCalibrator().fit(z, np.array([[[0, 1]]]))
        >>> cal.temperature_map(z).shape
        (1, 1, 2)
        """
        check_is_fitted(self)
        if self.mode == "classwise":
            raise ValueError("mode='classwise' has one temperature per class, not per voxel; "
                             "temperature_map needs mode='global' or 'local'")
        return self._outputs(X, "temperature")

    def transform(self, X):
        """Calibrated logits: ``log softmax(z / T)`` (softmax of them is :meth:`predict_proba`;
        sigmoid outputs: ``z_c / T_c``, whose sigmoid is :meth:`predict_proba`).

        Parameters
        ----------
        X : images for the estimator, or scores with ``estimator=None``

        Returns
        -------
        ndarray of float32 ``(N, K, *spatial)``

        Examples
        --------
        >>> import numpy as np
        >>> z = np.array([[[[4.0, -4.0]], [[0.0, 0.0]]]], np.float32)
        >>> cal = TemperatureCalibrator().fit(z, np.array([[[0, 1]]]))
        >>> cal.transform(z).shape
        (1, 2, 1, 2)
        """
        return self._outputs(X, "logits")

    def predict(self, X):
        """Labels ``(N, *spatial)``; in global mode exactly the argmax of the raw scores
        (sigmoid outputs: boolean masks ``z > 0`` ``(N, C, *spatial)`` in every mode).

        Parameters
        ----------
        X : images for the estimator, or scores with ``estimator=None``

        Returns
        -------
        ndarray of int ``(N, *spatial)`` (bool ``(N, C, *spatial)`` for sigmoid outputs)

        Examples
        --------
        >>> import numpy as np
        >>> z = np.array([[[[4.0, -4.0]], [[0.0, 0.0]]]], np.float32)
        >>> TemperatureCalibrator().fit(z, np.array([[[0, 1]]])).predict(z).tolist()
        [[[0, 1]]]
        """
        return self._outputs(X, "labels")

    def score(self, X, y):
        """Negative mean NLL of the calibrated probabilities (higher is better; sigmoid
        outputs: the binary NLL averaged over voxels and channels).

        Voxels outside the ROI (``roi="foreground"``) or with ``ignore_index`` do not count.

        Parameters
        ----------
        X : images for the estimator, or scores with ``estimator=None``
        y : array of int ``(N, *spatial)``, or indicators ``(N, C, *spatial)`` (sigmoid)

        Returns
        -------
        float

        Examples
        --------
        >>> import numpy as np
        >>> z = np.array([[[[4.0, -4.0]], [[0.0, 0.0]]]], np.float32)
        >>> y = np.array([[[0, 1]]])
        >>> cal = TemperatureCalibrator().fit(z, y)
        >>> cal.score(z, y) >= -0.7
        True
        """
        check_is_fitted(self)
        if self._sigmoid():
            tot = cnt = 0.0
            for z, yb, mask, img in self._pairs(X, y):
                u = self._scale(z, img).astype(np.float64)
                loss = np.logaddexp(0.0, u) - (yb == 1) * u  # softplus(u) - y u
                tot += float(loss.sum() if mask is None else loss[mask].sum())
                cnt += loss.size if mask is None else int(mask.sum())
            if cnt == 0:
                raise ValueError("no voxel to score: every entry is outside the ROI or has "
                                 f"ignore_index={self.ignore_index}")
            return -tot / cnt
        acc = CalibrationAccumulator(1, self.n_classes_)
        for z, yb, mask, img in self._pairs(X, y):
            u = self._scale(z, img)
            if mask is not None:
                yb = np.where(mask, yb, 0)  # any valid label; masked voxels are dropped
            acc.update_logits(u, yb, mask)
        return -acc.nll

    # ------------------------------------------------------------------ sklearn glue
    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_thresh", None)  # derived from the sample; rebuilt lazily
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags
