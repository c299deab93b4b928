"""What every OOD detector shares: fitting, thresholds, prediction, feature access through
the segmenter protocol, and nearest-neighbour distances."""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator, OutlierMixin
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import feature_segmenter, run
from uqseg._numeric import one_blas_thread
from uqseg.segmenter import resolve_segmenter

THRESHOLDS = ("contamination", "karimi")
KARIMI_STD = 2.5  # mean + 2.5 std of the training nearest-neighbour distances


# ---------------------------------------------------------------------- nearest neighbours
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

    Subclasses set ``_train_attr`` (the fitted array of training descriptors, or override
    ``_store_train``) and implement
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
        with one_blas_thread():
            self._store_train(self._descriptors(X))
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
        with one_blas_thread():
            self._store_train(self._descriptors(X), append=True)
            self._refit()
        return self

    def _store_train(self, D, append=False):
        """Keep the training descriptors ``D`` (appended to the earlier ones)."""
        old = getattr(self, self._train_attr) if append else None
        setattr(self, self._train_attr, D if old is None else np.concatenate([old, D], axis=0))

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
        with one_blas_thread():
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
