"""The per-image descriptors that :class:`SpectralOODDetector` combines: ``Spectrum`` (Karimi &
Gholipour's spectral signature) and ``Layout`` (where the activations are).

Each descriptor is a small scikit-learn estimator (``get_params``/``set_params``, so ``clone``
of the detector deep-clones them) that owns its feature extraction and the space its
nearest-neighbour distance is measured in. The detector clones them at ``fit`` (fitted copies
in ``descriptors_``, each with ``layers_`` and its training ``features_``), cross-fits their
distances and combines them.
"""

from __future__ import annotations

from numbers import Integral, Real

import numpy as np
from sklearn.base import BaseEstimator

from uqseg.ood._base import _resolve_layers, _structural_layers
from uqseg.ood._signatures import _per_image, adaptive_avg_pool, spectral_signature

# measured defaults (docs/ood.md): named blocks of uqseg.training's export, else the paper's
AUTO_SPECTRUM = (("dec1", "dec2", "bottleneck"), ("decoder_last", "bottleneck"))
AUTO_LAYOUT = ("dec2", "decoder_last")
PREFERRED = ("decoder_last",)


def _check_grid(grid, name: str, allow_none: bool) -> None:
    if grid is None and allow_none:
        return
    g = (grid,) if isinstance(grid, Integral) else grid
    if not isinstance(g, (tuple, list)) or not g or any(
            isinstance(v, bool) or not isinstance(v, Integral) or v < 1 for v in g):
        raise ValueError(f"{name} must be {'None, ' if allow_none else ''}a positive int or "
                         f"a tuple of positive ints, got {grid!r}")


def _check_k(k, name: str) -> None:
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 1:
        raise ValueError(f"{name} must be a positive integer, got {k!r}")


def _check_layer(layer, none: bool) -> None:
    if layer is None and none:
        return
    names = [layer] if isinstance(layer, str) else layer
    if not isinstance(names, (list, tuple)) or not names or not all(
            isinstance(n, str) for n in names):
        raise TypeError(f"layer must be {'None, ' if none else ''}a layer name, 'auto' or a "
                        f"non-empty list of names, got {layer!r}")


def _check_grid_axes(grid, name: str, nsp: int) -> None:
    if grid is not None and not isinstance(grid, Integral) and len(grid) != nsp:
        raise ValueError(f"{name} has {len(grid)} entries but the features have {nsp} "
                         "spatial axes")


def spectrum_layers(seg, layer) -> list[str]:
    """The layers of a spectral signature: ``"auto"`` is the measured default."""
    if layer == "auto":
        full, paper = AUTO_SPECTRUM
        layer = (list(full) if all(n in seg.feature_layers_ for n in full)
                 else [n for n in paper if n in seg.feature_layers_] or "auto")
        if layer == "auto":  # no named layer: the same blocks found by structure
            layer = _structural_layers(seg, ("decoder_1/4", "decoder_1/2", "bottleneck"))
            if len(layer) < 2:
                layer = _structural_layers(seg, ("decoder_1/4", "decoder_1/2", "bottleneck",
                                                 "decoder_last"))
            # a network normalising each image keeps its intensity scale only in the stem
            layer = (layer + _structural_layers(seg, ("stem",))) if layer else "auto"
    return _resolve_layers(seg, layer, PREFERRED)


class _Descriptor(BaseEstimator):
    """One per-image descriptor: feature maps -> rows, rows -> a space for k-NN distances.

    Subclasses implement ``_check_params``, ``_resolve(seg, default_layers)`` (sets
    ``layers_``), ``_extract(feats)`` -> ``(N, width)``, and may override ``_learn`` (statistics
    from ``features_``) and ``_embed`` (the coordinates distances are measured in).
    """

    def _learn(self) -> None:
        """Statistics from the training rows ``features_`` (none by default)."""

    def _embed(self, F: np.ndarray) -> np.ndarray:
        return F

    @property
    def _metric(self) -> str:
        return "euclidean"


class Spectrum(_Descriptor):
    """Karimi & Gholipour's spectral signature of one or several feature layers.

    Each layer's maps ``(C, *spatial)`` are average-pooled to ``grid`` (any image size gives the
    same length), reshaped to a (voxels x channels) matrix whose ``C`` singular values ``s`` give
    ``log(s + eps) / ||log(s + eps)||_2``. Several layers give the concatenation divided by
    ``sqrt(n_layers)`` (unit norm again). The distance is to the ``n_neighbors``-th nearest
    training signature.

    Parameters
    ----------
    layer : str, list of str or None, default=None
        ``None``: the detector's ``layer`` (its ``"auto"`` takes the decoder blocks ``"dec1"``,
        ``"dec2"`` and the ``"bottleneck"`` when the model exports all three, else
        ``"decoder_last"`` and ``"bottleneck"``, else the same blocks found from the graph's
        structure; see :class:`SpectralOODDetector`). A name, role name or list of them reads
        those layers whatever the detector's ``layer``.
    grid : int, tuple of int or None, default=16
        Cells per spatial axis after adaptive average pooling; ``None`` keeps the maps as they
        are (then signatures depend on the image size).
    normalize : {"l2", None}, default="l2"
        Divide ``log(s)`` by its L2 norm (the paper) or keep it raw.
    eps : float, default=1e-6
        Added to the singular values before the log.
    n_neighbors : int, default=1
        The distance is to this nearest training signature (1 as in the paper).
    metric : str, default="euclidean"
        Distance between signatures (any scikit-learn ``NearestNeighbors`` metric).

    Attributes
    ----------
    layers_ : list of str
        (fitted copies in the detector's ``descriptors_``) The layers read.
    features_ : ndarray of shape (n_train, n_channels)
        The training images' signatures (channels summed over the layers).

    Examples
    --------
    >>> from uqseg.ood import Layout, SpectralOODDetector, Spectrum
    >>> from uqseg import datasets
    >>> X_tr, _ = datasets.load_brain_tissue("train")
    >>> det = SpectralOODDetector(datasets.reference_models()[0],
    ...                           descriptors=[Spectrum(grid=8), Layout(n_components=32)])
    >>> det.set_params(descriptors__0__grid=16).fit(X_tr[::4]).descriptors_[0].layers_
    ['dec1', 'dec2', 'bottleneck']
    """

    def __init__(self, *, layer=None, grid=16, normalize="l2", eps=1e-6, n_neighbors=1,
                 metric="euclidean"):
        self.layer = layer
        self.grid = grid
        self.normalize = normalize
        self.eps = eps
        self.n_neighbors = n_neighbors
        self.metric = metric

    def _check_params(self) -> None:
        from sklearn.neighbors import VALID_METRICS

        _check_layer(self.layer, none=True)
        _check_grid(self.grid, "grid", True)
        if self.normalize not in ("l2", None):
            raise ValueError(f"normalize must be 'l2' or None, got {self.normalize!r}")
        if isinstance(self.eps, bool) or not isinstance(self.eps, Real) or not self.eps > 0:
            raise ValueError(f"eps must be a positive number, got {self.eps!r}")
        _check_k(self.n_neighbors, "n_neighbors")
        if not callable(self.metric) and self.metric not in VALID_METRICS["brute"]:
            raise ValueError(f"metric must be a scikit-learn NearestNeighbors metric (e.g. "
                             f"'euclidean', 'cosine'), got {self.metric!r}")

    def _resolve(self, seg, default_layers: list[str]) -> None:
        self.layers_ = list(default_layers) if self.layer is None else spectrum_layers(
            seg, self.layer)

    def _extract(self, feats: dict) -> np.ndarray:
        _check_grid_axes(self.grid, "grid", feats[self.layers_[0]][0].ndim - 1)
        sigs = [_per_image(feats[name], lambda f: spectral_signature(
            f, self.grid, eps=float(self.eps), normalize=self.normalize))
            for name in self.layers_]
        sig = np.concatenate(sigs, axis=1)
        return sig / np.sqrt(len(sigs)) if len(sigs) > 1 else sig

    @property
    def _metric(self):
        return self.metric


class Layout(_Descriptor):
    """Where the activations are: what the spectrum cannot see.

    Singular values do not change when voxels are permuted, so a rotated or flipped image has
    nearly the same spectral signature. The layout descriptor pools ``layer`` to a coarse
    ``grid`` (4 x 4 cells in 2-D), standardises each cell-channel with the training mean and
    standard deviation (floored at 1% of the largest, so dead units are not amplified),
    projects on the first ``n_components`` principal axes of the training set (whitened) and
    takes the distance to the ``n_neighbors``-th nearest training point.

    Parameters
    ----------
    layer : str, default="auto"
        ``"auto"``: ``"dec2"`` (the decoder block before the last) when exported, else
        ``"decoder_last"``, else the structural decoder tensor at 1/2 resolution or the last
        decoder tensor (the last one first in a network with a ``stem`` role, i.e. one that
        normalises each image), else the first layer of the detector's ``layer``. A role name
        (``"decoder_1/2"``, ...) may be given for its tensor.
    grid : int or tuple of int, default=4
        Cells per spatial axis.
    n_components : int, default=64
        Principal axes kept: at most this, ``n_train // 4`` and the number of axes whose
        singular value is at least 1e-3 of the first. The axes are fitted on all training
        images (also for the detector's cross-fitted distances).
    n_neighbors : int, default=1
        The distance is to this nearest training point.

    Attributes
    ----------
    layers_ : list of str
        One layer.
    features_ : ndarray of shape (n_train, channels * cells)
        The training images' pooled maps.
    mean_, scale_ : ndarray of shape (channels * cells,)
        Standardisation.
    components_ : ndarray of shape (n_kept, channels * cells)
        Whitened principal axes (training coordinates have unit variance along each).
    """

    def __init__(self, *, layer="auto", grid=4, n_components=64, n_neighbors=1):
        self.layer = layer
        self.grid = grid
        self.n_components = n_components
        self.n_neighbors = n_neighbors

    def _check_params(self) -> None:
        if not isinstance(self.layer, str):
            raise TypeError(f"layer must be a layer name or 'auto', got {self.layer!r}")
        _check_grid(self.grid, "grid", False)
        _check_k(self.n_components, "n_components")
        _check_k(self.n_neighbors, "n_neighbors")

    def _resolve(self, seg, default_layers: list[str]) -> None:
        ll = self.layer
        if ll == "auto":
            # per-image normalised networks (a stem was found): the last decoder block,
            # measured better there (docs/byo_network.md); else the block at 1/2
            roles = ("decoder_last", "decoder_1/2") if _structural_layers(seg, ("stem",)) \
                else ("decoder_1/2", "decoder_last")
            ll = next((n for n in AUTO_LAYOUT if n in seg.feature_layers_), None) \
                or next(iter(_structural_layers(seg, roles)), default_layers[0])
        self.layers_ = _resolve_layers(seg, ll, PREFERRED)[:1]

    def _extract(self, feats: dict) -> np.ndarray:
        _check_grid_axes(self.grid, "grid", feats[self.layers_[0]][0].ndim - 1)
        return _per_image(feats[self.layers_[0]], lambda f: adaptive_avg_pool(
            f, self.grid).reshape(f.shape[0], -1))

    def _learn(self) -> None:
        L = self.features_
        n = L.shape[0]
        self.mean_ = L.mean(axis=0)
        sd = L.std(axis=0)
        # near-constant cells/channels (dead units) are not blown up to unit variance
        self.scale_ = np.maximum(sd, 1e-2 * sd.max() + np.finfo(float).tiny)
        _, sv, vt = np.linalg.svd((L - self.mean_) / self.scale_, full_matrices=False)
        # keep at most n_components axes and n // 4 (whitened with ~n axes, n points form a
        # regular simplex: all equidistant), none with variance < 1e-6 of the first
        m = int(max(1, min(self.n_components, n // 4, np.count_nonzero(sv >= 1e-3 * sv[0]))))
        # whitened: training coordinates have unit variance along every kept axis
        self.components_ = vt[:m] * (np.sqrt(n) / sv[:m])[:, None]

    def _embed(self, F: np.ndarray) -> np.ndarray:
        return ((F - self.mean_) / self.scale_) @ self.components_.T


DESCRIPTOR_CLASSES = (Spectrum, Layout)
