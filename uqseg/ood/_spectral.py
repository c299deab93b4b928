"""SpectralOODDetector: spectral signatures of feature maps (Karimi & Gholipour), combined with
other per-image descriptors (``uqseg.ood._descriptors``)."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import clone
from sklearn.neighbors import NearestNeighbors
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import run
from uqseg.ood._base import _BaseOODDetector, _feature_segmenter, _knn_distance, _kth_euclidean
from uqseg.ood._descriptors import Layout, Spectrum, _check_layer, _Descriptor, spectrum_layers

COMBINE = ("mean", "max")
# the keywords of uqseg before descriptor objects (deprecated): old name -> descriptor parameter
DESCRIPTORS = ("spectrum+layout", "spectrum")  # values of the deprecated ``descriptor=``
OLD_SPECTRUM = {"grid": "grid", "n_neighbors": "n_neighbors", "normalize": "normalize",
                "metric": "metric", "eps": "eps"}
OLD_LAYOUT = {"layout_layer": "layer", "layout_grid": "grid",
              "layout_components": "n_components", "layout_neighbors": "n_neighbors"}
OLD_KEYWORDS = ("descriptor", *OLD_SPECTRUM, *OLD_LAYOUT)


def legacy_descriptors(old: dict) -> list:
    """The descriptor list that the deprecated keywords ``old`` (``grid=``, ``layout_grid=``,
    ``descriptor=`` ...) meant; keywords of a part that is not used are ignored, as before."""
    kind = old.get("descriptor", "spectrum+layout")
    if not isinstance(kind, str) or kind not in DESCRIPTORS:
        raise ValueError(f"descriptor must be one of {DESCRIPTORS}, got {kind!r}")
    out = [Spectrum(**{OLD_SPECTRUM[k]: v for k, v in old.items() if k in OLD_SPECTRUM})]
    if kind == "spectrum+layout":
        out.append(Layout(**{OLD_LAYOUT[k]: v for k, v in old.items() if k in OLD_LAYOUT}))
    return out


DEPRECATED = "deprecated"  # default of the old keywords: not given


def _is_set(v) -> bool:
    return not (isinstance(v, str) and v == DEPRECATED)


class SpectralOODDetector(_BaseOODDetector):
    """Spectral signatures of feature maps (Karimi & Gholipour, arXiv 2004.06569), with the
    activations' layout.

    One inference pass gives the feature maps that a list of per-image ``descriptors`` reads;
    each descriptor gives, per image, the distance to its nearest training images:

    - :class:`~uqseg.ood.Spectrum` (the paper): the singular values of each layer's pooled maps,
      ``log(s + eps) / ||log(s + eps)||_2``;
    - :class:`~uqseg.ood.Layout`: the coarse pooled maps, standardised and whitened on their
      principal axes. Singular values do not change when voxels are permuted, so a rotated or
      flipped image has nearly the same spectrum; the layout sees it.

    With one descriptor the score is minus its distance (``descriptors=[Spectrum()]`` is the
    paper's method). With several, each distance becomes a z-score with the mean and standard
    deviation of the training images' cross-fitted distances, and the score is minus their
    mean (``combine="mean"``) or their largest (``"max"``). The default,
    ``descriptors=None``, is ``[Spectrum(), Layout()]``.

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
        fitted; an ensemble gives its ``feature_member``'s features.
    layer : str or list of str, default="auto"
        Feature layer name(s) of the spectral signature (of every ``Spectrum`` whose own
        ``layer`` is None; see ``feature_layers_`` of the segmenter). ``"auto"`` takes the
        decoder blocks ``"dec1"``, ``"dec2"`` and the ``"bottleneck"`` when the model exports
        all three (models exported by :mod:`uqseg.training` name them); else
        ``"decoder_last"`` (the last decoder block, as the authors' code) and ``"bottleneck"``
        (either one alone if only one is there); else, for a network whose layers have no such
        names, the same blocks found from the graph's structure (the segmenter's
        ``layer_roles_``: decoder tensors at 1/4 and 1/2 of the input resolution and the
        bottleneck; with fewer than two of them, the last decoder tensor too; and the
        ``"stem"`` where the network normalises each image, whose later tensors have lost
        the intensity scale that shows noise and blur); else the model's preferred layer. A
        role name (``"bottleneck"``, ``"decoder_1/4"``, ``"decoder_1/2"``,
        ``"decoder_last"``, ``"stem"``) may be given for its tensor.
    descriptors : list of Spectrum or Layout, default=None
        The descriptors combined (``None``: ``[Spectrum(), Layout()]``). They are cloned at
        ``fit``; their parameters are reachable as ``descriptors__<i>__<name>`` in
        ``get_params``/``set_params`` (``set_params(descriptors__0__grid=8)``).
    contamination : float in (0, 0.5], default=0.05
        Expected fraction of outliers among training images; sets ``offset_`` when
        ``threshold="contamination"``.
    threshold : {"contamination", "karimi"}, default="contamination"
        ``"karimi"``: flag images whose score is below mean - 2.5 std of the training
        cross-fitted scores (the paper's rule on nearest-neighbour distances).
    combine : {"mean", "max"}, default="mean"
        How several descriptors' z-scores make the score.
    n_folds : int, default=5
        Contiguous blocks for the cross-fitted training distances (at most ``n_train``).
    grid, n_neighbors, normalize, metric, eps, descriptor, layout_layer, layout_grid, \
layout_components, layout_neighbors : deprecated
        The keywords of earlier versions still work, with a ``FutureWarning`` at ``fit``, and
        will be removed in a future release: they mean the equivalent ``descriptors`` list
        (``grid=8`` is ``descriptors=[Spectrum(grid=8), Layout()]``, ``layout_grid=2`` is
        ``[Spectrum(), Layout(grid=2)]``, ``descriptor="spectrum"`` is ``[Spectrum()]``).

    Attributes
    ----------
    estimator_ : segmenter
    descriptors_ : list of Spectrum or Layout
        Fitted copies of ``descriptors``: each has ``layers_`` (resolved names) and the
        training images' rows ``features_`` (``Layout`` also its standardisation and axes).
    layers_ : list of str
        ``layer`` resolved to names: the layers of every ``Spectrum`` whose own ``layer`` is
        None (each descriptor's are in its ``layers_``).
    signatures_ : ndarray of shape (n_train, L)
        The first ``Spectrum``'s training signatures (``L`` = channels summed over layers).
    dist_stats_ : ndarray of shape (n_descriptors, 2)
        Mean and standard deviation of each descriptor's cross-fitted training distances.
    train_scores_ : ndarray of shape (n_train,)
        Cross-fitted scores of the training images.
    offset_ : float
        ``decision_function = score_samples - offset_``.
    threshold_ : float
        ``-offset_``: with one descriptor the distance above which an image is an outlier;
        with several, the z-score.
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
    >>> ood.descriptors_
    [Spectrum(), Layout()]
    """

    _train_attr = None  # each fitted descriptor holds its own training rows (features_)

    def __init__(self, estimator, *, layer="auto", descriptors=None, contamination=0.05,
                 threshold="contamination", combine="mean", n_folds=5, grid=DEPRECATED,
                 n_neighbors=DEPRECATED, normalize=DEPRECATED, metric=DEPRECATED,
                 eps=DEPRECATED, descriptor=DEPRECATED, layout_layer=DEPRECATED,
                 layout_grid=DEPRECATED, layout_components=DEPRECATED,
                 layout_neighbors=DEPRECATED):
        self.estimator = estimator
        self.layer = layer
        self.descriptors = descriptors
        self.contamination = contamination
        self.threshold = threshold
        self.combine = combine
        self.n_folds = n_folds
        self.grid = grid
        self.n_neighbors = n_neighbors
        self.normalize = normalize
        self.metric = metric
        self.eps = eps
        self.descriptor = descriptor
        self.layout_layer = layout_layer
        self.layout_grid = layout_grid
        self.layout_components = layout_components
        self.layout_neighbors = layout_neighbors

    def fit(self, X, y=None):
        self._warn_deprecated()
        return super().fit(X, y)

    def partial_fit(self, X, y=None):
        self._warn_deprecated()
        return super().partial_fit(X, y)

    fit.__doc__ = _BaseOODDetector.fit.__doc__
    partial_fit.__doc__ = _BaseOODDetector.partial_fit.__doc__

    # ------------------------------------------------------------------ parameters
    def get_params(self, deep=True):
        out = super().get_params(deep=deep)
        if deep and isinstance(self.descriptors, (list, tuple)):
            for i, d in enumerate(self.descriptors):
                if isinstance(d, _Descriptor):
                    out[f"descriptors__{i}"] = d
                    out.update({f"descriptors__{i}__{k}": v
                                for k, v in d.get_params(deep=False).items()})
        return out

    def set_params(self, **params):
        own = {k: params.pop(k) for k in [k for k in params if k.startswith("descriptors__")]}
        super().set_params(**params)
        for key, value in own.items():
            _, idx, *rest = key.split("__", 2)
            descs = self.descriptors
            if not (isinstance(descs, (list, tuple)) and idx.isdigit()
                    and int(idx) < len(descs)):
                raise ValueError(f"Invalid parameter {key!r} for {type(self).__name__}: "
                                 f"descriptors is {descs!r}; set descriptors=[...] first")
            if rest:
                descs[int(idx)].set_params(**{rest[0]: value})
            else:  # replace one descriptor (in a new list: the caller's is not changed)
                descs = list(descs)
                descs[int(idx)] = value
                self.descriptors = descs
        return self

    def _old_keywords(self) -> dict:
        return {k: getattr(self, k) for k in OLD_KEYWORDS if _is_set(getattr(self, k))}

    def _warn_deprecated(self) -> None:
        old = self._old_keywords()
        if old and self.descriptors is None:
            warnings.warn(
                f"SpectralOODDetector({', '.join(f'{k}=' for k in old)}...) is deprecated and "
                f"will be removed in a future release; pass "
                f"descriptors={legacy_descriptors(old)!r} (uqseg.ood.Spectrum, "
                "uqseg.ood.Layout) instead", FutureWarning, stacklevel=3)

    def _descriptor_list(self) -> list:
        descs, old = self.descriptors, self._old_keywords()
        if old and descs is not None:
            raise TypeError(f"pass descriptors=[...] or the deprecated keywords "
                            f"{', '.join(old)}, not both")
        if old:
            return legacy_descriptors(old)
        if descs is None:
            return [Spectrum(), Layout()]
        if not isinstance(descs, (list, tuple)) or not descs or not all(
                isinstance(d, _Descriptor) for d in descs):
            raise TypeError("descriptors must be None or a non-empty list of uqseg.ood "
                            f"descriptors (Spectrum, Layout), got {descs!r}")
        return list(descs)

    def _check_params(self):
        self._check_common()
        _check_layer(self.layer, none=False)
        descs = self._descriptor_list()
        for i, d in enumerate(descs):
            try:
                d._check_params()
            except (ValueError, TypeError) as exc:
                raise type(exc)(f"descriptors[{i}] ({type(d).__name__}): {exc}") from exc
        if self.layer != "auto" and any(isinstance(d, Spectrum) and d.layer is not None
                                        for d in descs):
            raise ValueError(f"layer={self.layer!r} and a Spectrum descriptor's own layer are "
                             "both set; set the layer in one place")
        if not isinstance(self.combine, str) or self.combine not in COMBINE:
            raise ValueError(f"combine must be 'mean' or 'max', got {self.combine!r}")
        self._check_k(self.n_folds, "n_folds")
        if self.n_folds < 2:
            raise ValueError(f"n_folds must be at least 2, got {self.n_folds!r}")
        return descs

    def _setup(self):
        descs = [clone(d) for d in self._check_params()]
        seg = _feature_segmenter(self.estimator_)
        default = spectrum_layers(seg, self.layer)
        for d in descs:
            d._resolve(seg, default)
        self.layers_ = default
        self.descriptors_ = descs

    # ------------------------------------------------------------------ features
    def _feature_names(self) -> list[str]:
        names: list[str] = []
        for d in self.descriptors_:
            names += [n for n in d.layers_ if n not in names]
        return names

    def _features(self, X) -> dict:
        names = self._feature_names()
        out = run(self.estimator_, X, layers=names, proba=False)
        return {name: out[name] for name in names}

    def _describe(self, feats: dict) -> list:
        """Each descriptor's rows from the feature maps of one pass (also used by
        :func:`uqseg.assess`)."""
        return [d._extract(feats) for d in self.descriptors_]

    def _descriptors(self, X) -> list:
        return self._describe(self._features(X))

    def _store_train(self, D, append=False):
        for d, F in zip(self.descriptors_, D, strict=True):
            d.features_ = np.concatenate([d.features_, F], axis=0) if append else F

    def _spectrum(self):
        sp = next((d for d in getattr(self, "descriptors_", ()) if isinstance(d, Spectrum)),
                  None)
        if sp is None:
            raise AttributeError("signatures need a Spectrum descriptor")
        return sp

    @property
    def signatures_(self) -> np.ndarray:
        return self._spectrum().features_

    def signature(self, X) -> np.ndarray:
        """Spectral signatures ``(N, L)`` of images ``X`` (the first ``Spectrum`` descriptor,
        the paper's)."""
        check_is_fitted(self)
        sp = self._spectrum()
        out = run(self.estimator_, X, layers=sp.layers_, proba=False)
        return sp._extract(out)

    # ------------------------------------------------------------------ distances
    def _fit_model(self):
        descs = self.descriptors_
        n = descs[0].features_.shape[0]
        folds = self._folds(n)
        n_ref = n - np.bincount(folds).max()  # training images outside the largest fold
        for i, d in enumerate(descs):
            if n_ref < d.n_neighbors:
                raise ValueError(
                    f"descriptors[{i}] ({type(d).__name__}): n_neighbors={d.n_neighbors} needs "
                    f"at least {d.n_neighbors} training images outside each of the "
                    f"{folds.max() + 1} cross-fitting folds; got {n} images ({n_ref} outside "
                    "the largest fold): add images or lower it")
        for d in descs:
            d._learn()
        cache = self.__dict__["_cache"]  # emptied by _refit: parts and neighbours recomputed
        xfit = []
        for P, d in zip(self._train_parts(), descs, strict=True):
            dist = np.empty(n)
            for f in range(folds.max() + 1):
                out = folds == f
                dist[out] = _knn_distance(P[~out], P[out], d.n_neighbors, d._metric)
            xfit.append(dist)
        self.dist_stats_ = np.array([[d.mean(), max(d.std(), 1e-6 * d.mean(), 1e-12)]
                                     for d in xfit])
        cache["xfit"] = xfit

    def _folds(self, n):
        """Fold of each training image: ``n_folds`` contiguous blocks (slices stay together)."""
        return np.arange(n) * min(self.n_folds, n) // n

    def _train_parts(self):
        """Each descriptor's training rows in its distance space, computed once per fit."""
        cache = self.__dict__.setdefault("_cache", {})
        if "train_parts" not in cache:
            cache["train_parts"] = [d._embed(d.features_) for d in self.descriptors_]
        return cache["train_parts"]

    def _part_nn(self, i: int) -> NearestNeighbors:
        cache = self.__dict__.setdefault("_cache", {})
        key = f"nn{i}"
        if key not in cache:
            d = self.descriptors_[i]
            cache[key] = NearestNeighbors(n_neighbors=d.n_neighbors, algorithm="brute",
                                          metric=d._metric).fit(self._train_parts()[i])
        return cache[key]

    def _combine(self, dists):
        if len(dists) == 1:
            return -dists[0]
        z = [(d - m) / s for d, (m, s) in zip(dists, self.dist_stats_, strict=True)]
        return -(np.mean(z, axis=0) if self.combine == "mean" else np.max(z, axis=0))

    def _score(self, D):
        dists = []
        for i, (d, T, F) in enumerate(zip(self.descriptors_, self._train_parts(), D,
                                          strict=True)):
            P = d._embed(F)
            if d._metric == "euclidean":  # numpy: no per-call overhead of the neighbour search
                dists.append(_kth_euclidean(T, P, d.n_neighbors))
            else:
                dists.append(self._part_nn(i).kneighbors(P, n_neighbors=d.n_neighbors)[0][:, -1])
        return self._combine(dists)

    def _train_scores(self):
        return self._combine(self.__dict__["_cache"].pop("xfit"))
