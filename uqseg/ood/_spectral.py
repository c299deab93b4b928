"""SpectralOODDetector: spectral signatures of feature maps (Karimi & Gholipour)."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import run
from uqseg.ood._base import (
    _feature_segmenter,
    _FeatureDetector,
    _knn_distance,
    _kth_euclidean,
    _resolve_layers,
    _structural_layers,
)
from uqseg.ood._signatures import _per_image, adaptive_avg_pool, spectral_signature

# ---------------------------------------------------------------------- spectral
DESCRIPTORS = ("spectrum+layout", "spectrum")


class SpectralOODDetector(_FeatureDetector):
    """Spectral signatures of feature maps (Karimi & Gholipour, arXiv 2004.06569).

    One inference pass gives the chosen layers' feature maps ``(C, *spatial)``; each is
    average-pooled to a fixed ``grid`` (any image size gives the same signature length),
    reshaped to a (voxels x channels) matrix ``A`` whose ``C`` singular values ``s`` give the
    signature ``log(s + eps) / ||log(s + eps)||_2``. Several layers give the concatenation of
    their signatures divided by ``sqrt(n_layers)`` (unit norm again). No labels are used.

    ``descriptor="spectrum"`` is the paper's method: the score is minus the distance to the
    ``n_neighbors``-th nearest training signature.

    ``descriptor="spectrum+layout"`` (default) adds what the spectrum cannot see: singular values
    do not change when voxels are permuted, so a rotated or flipped image has nearly the same
    signature. The layout part pools ``layout_layer`` to a coarse ``layout_grid`` (4 x 4 cells
    in 2-D), standardises each cell-channel with the training mean and standard deviation,
    projects on the first ``layout_components`` principal axes of the training set (whitened)
    and takes the distance to the ``layout_neighbors``-th nearest training point. Each of the two
    distances is turned into a z-score with the mean and standard deviation of the training
    images' cross-fitted distances; the score is minus the mean (``combine="mean"``) or the
    larger (``"max"``) of the two z-scores. Both parts come from the same inference pass.

    Training distances (for the z-scores and ``offset_``) are cross-fitted over ``n_folds``
    contiguous blocks of the training images: each image is measured against the other blocks
    only. Slices of one scan are usually stored together, and a slice's neighbouring slices are
    near-copies of it; leave-one-out distances would then be far smaller than those of a new
    scan and ``offset_`` would flag several times ``contamination`` of new in-distribution
    images (measured on the embedded data: 21-25% of the val split instead of 5%).

    Parameters
    ----------
    estimator : str, path, OnnxSegmenter or EnsembleSegmenter
        The network. A path is wrapped in ``OnnxSegmenter``; an unfitted segmenter is cloned and
        fitted; for an ensemble (an object with ``members_``) the first member's features are
        used.
    layer : str or list of str, default="auto"
        Feature layer name(s) (see ``feature_layers_`` of the segmenter). ``"auto"`` takes the
        decoder blocks ``"dec1"``, ``"dec2"`` and the ``"bottleneck"`` when the model exports
        all three (models exported by :mod:`uqseg.training` name them); else
        ``"decoder_last"`` (the last decoder block, as the authors' code) and ``"bottleneck"``
        (either one alone if only one is there); else, for a network whose layers have no such
        names, the same blocks found from the graph's structure (the segmenter's
        ``layer_roles_``: decoder tensors at 1/4 and 1/2 of the input resolution and the
        bottleneck; with fewer than two of them, the last decoder tensor too); else the
        model's preferred layer. A role name (``"bottleneck"``, ``"decoder_1/4"``,
        ``"decoder_1/2"``, ``"decoder_last"``) may be given for its tensor.
    grid : int, tuple of int or None, default=16
        Cells per spatial axis after adaptive average pooling; ``None`` keeps the maps as they
        are (then signatures depend on the image size).
    n_neighbors : int, default=1
        The score uses the distance to this nearest training descriptor (1 as in the paper).
    contamination : float in (0, 0.5], default=0.05
        Expected fraction of outliers among training images; sets ``offset_`` when
        ``threshold="contamination"``.
    threshold : {"contamination", "karimi"}, default="contamination"
        ``"karimi"``: flag images whose score is below mean - 2.5 std of the training
        cross-fitted scores (the paper's rule on nearest-neighbour distances).
    normalize : {"l2", None}, default="l2"
        Divide ``log(s)`` by its L2 norm (the paper) or keep it raw.
    metric : str, default="euclidean"
        Distance between signatures (any scikit-learn ``NearestNeighbors`` metric).
    eps : float, default=1e-6
        Added to the singular values before the log.
    descriptor : {"spectrum+layout", "spectrum"}, default="spectrum+layout"
        ``"spectrum"``: Karimi & Gholipour's signature alone.
    layout_layer : str, default="auto"
        Layer of the layout descriptor; ``"auto"``: ``"dec2"`` (the decoder block before the
        last) when exported, else ``"decoder_last"``, else the structural decoder tensor at
        1/2 resolution or the last decoder tensor, else the first of ``layers_``.
    layout_grid : int or tuple of int, default=4
        Cells per spatial axis of the layout descriptor.
    layout_components : int, default=64
        Principal axes kept: at most this, ``n_train // 4`` and the number of axes whose
        singular value is at least 1e-3 of the first. The standard deviations used for
        standardising are floored at 1% of the largest (dead units are not amplified).
        The axes are fitted on all training images (also for the cross-fitted distances).
    layout_neighbors : int, default=1
        The layout distance is to this nearest training point.
    combine : {"mean", "max"}, default="mean"
        How the two parts' z-scores make the score (``descriptor="spectrum+layout"``).
    n_folds : int, default=5
        Contiguous blocks for the cross-fitted training distances (at most ``n_train``).

    Attributes
    ----------
    estimator_ : segmenter
    layers_ : list of str
    layout_layer_ : str or None
    descriptors_ : ndarray of shape (n_train, L + P)
        Per training image: spectral signature (``L`` = channels summed over layers) followed,
        with the layout part, by the ``P`` pooled layout features.
    signatures_ : ndarray of shape (n_train, L)
        The spectral signatures (a view of ``descriptors_``).
    layout_mean_, layout_scale_, layout_components_ : ndarray
        Standardisation and whitened principal axes ``(n_components, P)`` of the layout part.
    dist_stats_ : ndarray of shape (n_parts, 2)
        Mean and standard deviation of each part's cross-fitted training distances.
    train_scores_ : ndarray of shape (n_train,)
        Cross-fitted scores of the training images.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    threshold_ : float
        ``-offset_``: with ``descriptor="spectrum"`` the distance above which an image is an
        outlier; with the layout part, the z-score.
    n_train_ : int

    Examples
    --------
    >>> from uqseg import SpectralOODDetector, datasets
    >>> X_tr, _ = datasets.load_brain_tissue("train")
    >>> ood = SpectralOODDetector(datasets.reference_models()[0]).fit(X_tr[::4])
    >>> ood.predict(datasets.load_ood("ct")[:3])
    array([-1, -1, -1])
    >>> ood.predict(datasets.load_brain_tissue("test")[0][:3])
    array([1, 1, 1])
    """

    _train_attr = "descriptors_"
    _preferred_layers = ("decoder_last",)
    # measured defaults (docs/ood.md): named blocks of uqseg.training's export, else the paper's
    _auto_layers = (("dec1", "dec2", "bottleneck"), ("decoder_last", "bottleneck"))
    _auto_layout = ("dec2", "decoder_last")

    def __init__(self, estimator, layer="auto", grid=16, n_neighbors=1, contamination=0.05,
                 threshold="contamination", normalize="l2", metric="euclidean", eps=1e-6,
                 descriptor="spectrum+layout", layout_layer="auto", layout_grid=4,
                 layout_components=64, layout_neighbors=1, combine="mean", n_folds=5):
        self.estimator = estimator
        self.layer = layer
        self.grid = grid
        self.n_neighbors = n_neighbors
        self.contamination = contamination
        self.threshold = threshold
        self.normalize = normalize
        self.metric = metric
        self.eps = eps
        self.descriptor = descriptor
        self.layout_layer = layout_layer
        self.layout_grid = layout_grid
        self.layout_components = layout_components
        self.layout_neighbors = layout_neighbors
        self.combine = combine
        self.n_folds = n_folds

    @staticmethod
    def _check_grid(grid, name, allow_none):
        if grid is None and allow_none:
            return
        g = (grid,) if isinstance(grid, Integral) else grid
        if not isinstance(g, (tuple, list)) or not g or any(
                isinstance(v, bool) or not isinstance(v, Integral) or v < 1 for v in g):
            raise ValueError(f"{name} must be {'None, ' if allow_none else ''}a positive int or "
                             f"a tuple of positive ints, got {grid!r}")

    def _setup(self):
        self._setup_params()
        self.__dict__.pop("n_spectral_", None)
        seg = _feature_segmenter(self.estimator_)
        layer = self.layer
        if layer == "auto":
            full, paper = self._auto_layers
            layer = (list(full) if all(n in seg.feature_layers_ for n in full)
                     else [n for n in paper if n in seg.feature_layers_] or "auto")
            if layer == "auto":  # no named layer: the same blocks found by structure
                layer = _structural_layers(seg, ("decoder_1/4", "decoder_1/2", "bottleneck"))
                if len(layer) < 2:
                    layer = _structural_layers(seg, ("decoder_1/4", "decoder_1/2", "bottleneck",
                                                     "decoder_last"))
                layer = layer or "auto"
        self.layers_ = _resolve_layers(seg, layer, self._preferred_layers)
        self.layout_layer_ = None
        if self.descriptor == "spectrum+layout":
            ll = self.layout_layer
            if not isinstance(ll, str):
                raise TypeError(f"layout_layer must be a layer name or 'auto', got {ll!r}")
            if ll == "auto":
                ll = next((n for n in self._auto_layout if n in seg.feature_layers_), None) \
                    or next(iter(_structural_layers(seg, ("decoder_1/2", "decoder_last"))),
                            self.layers_[0])
            self.layout_layer_ = _resolve_layers(seg, ll, self._preferred_layers)[0]

    def _setup_params(self):
        self._check_k(self.n_neighbors)
        self._check_grid(self.grid, "grid", True)
        if self.normalize not in ("l2", None):
            raise ValueError(f"normalize must be 'l2' or None, got {self.normalize!r}")
        if not isinstance(self.eps, Real) or not self.eps > 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        if self.descriptor not in DESCRIPTORS:
            raise ValueError(f"descriptor must be one of {DESCRIPTORS}, got {self.descriptor!r}")
        if self.descriptor == "spectrum+layout":
            self._check_grid(self.layout_grid, "layout_grid", False)
            self._check_k(self.layout_components, "layout_components")
            self._check_k(self.layout_neighbors, "layout_neighbors")
            if self.combine not in ("mean", "max"):
                raise ValueError(f"combine must be 'mean' or 'max', got {self.combine!r}")
        self._check_k(self.n_folds, "n_folds")
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be at least 2, got {self.n_folds!r}")

    def _features(self, X) -> dict:
        names = self._feature_names()
        out = run(self.estimator_, X, layers=names, proba=False)
        return {name: out[name] for name in names}

    def _feature_names(self) -> list[str]:
        names = list(self.layers_)
        if self.layout_layer_ is not None and self.layout_layer_ not in names:
            names.append(self.layout_layer_)
        return names

    def _describe(self, feats: dict) -> np.ndarray:
        """Descriptors from the feature maps of one pass (also used by :func:`uqseg.assess`)."""
        nsp = feats[self.layers_[0]][0].ndim - 1
        for name, g in (("grid", self.grid), ("layout_grid", self.layout_grid)):
            if g is not None and not isinstance(g, Integral) and len(g) != nsp and (
                    name == "grid" or self.layout_layer_ is not None):
                raise ValueError(f"{name} has {len(g)} entries but the features have "
                                 f"{nsp} spatial axes")
        sigs = [_per_image(feats[name], lambda f: spectral_signature(
            f, self.grid, eps=float(self.eps), normalize=self.normalize))
            for name in self.layers_]
        sig = np.concatenate(sigs, axis=1)
        if len(sigs) > 1:
            sig = sig / np.sqrt(len(sigs))
        if not hasattr(self, "n_spectral_"):  # set on the first (fitting) call
            self.n_spectral_ = int(sig.shape[1])
        if self.layout_layer_ is None:
            return sig
        lay = _per_image(feats[self.layout_layer_], lambda f: adaptive_avg_pool(
            f, self.layout_grid).reshape(f.shape[0], -1))
        return np.concatenate([sig, lay], axis=1)

    @property
    def signatures_(self) -> np.ndarray:
        return self.descriptors_[:, :self.n_spectral_]

    def _layout_project(self, L):
        return ((L - self.layout_mean_) / self.layout_scale_) @ self.layout_components_.T

    def _fit_model(self):
        D = self.descriptors_
        n = D.shape[0]
        folds = self._folds(n)
        n_ref = n - np.bincount(folds).max()  # training images outside the largest fold
        for name, k in (("n_neighbors", self.n_neighbors),
                        ("layout_neighbors", self.layout_neighbors)):
            if (name == "n_neighbors" or self.layout_layer_ is not None) and n_ref < k:
                raise ValueError(
                    f"{name}={k} needs at least {k} training images outside each of the "
                    f"{folds.max() + 1} cross-fitting folds; got {n} images ({n_ref} outside "
                    "the largest fold): add images or lower it")
        if self.layout_layer_ is not None:
            L = D[:, self.n_spectral_:]
            self.layout_mean_ = L.mean(axis=0)
            sd = L.std(axis=0)
            # near-constant cells/channels (dead units) are not blown up to unit variance
            self.layout_scale_ = np.maximum(sd, 1e-2 * sd.max() + np.finfo(float).tiny)
            _, sv, vt = np.linalg.svd((L - self.layout_mean_) / self.layout_scale_,
                                      full_matrices=False)
            # keep at most layout_components axes and n // 4 (whitened with ~n axes, n points
            # form a regular simplex: all equidistant), none with variance < 1e-6 of the first
            m = int(max(1, min(self.layout_components, n // 4,
                               np.count_nonzero(sv >= 1e-3 * sv[0]))))
            # whitened: training coordinates have unit variance along every kept axis
            self.layout_components_ = vt[:m] * (np.sqrt(n) / sv[:m])[:, None]
        cache = self.__dict__["_cache"]  # emptied by _refit: parts and neighbours recomputed
        xfit = []
        for P, metric, k in zip(self._train_parts(), self._part_metrics(), self._part_k(),
                                strict=True):
            d = np.empty(n)
            for f in range(folds.max() + 1):
                out = folds == f
                d[out] = _knn_distance(P[~out], P[out], k, metric)
            xfit.append(d)
        self.dist_stats_ = np.array([[d.mean(), max(d.std(), 1e-6 * d.mean(), 1e-12)]
                                     for d in xfit])
        cache["xfit"] = xfit

    def _folds(self, n):
        """Fold of each training image: ``n_folds`` contiguous blocks (slices stay together)."""
        return np.arange(n) * min(self.n_folds, n) // n

    def _part_k(self):
        return [self.n_neighbors] + ([self.layout_neighbors] if self.layout_layer_ is not None
                                     else [])

    def _part_metrics(self):
        return [self.metric] + (["euclidean"] if self.layout_layer_ is not None else [])

    def _parts(self, D):
        """Descriptors ``D`` split into the spectral part and the projected layout part."""
        parts = [D[:, :self.n_spectral_]]
        if self.layout_layer_ is not None:
            parts.append(self._layout_project(D[:, self.n_spectral_:]))
        return parts

    def _train_parts(self):
        """``_parts`` of the training descriptors, computed once per fit."""
        cache = self.__dict__.setdefault("_cache", {})
        if "train_parts" not in cache:
            cache["train_parts"] = self._parts(self.descriptors_)
        return cache["train_parts"]

    def _parts_nn(self):
        cache = self.__dict__.setdefault("_cache", {})
        if "parts_nn" not in cache:
            cache["parts_nn"] = [NearestNeighbors(n_neighbors=k, algorithm="brute",
                                                  metric=mt).fit(P)
                                 for P, mt, k in zip(self._train_parts(), self._part_metrics(),
                                                     self._part_k(), strict=True)]
        return cache["parts_nn"]

    def _combine(self, dists):
        if self.layout_layer_ is None:
            return -dists[0]
        z = [(d - m) / s for d, (m, s) in zip(dists, self.dist_stats_, strict=True)]
        return -(np.mean(z, axis=0) if self.combine == "mean" else np.max(z, axis=0))

    def _score(self, D):
        parts = self._parts(D)
        if self.metric == "euclidean":  # numpy: no per-call overhead of the neighbour search
            dists = [_kth_euclidean(T, P, k) for T, P, k in
                     zip(self._train_parts(), parts, self._part_k(), strict=True)]
        else:
            dists = [nn.kneighbors(P, n_neighbors=k)[0][:, -1]
                     for P, nn, k in zip(parts, self._parts_nn(), self._part_k(), strict=True)]
        return self._combine(dists)

    def _train_scores(self):
        return self._combine(self.__dict__["_cache"].pop("xfit"))

    def signature(self, X) -> np.ndarray:
        """Spectral signatures ``(N, L)`` of images ``X`` (the paper's descriptor)."""
        check_is_fitted(self)
        return self._descriptors(X)[:, :self.n_spectral_]
