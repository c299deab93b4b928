"""Temperature scaling for segmentation networks (Guo et al. 2017): global, class-wise, or
local (a temperature map, Ding et al. 2021, see :mod:`uqseg._local`).

The calibrator streams the segmenter's output batch by batch and keeps a *stratified,
weighted voxel sample* of bounded size instead of all logits (a 3-D validation set of 100
volumes holds ~1e9 voxels). Strata are (true class, uncalibrated confidence bin); inside each
stratum the sample is uniform (priority sampling: each voxel draws a random key and the
stratum keeps its smallest keys, which merges exactly across batches); every sampled voxel is
weighted by ``stratum size / stratum sample size``, so the weighted NLL is an unbiased
estimate of the NLL over all voxels. Rare strata (wrong or unsure voxels, small classes),
which decide the temperature, are kept whole; only the huge confident-background strata are
thinned. When the data hold at most ``max_voxels`` voxels, nothing is dropped and the fit is
exact.
"""

from __future__ import annotations

import numbers
import os

import numpy as np
from scipy.optimize import minimize, minimize_scalar
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import NotFittedError
from sklearn.utils.validation import check_is_fitted

from uqseg import _local
from uqseg._validation import check_labels, check_scores
from uqseg.metrics.calibration import CalibrationAccumulator, foreground_roi
from uqseg.segmenter import resolve_segmenter

__all__ = ["TemperatureCalibrator"]

#: Upper edges of the uncalibrated-confidence bins used as strata (the last bin is open).
CONFIDENCE_EDGES = (0.5, 0.7, 0.9, 0.97, 0.99, 0.997, 0.999, 0.9999)
#: log-temperature bounds of the optimiser: T in [1e-2, 1e2].
LOG_T_BOUNDS = (float(np.log(1e-2)), float(np.log(1e2)))
#: a local fit needs at least this many sampled voxels per parameter
LOCAL_MIN_VOXELS_PER_PARAMETER = 10
_CHUNK = 1 << 20  # voxels per streaming step: bounds temporaries to ~K * 8 MiB
_OBJ_CHUNK = 1 << 18  # sample rows per objective step


# ---------------------------------------------------------------------- objective
def _objective(z, y, w, classwise):
    """``fun(log_t) -> (mean NLL, gradient)`` over the weighted sample, for L-BFGS-B.

    ``z`` is class-major ``(K, n)``: reductions over a short class axis are slow in numpy,
    row-wise operations over ``n`` are fast.

    With ``a = exp(-log T)`` and ``p = softmax(a * z)`` the voxel loss is
    ``L = logsumexp(a * z) - a_y z_y``, so ``dL/da_k = p_k z_k - 1[y == k] z_k`` and
    ``dL/dlog T_k = -a_k dL/da_k`` (global mode: one ``a``, the sum over ``k``). The
    ``1[y == k] z_k`` terms do not depend on ``a``; they are summed once here.
    """
    w = np.asarray(w, np.float64)
    k = z.shape[0]
    zy = np.take_along_axis(z, y[None].astype(np.intp), axis=0)[0].astype(np.float64)
    c = np.bincount(y, weights=w * zy, minlength=k)  # sum over voxels of class k of w z_y
    wsum = float(w.sum())

    def fun(log_t):
        log_t = np.atleast_1d(np.asarray(log_t, dtype=np.float64))
        a = np.exp(-log_t)
        f = -float(np.broadcast_to(a, (k,)) @ c)
        ga = -c.copy()
        a_col = np.broadcast_to(a, (k,))[:, None]
        for s in range(0, z.shape[1], _OBJ_CHUNK):
            zc, wc = z[:, s:s + _OBJ_CHUNK], w[s:s + _OBJ_CHUNK]
            u = np.multiply(zc, a_col, dtype=np.float64)
            m = u.max(axis=0)
            u -= m
            np.exp(u, out=u)
            tot = u.sum(axis=0)
            # einsum, not BLAS: a threaded dot stalls on a busy machine for no gain here
            f += float(np.einsum("i,i->", wc, m + np.log(tot)))
            u *= zc
            ga += np.einsum("ki,i->k", u, wc / tot)  # sum_i w_i p_ik z_ik
        g = -np.broadcast_to(a, (k,)) * ga / wsum
        return f / wsum, (g if classwise else np.array([g.sum()]))

    return fun


def _ece_objective(z, y, w, n_bins):
    """``fun(log_t) -> ECE`` of ``softmax(z / T)`` over the weighted sample (top-label,
    ``n_bins`` equal-width bins, as :func:`uqseg.metrics.expected_calibration_error`).

    A global temperature never changes the argmax, so correctness is computed once; only the
    confidence ``1 / sum_k exp((z_k - z_max) / T)`` depends on ``T``.
    """
    w = np.asarray(w, np.float64)
    zmax = z.max(axis=0)
    d = (z - zmax).astype(np.float32)  # <= 0
    correct = (z.argmax(axis=0) == y).astype(np.float64)
    wc = w * correct
    wsum = float(w.sum())

    def fun(log_t):
        a = np.float32(np.exp(-float(np.asarray(log_t).reshape(-1)[0])))
        conf = np.zeros(d.shape[1], np.float64)
        for row in d:
            conf += np.exp(row * a)
        np.reciprocal(conf, out=conf)
        b = np.minimum((conf * n_bins).astype(np.intp), n_bins - 1)
        gap = np.bincount(b, weights=w * conf, minlength=n_bins)
        gap -= np.bincount(b, weights=wc, minlength=n_bins)
        return float(np.abs(gap).sum() / wsum)

    return fun


def _minimize_ece(fun, n_grid=49):
    """Global temperature minimising a (piecewise smooth, not convex) ECE: a log-spaced grid
    over ``T`` in [0.05, 20], then a bounded scalar search between the best point's
    neighbours."""
    grid = np.linspace(np.log(0.05), np.log(20.0), n_grid)
    vals = np.array([fun(g) for g in grid])
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)]
    res = minimize_scalar(fun, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    best = float(res.x) if res.fun <= vals[i] else float(grid[i])
    return best, n_grid + int(res.nfev)


def _nll_and_grad(log_t, z, y, w, classwise):
    """Weighted mean NLL of ``softmax(z / T)`` (``z`` is ``(K, n)``) and its gradient in
    ``log T``."""
    return _objective(z, y, w, classwise)(log_t)


def _water_fill(counts: np.ndarray, budget: int) -> float:
    """Per-stratum cap ``c`` with ``sum(min(counts, c)) <= budget`` (inf if all fit)."""
    if counts.sum() <= budget:
        return np.inf
    srt = np.sort(counts)
    left = budget
    for j, n in enumerate(srt):
        rest = srt.size - j
        if n * rest >= left:
            return float(max(left // rest, 1))
        left -= n
    return np.inf  # pragma: no cover - the first test above returns


class TemperatureCalibrator(TransformerMixin, BaseEstimator):
    """Temperature scaling of a segmenter's logits, fitted by voxel-wise NLL (or ECE).

    ``softmax(z / T)`` with one temperature (``mode="global"``; never changes the predicted
    labels), one per class (``mode="classwise"``: vector scaling ``z_k / T_k``, which *can*
    change labels) or one per voxel (``mode="local"``: ``log T(x)`` linear in local features
    of the logits and the image, pulled towards the global temperature; never changes the
    labels). The log-temperature minimises the mean negative log-likelihood over the
    voxels with L-BFGS-B and the exact analytic gradient; ``objective="ece"`` instead picks the
    global temperature with the lowest expected calibration error on the fit data.

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
        scaled (``p_k^(1/T)`` renormalised). Scores that look like the other kind are an error
        (probabilities given as logits, or values outside ``[0, 1]`` given as ``"proba"``).
    roi : {None, "foreground"}, default=None
        ``"foreground"``: fit only inside the bounding box of the true foreground (labels other
        than 0) grown by ``margin`` voxels, so the easy background does not dominate.
    margin : int, default=10
        Margin of the ``"foreground"`` box, in voxels.
    ignore_index : int, optional
        Label whose voxels are left out of the fit and the score.
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
                 input_kind="logits", roi=None, margin=10, ignore_index=None,
                 max_voxels=2_000_000, batch_size=8, random_state=0, eps=1e-7,
                 alpha=1e-4, scales=(2.0, 6.0), use_image=True, top_label_weight=1.0):
        self.estimator = estimator
        self.mode = mode
        self.objective = objective
        self.n_bins = n_bins
        self.input_kind = input_kind
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

    # ------------------------------------------------------------------ parameters
    def _check_params(self):
        if self.mode not in ("global", "classwise", "local"):
            raise ValueError("mode must be 'global' or 'classwise' (one temperature, one per "
                             f"class) or 'local' (a map), got {self.mode!r}")
        if self.objective not in ("nll", "ece"):
            raise ValueError(f"objective must be 'nll' or 'ece', got {self.objective!r}")
        if self.objective == "ece" and self.mode != "global":
            raise ValueError("objective='ece' fits one global temperature; use mode='global' "
                             "(class-wise temperatures are fitted by NLL)")
        if self.input_kind not in ("logits", "proba"):
            raise ValueError(f"input_kind must be 'logits' or 'proba', got {self.input_kind!r}")
        if self.roi not in (None, "foreground"):
            raise ValueError(f"roi must be None or 'foreground', got {self.roi!r}")
        for name, low in (("margin", 0), ("max_voxels", 1), ("batch_size", 1), ("n_bins", 1)):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, numbers.Integral) or val < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {val!r}")
        if self.ignore_index is not None and (
                isinstance(self.ignore_index, bool)
                or not isinstance(self.ignore_index, numbers.Integral)):
            raise TypeError(f"ignore_index must be an integer or None, got {self.ignore_index!r}")
        if self.random_state is not None and (
                isinstance(self.random_state, bool)
                or not isinstance(self.random_state, numbers.Integral)):
            raise TypeError(f"random_state must be an integer or None, got {self.random_state!r}")
        if not (isinstance(self.eps, numbers.Real) and 0 < self.eps < 1):
            raise ValueError(f"eps must be a number in (0, 1), got {self.eps!r}")
        for name in ("alpha", "top_label_weight"):
            a = getattr(self, name)
            if isinstance(a, bool) or not isinstance(a, numbers.Real) or not 0 <= a < np.inf:
                raise ValueError(f"{name} must be a finite number >= 0, got {a!r}")
        sc = self.scales
        if not isinstance(sc, (list, tuple)) or len(sc) > 4 or any(
                isinstance(v, bool) or not isinstance(v, numbers.Real) or not 0.5 <= v <= 64
                for v in sc) or len(set(map(float, sc))) != len(sc):
            raise ValueError("scales must be a list of at most 4 distinct smoothing widths in "
                             f"[0.5, 64] voxels, got {sc!r}")
        if not isinstance(self.use_image, (bool, np.bool_)):
            raise TypeError(f"use_image must be True or False, got {self.use_image!r}")

    def _make_estimator(self, X):
        est = self.estimator
        if est is None:
            return None
        if not isinstance(est, (str, os.PathLike)) and not callable(
                getattr(est, "transform", None)):
            raise TypeError("estimator must be None, a path to an ONNX file or a segmenter with "
                            f"transform(X) -> logits; got {type(est).__name__}")
        seg = resolve_segmenter(est, X, requires=("transform",))
        if getattr(seg, "activation_", "softmax") != "softmax":
            raise ValueError(
                "TemperatureCalibrator scales softmax logits over exclusive classes; the "
                f"segmenter's outputs are activation_={seg.activation_!r} (independent "
                "per-channel probabilities, or given probabilities), which it does not "
                "calibrate yet")
        return seg

    # ------------------------------------------------------------------ scores in batches
    def _check_scores(self, S, name):
        arr = check_scores(S, name=name, kind="logits")  # float, (N, K, ...), finite
        lo, hi = float(arr.min()), float(arr.max())
        if self.input_kind == "logits":
            if lo >= 0 and hi <= 1 and float(np.abs(arr.sum(axis=1) - 1).max()) <= 1e-3:
                raise ValueError(
                    f"{name} looks like probabilities (values in [0, 1] summing to 1 over axis "
                    "1) but input_kind='logits'; pass input_kind='proba' if they are")
        elif lo < -1e-6 or hi > 1 + 1e-6:
            raise ValueError(
                f"input_kind='proba' but {name} holds values in [{lo:.3g}, {hi:.3g}], outside "
                "[0, 1]; pass input_kind='logits' if these are logits")
        return arr

    def _to_log(self, arr):
        """Scores as float32 logits (probabilities become clipped log-probabilities)."""
        if self.input_kind == "proba":
            return np.log(np.maximum(arr, self.eps), dtype=np.float32)
        return arr.astype(np.float32, copy=False)

    def _score_batches(self, X):
        """Yield validated float32 logits ``(n, K, *spatial)`` batch by batch (one image per
        batch for lists of differently sized images)."""
        for z, _ in self._batches(X):
            yield z

    def _batches(self, X):
        """Yield (logits, the images they come from or None) batch by batch."""
        est = getattr(self, "estimator_", None)
        bs = int(self.batch_size)
        if est is None:
            if isinstance(X, (list, tuple)):
                for i, x in enumerate(X):
                    yield self._to_log(self._check_scores(np.asarray(x)[None], f"X[{i}]")), None
                return
            arr = self._check_scores(X, "X")
            for s in range(0, arr.shape[0], bs):
                yield self._to_log(arr[s:s + bs]), None
            return
        n = len(X)
        for s in range(0, n, bs):
            xb = X[s:s + bs]
            out = est.transform(xb)
            if isinstance(out, list):
                parts = [(o[None], np.asarray(x)[None]) for o, x in zip(out, xb, strict=True)]
            else:
                parts = [(out, np.stack([np.asarray(x) for x in xb]) if isinstance(
                    xb, (list, tuple)) else np.asarray(xb))]
            for part, img in parts:
                z = self._to_log(self._check_scores(part, "the estimator's transform output"))
                yield z, img

    def _pairs(self, X, y):
        """Yield (logits, labels, voxel mask or None) per batch, labels checked against logits."""
        if isinstance(y, (list, tuple)):
            y_items = list(y)
        else:
            y_items = np.asarray(y)
            if y_items.ndim < 2:
                raise ValueError(f"y must have shape (N, *spatial), got shape {y_items.shape}")
        pos = 0
        for z, img in self._batches(X):
            n = z.shape[0]
            if pos + n > len(y_items):
                raise ValueError(f"X has more images than y has label maps ({len(y_items)})")
            yb = y_items[pos:pos + n]
            yb = np.stack([np.asarray(v) for v in yb]) if isinstance(yb, list) else yb
            pos += n
            k = getattr(self, "n_classes_", None) or z.shape[1]
            if z.shape[1] != k:
                raise ValueError(f"the scores have {z.shape[1]} classes on axis 1 but the "
                                 f"calibrator was fitted with {k}")
            yb = check_labels(yb, n_classes=k, shapes=(n, *z.shape[2:]),
                              ignore_index=self.ignore_index, name="y")
            mask = None
            if self.roi == "foreground":
                fg = yb if self.ignore_index is None else np.where(
                    yb == self.ignore_index, 0, yb)
                mask = foreground_roi(fg, margin=int(self.margin))
            if self.ignore_index is not None:
                valid = yb != self.ignore_index
                mask = valid if mask is None else mask & valid
            yield z, yb, mask, img
        if pos != len(y_items):
            raise ValueError(f"X has {pos} images but y has {len(y_items)} label maps")

    # ------------------------------------------------------------------ the sample
    def _reset_sample(self, k):
        n_strata = k * (len(CONFIDENCE_EDGES) + 1)
        self.sample_ = {
            "scores": np.zeros((k, 0), np.float32), "labels": np.zeros(0, np.int32),
            "strata": np.zeros(0, np.int32), "keys": np.zeros(0, np.float32),
            "counts": np.zeros(n_strata, np.int64),
        }
        if self.mode == "local":  # each voxel's local features, computed on its whole image
            self.sample_["features"] = np.zeros((len(self.feature_names_), 0), np.float32)
        self._thresh = np.full(n_strata, np.inf, np.float32)

    def _ingest(self, z, yb, mask, rng, img=None):
        """Add one batch's valid voxels to the sample (chunk by chunk, bounded memory)."""
        n, k = z.shape[:2]
        local = self.mode == "local"
        if local:
            img = self._image(z, img)
        z3, y2 = z.reshape(n, k, -1), yb.reshape(n, -1)
        m2 = None if mask is None else mask.reshape(n, -1)
        edges = np.asarray(CONFIDENCE_EDGES, np.float32)
        nb = edges.size + 1
        counts = self.sample_["counts"]
        if not hasattr(self, "_thresh"):  # after unpickling: rebuilt at the next merge
            self._thresh = np.full(counts.size, np.inf, np.float32)
        buf = []
        n_buf = 0
        flush = max(int(self.max_voxels) // 2, 1 << 16)
        vox = z3.shape[2]
        for i in range(n):
            if local:  # one image at a time bounds the feature stack's memory
                f2 = _local.local_features(z[i:i + 1], self._scales(),
                                           None if img is None else img[i:i + 1])
                f2 = f2.reshape(f2.shape[0], -1)
            for s in range(0, vox, _CHUNK):
                zc = z3[i, :, s:s + _CHUNK]  # (K, v) view
                yc = y2[i, s:s + _CHUNK]
                fc = f2[:, s:s + _CHUNK] if local else None
                if m2 is not None:
                    keep = m2[i, s:s + _CHUNK]
                    zc, yc = zc[:, keep], yc[keep]
                    fc = fc[:, keep] if local else None
                if yc.size == 0:
                    continue
                # max softmax probability = 1 / sum exp(z - max)
                conf = 1.0 / np.exp(zc - zc.max(axis=0)).sum(axis=0)
                strata = yc.astype(np.int32) * nb + np.searchsorted(edges, conf)
                counts += np.bincount(strata, minlength=counts.size)
                keys = rng.random(yc.size, dtype=np.float32)
                cand = keys < self._thresh[strata]  # a full stratum keeps only smaller keys
                if cand.any():
                    buf.append((zc[:, cand], yc[cand].astype(np.int32),
                                strata[cand], keys[cand], fc[:, cand] if local else None))
                    n_buf += int(cand.sum())
                if n_buf >= flush:
                    self._merge(buf)
                    buf, n_buf = [], 0
        self._merge(buf)

    def _merge(self, buf):
        smp = self.sample_
        if buf:
            smp["scores"] = np.concatenate([smp["scores"], *[b[0] for b in buf]], axis=1)
            smp["labels"] = np.concatenate([smp["labels"], *[b[1] for b in buf]])
            smp["strata"] = np.concatenate([smp["strata"], *[b[2] for b in buf]])
            smp["keys"] = np.concatenate([smp["keys"], *[b[3] for b in buf]])
            if "features" in smp:
                smp["features"] = np.concatenate([smp["features"], *[b[4] for b in buf]],
                                                 axis=1)
        cap = _water_fill(smp["counts"], int(self.max_voxels))
        n_strata = smp["counts"].size
        self._thresh = np.full(n_strata, np.inf, np.float32)
        if not np.isfinite(cap):
            return
        cap = int(cap)
        held = np.bincount(smp["strata"], minlength=n_strata)
        strata = smp["strata"]
        # group by stratum: a stable sort of small ints is numpy's O(n) radix sort
        order = np.argsort(strata.astype(np.int16) if n_strata < 2**15 else strata,
                           kind="stable")
        stops = np.cumsum(held)
        kept = []
        for st in np.flatnonzero(held):
            idx = order[stops[st] - held[st]:stops[st]]
            if held[st] >= cap:
                if held[st] > cap:  # keep the stratum's `cap` smallest keys
                    idx = idx[np.argpartition(smp["keys"][idx], cap - 1)[:cap]]
                # a full stratum admits only keys below its largest kept key
                self._thresh[st] = smp["keys"][idx].max()
            kept.append(idx)
        if held.max() > cap:
            kept = np.concatenate(kept)
            smp["scores"] = smp["scores"][:, kept]
            if "features" in smp:
                smp["features"] = smp["features"][:, kept]
            for key in ("labels", "strata", "keys"):
                smp[key] = smp[key][kept]

    def _weights(self):
        smp = self.sample_
        held = np.bincount(smp["strata"], minlength=smp["counts"].size)
        w = np.divide(smp["counts"], held, out=np.zeros(held.size), where=held > 0)
        return w[smp["strata"]]

    # ------------------------------------------------------------------ fitting
    def _start(self, k, img):
        self.n_classes_ = int(k)
        if self.mode == "local":
            c = img.shape[1] if self._wants_image() and img is not None else 0
            self.feature_names_ = _local.feature_names(k, self._scales(), c)
        self._reset_sample(k)

    # ------------------------------------------------------------------ local mode helpers
    def _scales(self):
        return tuple(float(v) for v in self.scales)

    def _wants_image(self):
        return bool(self.use_image) and getattr(self, "estimator_", None) is not None

    def _image(self, z, img):
        """The image batch the local features read (None when they read none), checked
        against the logits."""
        c = sum(n.startswith("intensity[") for n in self.feature_names_)
        if c == 0:
            return None
        if img is None:
            raise ValueError("the local temperature was fitted with the image intensity as a "
                             "feature, but no image reaches the calibrator")
        img = np.asarray(img)
        if img.ndim != z.ndim or img.shape[0] != z.shape[0] or img.shape[1] != c \
                or img.shape[2:] != z.shape[2:]:
            raise ValueError(
                f"use_image=True needs images (n, {c}, *spatial) on the grid of the logits "
                f"{z.shape}, got {img.shape}; pass use_image=False for networks whose output "
                "grid differs from their input's")
        return img

    def _log_temperature(self, z, img):
        if not hasattr(self, "coef_"):
            raise NotFittedError("mode='local' but no local map was fitted (mode was changed "
                                 "after fit); call fit")
        lt = _local.log_temperature(z, self._scales(), self._image(z, img), self.coef_,
                                    self.intercept_)
        return np.clip(lt, *LOG_T_BOUNDS, out=lt)

    def _rng(self):
        # a fresh stream per call, keyed on the voxels seen so far (saved with the sample)
        seen = int(self.sample_["counts"].sum()) if hasattr(self, "sample_") else 0
        seed = None if self.random_state is None else [int(self.random_state), seen]
        return np.random.default_rng(seed)

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
        fun = _objective(smp["scores"], smp["labels"], w, classwise)
        ece = None if classwise else _ece_objective(smp["scores"], smp["labels"], w,
                                                    int(self.n_bins))
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
        self.ece_before_ = np.nan if ece is None else ece(0.0)
        self.ece_after_ = np.nan if ece is None else ece(float(x[0]))
        self.n_iter_ = n_iter
        self.n_voxels_fit_ = int(smp["counts"].sum())
        self.n_voxels_sampled_ = int(smp["labels"].size)
        if self.mode == "local":
            self._solve_local(w)

    def _solve_local(self, w):
        """Fit ``log T = intercept_ + coef_ . features`` by penalised NLL, from the global
        temperature (or the previous map, in ``partial_fit``)."""
        smp = self.sample_
        feats = smp["features"]
        n_par = feats.shape[0] + 1
        if smp["labels"].size < LOCAL_MIN_VOXELS_PER_PARAMETER * n_par:
            raise ValueError(
                f"mode='local' fits {n_par} parameters and needs at least "
                f"{LOCAL_MIN_VOXELS_PER_PARAMETER * n_par} voxels, got {smp['labels'].size}")
        # standardised features: the penalty then weighs every feature alike
        wn = (w / w.sum()).astype(np.float32)
        mu = (feats @ wn).astype(np.float64)
        sd = np.sqrt(np.maximum((feats * feats) @ wn - mu * mu, 0))
        sd[sd < 1e-6] = 1.0  # a constant feature: its weight stays 0
        fs = ((feats - mu[:, None].astype(np.float32)) / sd[:, None].astype(np.float32))
        coef = getattr(self, "coef_", None)
        if coef is not None and np.size(coef) == n_par - 1:  # warm start (partial_fit)
            x0 = np.concatenate([[self.intercept_ + float(coef @ mu)], coef * sd])
        else:
            x0 = np.zeros(n_par)
            x0[0] = np.log(self.temperature_)
        # the penalty's centre: the global NLL temperature (alpha -> inf gives global scaling)
        fun = _local.local_objective(smp["scores"], fs, smp["labels"], w, float(self.alpha),
                                     LOG_T_BOUNDS, float(self.top_label_weight),
                                     np.log(self.temperature_))
        res = minimize(fun, x0, jac=True, method="L-BFGS-B")
        v = res.x[1:]
        self.coef_ = v / sd
        self.intercept_ = float(res.x[0] - self.coef_ @ mu)
        nll = _local.local_objective(smp["scores"], fs, smp["labels"], w, 0.0, LOG_T_BOUNDS)
        self.nll_after_ = float(nll(res.x)[0])
        self.ece_after_ = _local.local_ece(smp["scores"], fs, smp["labels"], w, res.x,
                                           LOG_T_BOUNDS, int(self.n_bins))
        self.n_iter_ = int(res.nit)

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
                     "feature_names_"):
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
            return z * a[:, None]
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
            if what == "labels" and self.mode != "classwise":
                outs.append(z.argmax(axis=1))  # T > 0 keeps the order: labels of the raw scores
                continue
            if what == "temperature":
                t = np.exp(self._log_temperature(z, img)) if self.mode == "local" else \
                    np.full((z.shape[0], *z.shape[2:]), self.temperature_, np.float32)
                outs.append(t)
                continue
            if self.mode == "local":  # class by class: cheaper than the generic softmax
                a = np.exp(-self._log_temperature(z, img))
                outs.append(_local.scaled_softmax(z, a, log=what == "logits"))
                continue
            u = self._scale(z, img)
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
        """Calibrated probabilities ``softmax(z / T)``, float32 ``(N, K, *spatial)``.

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
        mode, the one global temperature everywhere in global mode.

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
        """Calibrated logits: ``log softmax(z / T)`` (softmax of them is :meth:`predict_proba`).

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
        """Labels ``(N, *spatial)``; in global mode exactly the argmax of the raw scores.

        Parameters
        ----------
        X : images for the estimator, or scores with ``estimator=None``

        Returns
        -------
        ndarray of int ``(N, *spatial)``

        Examples
        --------
        >>> import numpy as np
        >>> z = np.array([[[[4.0, -4.0]], [[0.0, 0.0]]]], np.float32)
        >>> TemperatureCalibrator().fit(z, np.array([[[0, 1]]])).predict(z).tolist()
        [[[0, 1]]]
        """
        return self._outputs(X, "labels")

    def score(self, X, y):
        """Negative mean NLL of the calibrated probabilities (higher is better).

        Voxels outside the ROI (``roi="foreground"``) or with ``ignore_index`` do not count.

        Parameters
        ----------
        X : images for the estimator, or scores with ``estimator=None``
        y : array of int ``(N, *spatial)``

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
