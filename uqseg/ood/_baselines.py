"""The usual OOD baselines beside the spectral detector: predictive uncertainty,
Mahalanobis distance and k-th nearest neighbour of pooled features."""

from __future__ import annotations

import numpy as np
from sklearn.covariance import LedoitWolf

from uqseg._inference import available_maps, run
from uqseg.ood._base import _BaseOODDetector, _FeatureDetector, _knn_distance
from uqseg.ood._signatures import _per_image

_CHUNK = 16  # images per chunk where probability maps are reduced (bounds memory)


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
        ensemble's mutual information. For sigmoid (multi-label) outputs each channel is a
        binary probability: its binary entropy, ``1 - max(p, 1 - p)`` or mutual information,
        averaged over the channels.
    region : {"image", "foreground"}, default="image"
        Average over the whole image or over the predicted foreground (label != 0; for
        sigmoid outputs, voxels where any channel has ``p >= 0.5``; an image with no
        predicted foreground falls back to the whole image).
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

    def __init__(self, estimator, *, score="entropy", region="image", contamination=0.05,
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
        return self._reduce_outputs(run(self.estimator_, x, maps=maps, proba=need_proba))

    @property
    def _binary(self) -> bool:
        """The segmenter's channels are independent binary probabilities."""
        est = self.estimator_
        act = getattr(est, "activation_", "softmax")
        return act == "sigmoid" or (act == "none" and getattr(est, "n_classes_", 0) == 1)

    def _reduce_outputs(self, out: dict) -> np.ndarray:
        """The per-image score from the segmenter's protocol outputs (also used by
        :func:`uqseg.assess`, which shares one pass)."""
        binary = self._binary
        proba = np.asarray(out["proba"], dtype=np.float64) if "proba" in out else None
        if self.score == "max_softmax":
            u = 1.0 - (np.maximum(proba, 1.0 - proba) if binary else proba.max(axis=1))
        else:
            u = np.asarray(out[self.score], dtype=np.float64)
        if binary:  # per channel: the mean over the channels
            u = u.mean(axis=1)
        axes = tuple(range(1, u.ndim))
        if self.region == "image":
            return u.mean(axis=axes)
        fg = (proba >= 0.5).any(axis=1) if binary else proba.argmax(axis=1) != 0
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

    def __init__(self, estimator, *, layer="auto", n_components=None, contamination=0.05,
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

    def __init__(self, estimator, *, layer="auto", k=5, contamination=0.05,
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
