"""Image-level out-of-distribution detectors on top of a segmentation network.

Every detector follows scikit-learn's outlier-detector convention (as ``IsolationForest``):
``score_samples`` is higher for more in-distribution images, ``decision_function`` is
``score_samples - offset_``, ``predict`` gives ``+1`` (inlier) or ``-1`` (outlier), and
``offset_`` comes from ``contamination`` (the ``contamination`` quantile of the training scores)
or, with ``threshold="karimi"``, from mean - 2.5 std of the training scores (Karimi & Gholipour).
Training scores are cross-fitted (spectral, Mahalanobis) or leave-one-out (k-NN), so a training
image is never scored against itself.

- :class:`SpectralOODDetector`: singular-value signatures of one (or several) feature layers
  and the distance to the nearest training signature (Karimi & Gholipour, arXiv 2004.06569).
- :class:`UncertaintyOODDetector`: mean predictive entropy, 1 - max softmax or mutual
  information over the image or the predicted foreground.
- :class:`MahalanobisOODDetector`: Mahalanobis distance of global-average-pooled features with a
  Ledoit-Wolf covariance, optionally after PCA (Woodland et al. 2023).
- :class:`KNNOODDetector`: k-th nearest-neighbour distance of L2-normalised pooled features.

The base class owns fitting, thresholds and prediction; subclasses only turn images into
per-image descriptors (``_descriptors``) and descriptors into scores (``_score``).
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.covariance import LedoitWolf
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import available_maps, feature_segmenter, run
from uqseg.segmenter import resolve_segmenter

__all__ = [
    "KNNOODDetector",
    "MahalanobisOODDetector",
    "SpectralOODDetector",
    "UncertaintyOODDetector",
    "adaptive_avg_pool",
    "spectral_signature",
]

THRESHOLDS = ("contamination", "karimi")
KARIMI_STD = 2.5  # mean + 2.5 std of the training nearest-neighbour distances
_CHUNK = 16  # images per chunk where probability maps are reduced (bounds memory)


# ---------------------------------------------------------------------- array helpers
def adaptive_avg_pool(features: np.ndarray, grid) -> np.ndarray:
    """Average-pool ``(N, C, *spatial)`` maps to a fixed grid (as torch's adaptive pooling).

    Output cell ``i`` of an axis of length ``n`` averages input indices
    ``floor(i n / g) .. ceil((i + 1) n / g) - 1``, so any input size gives ``grid`` cells.

    Parameters
    ----------
    features : ndarray of shape (N, C, *spatial)
    grid : int or tuple of int
        Cells per spatial axis.

    Returns
    -------
    ndarray of shape (N, C, *grid), float64.

    Examples
    --------
    >>> import numpy as np
    >>> adaptive_avg_pool(np.arange(6.0).reshape(1, 1, 6), 2)
    array([[[1., 4.]]])
    """
    f = np.asarray(features)
    nsp = f.ndim - 2
    grid = (grid,) * nsp if isinstance(grid, Integral) else tuple(grid)
    for ax, g in enumerate(grid, start=2):
        n = f.shape[ax]
        if n == g:
            continue
        if n % g == 0:  # equal windows: a reshape and a mean, no cumulative sums
            f = f.reshape(f.shape[:ax] + (g, n // g) + f.shape[ax + 1:]).mean(
                axis=ax + 1, dtype=np.float64)
            continue
        i = np.arange(g)
        start, end = (i * n) // g, -((-(i + 1) * n) // g)
        cs = np.cumsum(f, axis=ax, dtype=np.float64)
        zero = np.zeros(cs.shape[:ax] + (1,) + cs.shape[ax + 1:])
        cs = np.concatenate([zero, cs], axis=ax)
        count = (end - start).reshape((-1,) + (1,) * (f.ndim - ax - 1))
        f = (np.take(cs, end, axis=ax) - np.take(cs, start, axis=ax)) / count
    return f.astype(np.float64, copy=False)


def singular_values(A: np.ndarray) -> np.ndarray:
    """All ``C`` singular values of each ``(C, V)`` matrix of a stack ``(N, C, V)``, descending.

    When ``V >= 2C`` they come from the eigenvalues of the ``C x C`` Gram matrix (much cheaper
    than an SVD of the tall matrix); otherwise from a batched SVD, padded with zeros to ``C``
    when ``V < C`` (the matrix has rank at most ``V``).
    """
    A = np.asarray(A, dtype=np.float64)
    n, c, v = A.shape
    if v >= 2 * c:
        lam = np.linalg.eigvalsh(A @ A.transpose(0, 2, 1))[:, ::-1]
        return np.sqrt(np.clip(lam, 0.0, None))
    s = np.linalg.svd(A, compute_uv=False)
    if s.shape[1] < c:
        s = np.concatenate([s, np.zeros((n, c - s.shape[1]))], axis=1)
    return s


def spectral_signature(features: np.ndarray, grid=8, *, eps: float = 1e-6,
                       normalize: str | None = "l2") -> np.ndarray:
    """Karimi & Gholipour's spectral signature of feature maps ``(N, C, *spatial)``.

    The maps are pooled to ``grid`` (``None``: kept as they are), reshaped to a (voxels x
    channels) matrix, and the ``C`` singular values ``s`` give ``log(s + eps)``, divided by its
    L2 norm when ``normalize="l2"``.

    Parameters
    ----------
    features : ndarray of shape (N, C, *spatial)
    grid : int, tuple of int or None, default=8
    eps : float, default=1e-6
        Guards ``log(0)`` for channels that are zero everywhere.
    normalize : {"l2", None}, default="l2"

    Returns
    -------
    ndarray of shape (N, C), float64.

    Examples
    --------
    >>> import numpy as np
    >>> f = np.random.default_rng(0).random((2, 4, 16, 16))
    >>> sig = spectral_signature(f, grid=8)
    >>> sig.shape, np.allclose(np.linalg.norm(sig, axis=1), 1.0)
    ((2, 4), True)
    """
    f = np.asarray(features)
    pooled = f.astype(np.float64) if grid is None else adaptive_avg_pool(f, grid)
    s = singular_values(pooled.reshape(pooled.shape[0], pooled.shape[1], -1))
    sig = np.log(s + eps)
    if normalize == "l2":
        sig /= np.maximum(np.linalg.norm(sig, axis=1, keepdims=True), np.finfo(float).tiny)
    return sig


def _per_image(features, fn) -> np.ndarray:
    """Apply ``fn`` to a batch ``(N, C, *sp)`` or, for a list of images, image by image."""
    if isinstance(features, list):
        return np.concatenate([fn(np.asarray(f)[None]) for f in features])
    return fn(features)


def _knn_distance(train: np.ndarray, query: np.ndarray | None, k: int, metric: str,
                  nn: NearestNeighbors | None = None) -> np.ndarray:
    """Distance to the k-th nearest training row; ``query=None``: leave-one-out on ``train``."""
    if nn is None:
        nn = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(train)
    dist, _ = nn.kneighbors(query, n_neighbors=k)
    return dist[:, k - 1]


def _kth_euclidean(train: np.ndarray, query: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each query row to its k-th nearest training row (batched)."""
    d2 = (np.einsum("ij,ij->i", query, query)[:, None] - 2.0 * query @ train.T
          + np.einsum("ij,ij->i", train, train)[None, :])
    kth = np.partition(d2, k - 1, axis=1)[:, k - 1] if k > 1 else d2.min(axis=1)
    return np.sqrt(np.maximum(kth, 0.0))


# ---------------------------------------------------------------------- estimator helpers
def _resolve_estimator(estimator, X):
    """Paths become an ``OnnxSegmenter``; an unfitted segmenter is cloned and fitted."""
    return resolve_segmenter(estimator, X, requires=("fit", "predict_proba"))


def _feature_segmenter(est):
    """The segmenter, checked to give feature maps (an ensemble gives its feature member's)."""
    return feature_segmenter(est, "feature-based detectors")


def _resolve_layers(seg, layer, preferred: tuple[str, ...]) -> list[str]:
    available = list(seg.feature_layers_)
    if not available:
        raise ValueError("the model exposes no feature layer; pass an ONNX model with "
                         "intermediate tensors")
    names = [layer] if isinstance(layer, str) else layer
    if not isinstance(names, (list, tuple)) or not names or not all(
            isinstance(n, str) for n in names):
        raise TypeError(f"layer must be a layer name, 'auto' or a non-empty list of names, "
                        f"got {layer!r}")
    out = []
    roles = getattr(seg, "layer_roles_", {}) or {}
    for name in names:
        if name == "auto":
            name = next((p for p in preferred if p in available), None) or next(
                (roles[p] for p in preferred if p in roles), available[0])
        if name not in available and name in roles:  # a structural role names its tensor
            name = roles[name]
        if name not in available:
            raise ValueError(f"layer {name!r} is not a feature layer of the model. "
                             f"{_layer_help(seg, available)}")
        if name not in out:
            out.append(name)
    return out


def _layer_help(seg, available) -> str:
    helper = getattr(seg, "layer_help", None)
    return helper() if callable(helper) else f"Choose from {list(available)[:12]}"


def _structural_layers(seg, roles) -> list[str]:
    """The tensors of ``roles`` that the segmenter found by structure, when the model names no
    layer itself (the zoo's names have these meanings)."""
    found = getattr(seg, "layer_roles_", {}) or {}
    out = []
    for r in roles:
        if r in found and found[r] in seg.feature_layers_ and found[r] not in out:
            out.append(found[r])
    return out


# ---------------------------------------------------------------------- base class
class _BaseOODDetector(OutlierMixin, BaseEstimator):
    """Fitting, thresholds and prediction shared by every detector.

    Subclasses set ``_train_attr`` (the fitted array of training descriptors) and implement
    ``_setup()`` (validate parameters, resolve layers), ``_descriptors(X)`` -> ``(N, L)``,
    ``_fit_model()`` (state from the training descriptors), ``_score(D)`` and
    ``_train_scores()`` (scores of the training images without themselves).
    """

    _train_attr = "descriptors_"

    def _check_common(self):
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {self.threshold!r}")
        c = self.contamination
        if isinstance(c, bool) or not isinstance(c, Real) or not 0 < c <= 0.5:
            raise ValueError(f"contamination must be a number in (0, 0.5], got {c!r}")

    def fit(self, X, y=None):
        """Fit on in-distribution images ``X`` (``y`` is ignored; no labels are used).

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays
        y : ignored

        Returns
        -------
        self
        """
        self._check_common()
        self.estimator_ = _resolve_estimator(self.estimator, X)
        self._setup()
        setattr(self, self._train_attr, self._descriptors(X))
        self._refit()
        return self

    def partial_fit(self, X, y=None):
        """Add in-distribution images ``X`` to the training set and update ``offset_``.

        The first call fits. Later calls keep the fitted network and layers, append the new
        descriptors and recompute every statistic, so the result equals ``fit`` on the union.

        Returns
        -------
        self
        """
        if not hasattr(self, "offset_"):
            return self.fit(X, y)
        self._check_common()
        new = self._descriptors(X)
        setattr(self, self._train_attr,
                np.concatenate([getattr(self, self._train_attr), new], axis=0))
        self._refit()
        return self

    def _refit(self):
        self._cache = {}
        self._fit_model()
        scores = np.asarray(self._train_scores(), dtype=np.float64)
        self.train_scores_ = scores
        if self.threshold == "karimi":
            self.offset_ = float(scores.mean() - KARIMI_STD * scores.std())
        else:
            self.offset_ = float(np.percentile(scores, 100.0 * self.contamination))
        self.threshold_ = -self.offset_
        self.n_train_ = int(scores.shape[0])

    def score_samples(self, X) -> np.ndarray:
        """Per-image score, higher = more in-distribution (minus a distance or uncertainty).

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays

        Returns
        -------
        ndarray of shape (N,)
        """
        check_is_fitted(self)
        return self._score(self._descriptors(X))

    def decision_function(self, X) -> np.ndarray:
        """``score_samples(X) - offset_``: negative for outliers."""
        return self.score_samples(X) - self.offset_

    def predict(self, X) -> np.ndarray:
        """``+1`` for in-distribution images, ``-1`` for outliers, shape ``(N,)``."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_cache", None)
        return state

    def _nn(self, k: int, metric: str) -> NearestNeighbors:
        cache = self.__dict__.setdefault("_cache", {})
        if "nn" not in cache:
            cache["nn"] = NearestNeighbors(n_neighbors=k, algorithm="brute", metric=metric).fit(
                getattr(self, self._train_attr))
        return cache["nn"]

    def _check_k(self, k, name="n_neighbors"):
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
            raise ValueError(f"{name} must be a positive integer, got {k!r}")

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        return tags


class _FeatureDetector(_BaseOODDetector):
    """Detectors that read one inference pass of feature maps."""

    _preferred_layers: tuple[str, ...] = ("bottleneck",)

    def _setup(self):
        self._setup_params()
        seg = _feature_segmenter(self.estimator_)
        self.layers_ = _resolve_layers(seg, self.layer, self._preferred_layers)

    def _feature_names(self) -> list[str]:
        return list(self.layers_)

    def _features(self, X) -> dict:
        out = run(self.estimator_, X, layers=self.layers_, proba=False)
        return {name: out[name] for name in self.layers_}

    def _descriptors(self, X) -> np.ndarray:
        return self._describe(self._features(X))


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


# ---------------------------------------------------------------------- baselines
class UncertaintyOODDetector(_BaseOODDetector):
    """Mean predictive uncertainty of the segmentation as an OOD score (the usual baseline).

    Parameters
    ----------
    estimator : str, path, OnnxSegmenter or EnsembleSegmenter
        With an ensemble (or any segmenter with ``predict_members``) entropy and max-softmax
        use the weighted mean probability, and mutual information becomes available.
    score : {"entropy", "max_softmax", "mutual_information"}, default="entropy"
        Per-voxel uncertainty: entropy of the (mean) probability, ``1 - max_k p_k``, or the
        ensemble's mutual information.
    region : {"image", "foreground"}, default="image"
        Average over the whole image or over the predicted foreground (label != 0; an image
        with no predicted foreground falls back to the whole image).
    contamination : float in (0, 0.5], default=0.05
    threshold : {"contamination", "karimi"}, default="contamination"

    Attributes
    ----------
    estimator_ : segmenter
    uncertainties_ : ndarray of shape (n_train, 1)
        Mean uncertainty of each training image.
    train_scores_, offset_, threshold_, n_train_
        As :class:`SpectralOODDetector` (``threshold_`` is an uncertainty level).

    Examples
    --------
    >>> from uqseg import UncertaintyOODDetector, datasets
    >>> X_tr, _ = datasets.load_brain_tissue("train")
    >>> det = UncertaintyOODDetector(datasets.reference_models()[0]).fit(X_tr[::4])
    >>> det.score_samples(X_tr[:2]).shape
    (2,)
    >>> det.predict(datasets.load_ood("ct")[:3])
    array([-1, -1, -1])
    """

    _train_attr = "uncertainties_"
    SCORES = ("entropy", "max_softmax", "mutual_information")
    REGIONS = ("image", "foreground")

    def __init__(self, estimator, score="entropy", region="image", contamination=0.05,
                 threshold="contamination"):
        self.estimator = estimator
        self.score = score
        self.region = region
        self.contamination = contamination
        self.threshold = threshold

    def _setup(self):
        if self.score not in self.SCORES:
            raise ValueError(f"score must be one of {self.SCORES}, got {self.score!r}")
        if self.region not in self.REGIONS:
            raise ValueError(f"region must be one of {self.REGIONS}, got {self.region!r}")
        est = self.estimator_
        if getattr(est, "activation_", "softmax") != "softmax":
            raise ValueError(
                "UncertaintyOODDetector scores the categorical entropy of a softmax segmenter; "
                f"this one's outputs are activation_={est.activation_!r}. Use "
                "SpectralOODDetector (it reads feature maps, whatever the output)")
        if self.score == "mutual_information" and "mutual_information" not in \
                available_maps(est):
            raise ValueError(
                "score='mutual_information' needs several predictions per image: pass an "
                "EnsembleSegmenter (several members or mc_samples > 0), got "
                f"{type(est).__name__}")

    def _maps(self, x: np.ndarray) -> np.ndarray:
        """Mean uncertainty over the region for a batch ``(n, C, *sp)`` -> ``(n,)``."""
        need_proba = self.score == "max_softmax" or self.region == "foreground"
        maps = () if self.score == "max_softmax" else (self.score,)
        out = run(self.estimator_, x, maps=maps, proba=need_proba)
        proba = np.asarray(out["proba"], dtype=np.float64) if need_proba else None
        u = 1.0 - proba.max(axis=1) if self.score == "max_softmax" \
            else np.asarray(out[self.score], dtype=np.float64)
        return self._reduce(u, proba)

    def _reduce(self, u: np.ndarray, proba: np.ndarray | None) -> np.ndarray:
        """Mean of the map ``u`` over the region (the foreground of ``proba``'s argmax)."""
        axes = tuple(range(1, u.ndim))
        if self.region == "image":
            return u.mean(axis=axes)
        fg = proba.argmax(axis=1) != 0
        n_fg = fg.sum(axis=axes)
        fg_mean = np.where(fg, u, 0).sum(axis=axes) / np.maximum(n_fg, 1)
        return np.where(n_fg > 0, fg_mean, u.mean(axis=axes))

    def _descriptors(self, X) -> np.ndarray:
        if isinstance(X, (list, tuple)):
            vals = [self._maps(np.asarray(x, dtype=np.float32)[None]) for x in X]
        else:
            X = np.asarray(X)
            vals = [self._maps(X[i:i + _CHUNK]) for i in range(0, max(len(X), 1), _CHUNK)]
        return np.concatenate(vals)[:, None]

    def _fit_model(self):
        pass

    def _score(self, D):
        return -D[:, 0]

    def _train_scores(self):
        return -self.uncertainties_[:, 0]


class MahalanobisOODDetector(_FeatureDetector):
    """Mahalanobis distance of pooled features (Woodland et al. 2023).

    Each image's feature maps are global-average-pooled to one vector per layer (concatenated
    over layers), optionally reduced by PCA fitted on the training images, and scored by minus
    the Mahalanobis distance to the training mean under a Ledoit-Wolf shrunk covariance.
    Training scores (for ``offset_``) are 5-fold cross-fitted, so images are not scored by a
    model that saw them.

    Parameters
    ----------
    estimator : str, path, OnnxSegmenter or EnsembleSegmenter
    layer : str or list of str, default="auto"
        ``"auto"``: ``"bottleneck"`` when the model exports it, else its preferred layer.
    n_components : int or None, default=None
        PCA dimensions (``None``: no PCA).
    contamination : float in (0, 0.5], default=0.05
    threshold : {"contamination", "karimi"}, default="contamination"

    Attributes
    ----------
    estimator_, layers_
    features_ : ndarray of shape (n_train, C)
        Pooled training features (before PCA).
    mean_ : ndarray of shape (d,)
    precision_ : ndarray of shape (d, d)
        Inverse of the Ledoit-Wolf covariance.
    components_ : ndarray of shape (d, C) or None
        PCA axes (rows) when ``n_components`` is set; ``pca_mean_`` is the centring vector.
    train_scores_, offset_, threshold_, n_train_

    Examples
    --------
    >>> from uqseg import MahalanobisOODDetector, datasets
    >>> X_tr, _ = datasets.load_brain_tissue("train")
    >>> det = MahalanobisOODDetector(datasets.reference_models()[0]).fit(X_tr[::4])
    >>> det.predict(datasets.load_ood("ct")[:3])
    array([-1, -1, -1])
    """

    _train_attr = "features_"
    _N_FOLDS = 5

    def __init__(self, estimator, layer="auto", n_components=None, contamination=0.05,
                 threshold="contamination"):
        self.estimator = estimator
        self.layer = layer
        self.n_components = n_components
        self.contamination = contamination
        self.threshold = threshold

    def _setup_params(self):
        if self.n_components is not None:
            self._check_k(self.n_components, "n_components")

    def _describe(self, feats: dict) -> np.ndarray:
        return np.concatenate([_per_image(feats[n], _global_pool) for n in self.layers_], axis=1)

    @staticmethod
    def _fit_stats(F, n_components):
        if n_components is not None:
            pca_mean = F.mean(axis=0)
            _, _, vt = np.linalg.svd(F - pca_mean, full_matrices=False)
            comps = vt[:n_components]
            F = (F - pca_mean) @ comps.T
        else:
            pca_mean = comps = None
        lw = LedoitWolf().fit(F)
        return pca_mean, comps, lw.location_, lw.precision_

    @staticmethod
    def _distance(F, pca_mean, comps, mean, precision):
        if comps is not None:
            F = (F - pca_mean) @ comps.T
        d = F - mean
        return np.sqrt(np.maximum(np.einsum("ij,jk,ik->i", d, precision, d), 0.0))

    def _fit_model(self):
        n, c = self.features_.shape
        if self.n_components is not None and self.n_components > min(n, c):
            raise ValueError(f"n_components={self.n_components} exceeds min(n_train, n_features)"
                             f" = {min(n, c)}")
        if n < 2:
            raise ValueError(f"MahalanobisOODDetector needs at least 2 training images, got {n}")
        self.pca_mean_, self.components_, self.mean_, self.precision_ = self._fit_stats(
            self.features_, self.n_components)

    def _score(self, D):
        return -self._distance(D, self.pca_mean_, self.components_, self.mean_, self.precision_)

    def _train_scores(self):
        F = self.features_
        n = F.shape[0]
        k = min(self._N_FOLDS, n // 2) if self.n_components is None else \
            min(self._N_FOLDS, n // (self.n_components + 1))
        if k < 2:
            return self._score(F)
        fold = np.arange(n) % k
        out = np.empty(n)
        for f in range(k):
            stats = self._fit_stats(F[fold != f], self.n_components)
            out[fold == f] = -self._distance(F[fold == f], *stats)
        return out


def _global_pool(f: np.ndarray) -> np.ndarray:
    return f.reshape(f.shape[0], f.shape[1], -1).mean(axis=2, dtype=np.float64)


class KNNOODDetector(_FeatureDetector):
    """k-th nearest-neighbour distance of L2-normalised pooled features (Sun et al. 2022).

    Parameters
    ----------
    estimator : str, path, OnnxSegmenter or EnsembleSegmenter
    layer : str or list of str, default="auto"
        ``"auto"``: ``"bottleneck"`` when the model exports it, else its preferred layer.
    k : int, default=5
        The score is minus the Euclidean distance to the k-th nearest training feature.
    contamination : float in (0, 0.5], default=0.05
    threshold : {"contamination", "karimi"}, default="contamination"

    Attributes
    ----------
    estimator_, layers_
    features_ : ndarray of shape (n_train, C)
        L2-normalised pooled training features.
    train_scores_, offset_, threshold_, n_train_

    Examples
    --------
    >>> from uqseg import KNNOODDetector, datasets
    >>> X_tr, _ = datasets.load_brain_tissue("train")
    >>> det = KNNOODDetector(datasets.reference_models()[0], k=5).fit(X_tr[::3])
    >>> det.predict(datasets.load_ood("ct")[:3])
    array([-1, -1, -1])
    """

    _train_attr = "features_"

    def __init__(self, estimator, layer="auto", k=5, contamination=0.05,
                 threshold="contamination"):
        self.estimator = estimator
        self.layer = layer
        self.k = k
        self.contamination = contamination
        self.threshold = threshold

    def _setup_params(self):
        self._check_k(self.k, "k")

    def _describe(self, feats: dict) -> np.ndarray:
        F = np.concatenate([_per_image(feats[n], _global_pool) for n in self.layers_], axis=1)
        return F / np.maximum(np.linalg.norm(F, axis=1, keepdims=True), np.finfo(float).tiny)

    def _fit_model(self):
        n = self.features_.shape[0]
        if n <= self.k:
            raise ValueError(f"k={self.k} needs more than {self.k} training images, got {n}")

    def _score(self, D):
        return -_knn_distance(self.features_, D, self.k, "euclidean", self._nn(self.k, "euclidean"))

    def _train_scores(self):
        return -_knn_distance(self.features_, None, self.k, "euclidean",
                              self._nn(self.k, "euclidean"))
