"""Per-image quality features of a segmentation and its uncertainty, with their names.

:class:`QualityFeatures` is a scikit-learn transformer: images in, one row of features per
image out (segment-level entropy and uncertainty inside each predicted class and on its
boundary, predicted volumes, self-Dice, fragmentation, intensities, an uncertainty histogram;
the table of ``docs/quality.md``), from one pass of a segmenter through the segmenter protocol.
It is what :class:`uqseg.QualityRegressor` fits its default regressor on, and can feed a user's
own scikit-learn model. :func:`quality_features` computes the same table from probabilities and
an uncertainty map already at hand; :func:`maps_input` stacks them for a quality CNN.
"""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import available_maps, run
from uqseg._validation import check_images
from uqseg.metrics.uncertainty import binary_entropy
from uqseg.segmenter import resolve_segmenter
from uqseg.uncertainty import KINDS, entropy

__all__ = ["QualityFeatures", "feature_names", "maps_input", "quality_features"]

CHUNK = 32  # images per inference call: bounds the memory of member probabilities


# --------------------------------------------------------------------------- helpers
def is_ensemble(est) -> bool:
    """Whether ``est`` gives several predictions per image (mutual information)."""
    return "mutual_information" in available_maps(est)


def check_uncertainty(uncertainty) -> None:
    if uncertainty != "auto" and uncertainty not in KINDS:
        raise ValueError(f"uncertainty must be 'auto' or one of {KINDS}, got {uncertainty!r}")


def check_n_bins(n_bins) -> None:
    if isinstance(n_bins, bool) or not isinstance(n_bins, numbers.Integral) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive integer, got {n_bins!r}")


def is_sigmoid(est) -> bool:
    """Whether segmenter ``est`` outputs independent per-channel (sigmoid) probabilities."""
    return getattr(est, "activation_", "softmax") == "sigmoid"


def resolve_uncertainty(est, uncertainty: str, who: str, sigmoid_ok: bool = True) -> str:
    """The uncertainty kind for segmenter ``est`` (``"auto"``: mutual information for an
    ensemble, entropy otherwise); the segmenter must output softmax (or, where
    ``sigmoid_ok``, sigmoid) probabilities."""
    act = getattr(est, "activation_", "softmax")
    if act not in (("softmax", "sigmoid") if sigmoid_ok else ("softmax",)):
        raise ValueError(
            f"{who} needs a softmax (multi-class){' or sigmoid' if sigmoid_ok else ''} "
            f"segmenter; this one's outputs are activation_={act!r}, which its targets and "
            "features do not model. " + (
                "Given probabilities: wrap the network with activation='softmax' or "
                "'sigmoid' on its logits" if sigmoid_ok else
                "QualityRegressor (features) takes sigmoid networks"))
    ensemble = is_ensemble(est)
    kind = ("mutual_information" if ensemble else "entropy") if uncertainty == "auto" \
        else uncertainty
    if kind != "entropy" and not ensemble:
        raise ValueError(f"uncertainty={kind!r} needs an ensemble (an estimator with "
                         f"predict_members); {type(est).__name__} gives only 'entropy'")
    return kind


def chunks(X):
    """``(slice, images)`` over ``X``: ``CHUNK`` images at a time, or one by one for a list."""
    if isinstance(X, list):
        for i, x in enumerate(X):
            yield slice(i, i + 1), x[None]
        return
    for start in range(0, X.shape[0], CHUNK):
        sl = slice(start, min(start + CHUNK, X.shape[0]))
        yield sl, X[sl]


def _unc_scale(kind: str, n_classes: int) -> float:
    """Largest possible value of an uncertainty map: histograms and CNN inputs use [0, 1]
    (``n_classes=2`` for the binary maps of sigmoid channels)."""
    return 0.25 if kind == "variance" else float(np.log(n_classes))


def _batch_structure(nd: int) -> np.ndarray:
    """Face-neighbour structure that never connects two images of a batch."""
    return ndimage.generate_binary_structure(nd, 1)[None]


def _boundary(seg: np.ndarray) -> np.ndarray:
    """Inner boundary of a batch of masks ``(n, *sp)``: voxels of the mask with a face
    neighbour outside it (the image border counts as outside); what ``seg &
    ~binary_erosion(seg)`` gives, in a few slice comparisons."""
    inner = seg.copy()
    for ax in range(1, seg.ndim):
        idx = [slice(None)] * seg.ndim

        def at(sl, ax=ax, idx=idx):
            idx[ax] = sl
            return tuple(idx)

        inner[at(slice(1, None))] &= seg[at(slice(None, -1))]
        inner[at(slice(None, -1))] &= seg[at(slice(1, None))]
        inner[at(0)] = False
        inner[at(-1)] = False
    return seg & ~inner


def _argmax_max(proba: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class axis argmax (the first maximum, as ``ndarray.argmax``) and max of ``(n, K, ...)``
    probabilities, one pass per class (numpy reduces a short class axis slowly)."""
    best = proba[:, 0].copy()
    label = np.zeros(best.shape, np.int16)
    for c in range(1, proba.shape[1]):
        better = proba[:, c] > best
        label[better] = c
        np.maximum(best, proba[:, c], out=best)
    return label, best


def argmax_labels(proba: np.ndarray) -> np.ndarray:
    """``proba.argmax(axis=1)`` (int16), one pass per class."""
    return _argmax_max(proba)[0]


class _Region:
    """The voxels of a per-image mask ``(n, *sp)``: per-image means of values there by one
    gather and a per-image sum (float64), instead of full-size masked temporaries."""

    def __init__(self, mask: np.ndarray):
        self.n = mask.shape[0]
        self.flat = mask.reshape(self.n, -1)
        self.count = self.flat.sum(axis=1)
        self.image = np.repeat(np.arange(self.n), self.count)

    def take(self, values: np.ndarray) -> np.ndarray:
        """The region's voxels of ``values`` ``(n, *sp)``, image by image."""
        return values.reshape(self.n, -1)[self.flat]

    def mean_of(self, vals: np.ndarray, where: np.ndarray | None = None) -> np.ndarray:
        """Per-image mean of the region's voxel values ``vals`` (from :meth:`take`), over the
        voxels where ``where`` (a sub-region, boolean over the region's voxels); 0 where
        empty."""
        if where is None:
            count = self.count
        else:
            vals = vals[where]
            count = np.bincount(self.image[where], minlength=self.n)
        return self.sums(vals, count) / np.maximum(count, 1)

    @staticmethod
    def sums(vals: np.ndarray, count: np.ndarray) -> np.ndarray:
        """Sums (float64) of consecutive runs of ``count[i]`` values: the voxels of image
        ``i``, stored image after image."""
        out = np.zeros(len(count))
        full = count > 0
        if full.any():
            starts = np.cumsum(count) - count
            out[full] = np.add.reduceat(vals, starts[full], dtype=np.float64)
        return out

    def mean(self, values: np.ndarray) -> np.ndarray:
        return self.mean_of(self.take(values))


def _components(seg: np.ndarray) -> np.ndarray:
    """Connected components (face neighbours) per image of a batch of masks, in one
    labelling: labels run in scan order, so each image's count is the rise of the running
    maximum label."""
    face = _batch_structure(seg.ndim - 1)
    lab, _ = ndimage.label(seg, np.pad(face, [(1, 1)] + [(0, 0)] * (seg.ndim - 1)))
    top = np.maximum.accumulate(lab.reshape(lab.shape[0], -1).max(axis=1))
    return np.diff(top, prepend=0).astype(np.float64)


# --------------------------------------------------------------------------- the table
def feature_names(n_classes: int, kind: str, n_bins: int, sigmoid: bool = False) -> list[str]:
    """Names of the columns of :func:`quality_features`, in order: per foreground class
    ``c1 .. c{K-1}`` (softmax), or per channel ``ch0 .. ch{C-1}`` (``sigmoid``).

    Examples
    --------
    >>> names = feature_names(3, "entropy", 8)
    >>> len(names), names[:3], names[-1]
    (36, ['volume_c1', 'self_dice_c1', 'soft_volume_ratio_c1'], 'entropy_hist_7')
    """
    per_class = ["volume", "self_dice", "soft_volume_ratio", "mean_proba", "seg_binary_entropy",
                 "boundary_binary_entropy", f"seg_{kind}", f"boundary_{kind}", "boundary_fraction",
                 "log_components", "mean_intensity", "std_intensity"]
    structures = [f"ch{c}" for c in range(n_classes)] if sigmoid else \
        [f"c{c}" for c in range(1, n_classes)]
    names = [f"{f}_{c}" for c in structures for f in per_class]
    names += ["foreground_fraction", f"mean_{kind}", f"foreground_{kind}",
              "foreground_max_proba"]
    if kind != "entropy":  # else the same column as mean_entropy
        names.append("mean_entropy")
    names += [f"{kind}_hist_{b}" for b in range(n_bins)]
    return names


def quality_features(X: np.ndarray, proba: np.ndarray, uncertainty: np.ndarray, kind: str,
                     n_bins: int = 8, sigmoid: bool = False) -> np.ndarray:
    """Per-image quality features from images, probabilities and an uncertainty map.

    Softmax probabilities: the structures are the foreground classes ``1 .. K-1`` of the
    argmax. ``sigmoid``: every channel ``c`` is a structure, its mask ``p_c >= 0.5``, its
    uncertainty the channel's own map; the image-level columns read the union of the masks
    and the channel mean of the maps (binary maps: histogram scale ``log 2``).

    Parameters
    ----------
    X : ndarray of shape (N, C, *spatial)
    proba : ndarray of shape (N, K, *spatial)
        Softmax (or sigmoid) probabilities (for an ensemble, the mean over members).
    uncertainty : ndarray of shape (N, *spatial), or (N, K, *spatial) for sigmoid outputs
        The uncertainty map of kind ``kind`` (per channel for sigmoid outputs).
    kind : str
        One of :data:`uqseg.uncertainty.KINDS`: names the columns and sets the histogram's
        scale (``log K``, or 0.25 for variance).
    n_bins : int, default=8
    sigmoid : bool, default=False
        Whether ``proba`` holds independent per-channel probabilities.

    Returns
    -------
    ndarray of float64, shape (N, len(feature_names(K, kind, n_bins, sigmoid)))

    Examples
    --------
    >>> import numpy as np
    >>> P = np.zeros((1, 2, 4, 4)); P[0, 0] = 1.0; P[0, :, 1:3, 1:3] = [[[0.0]], [[1.0]]]
    >>> F = quality_features(np.zeros((1, 1, 4, 4)), P, np.zeros((1, 4, 4)), "entropy")
    >>> float(dict(zip(feature_names(2, "entropy", 8), F[0]))["volume_c1"])   # 4 of 16 voxels
    0.25
    """
    n, k = proba.shape[:2]
    per_channel = sigmoid and np.ndim(uncertainty) == proba.ndim
    unc = uncertainty.mean(axis=1) if per_channel else uncertainty
    # tissue intensities inside each predicted class: a changed contrast shows up here
    img = np.asarray(X, dtype=np.float64).mean(axis=1)
    masks = proba >= 0.5 if sigmoid else None
    pred, top = (None, proba.max(axis=1)) if sigmoid else _argmax_max(proba)
    n_vox = float(np.prod(proba.shape[2:]))
    cols = []
    for c in range(k) if sigmoid else range(1, k):
        seg = masks[:, c] if sigmoid else pred == c
        u = uncertainty[:, c] if per_channel else unc
        bnd = _boundary(seg)
        region = _Region(seg)
        on_bnd = region.take(bnd)  # the boundary as a part of the mask
        p = proba[:, c].astype(np.float64)
        pv = region.take(p)
        size = region.count.astype(np.float64)
        soft = p.reshape(n, -1).sum(axis=1)
        overlap = region.sums(pv, region.count)
        # Dice of the hard prediction against the model's own soft one: 1 when both are empty
        denom = soft + size
        self_dice = np.divide(2 * overlap, denom, out=np.ones(n), where=denom > 1e-6)
        hv = binary_entropy(pv)  # only where it is averaged: the mask and its boundary
        uv = region.take(u)
        iv = region.take(img)
        mean_img = region.mean_of(iv)
        cols += [
            size / n_vox,
            self_dice,
            np.minimum(np.divide(soft, size, out=np.zeros(n), where=size > 0), 10.0),
            region.mean_of(pv),
            region.mean_of(hv),
            region.mean_of(hv, on_bnd),
            region.mean_of(uv),
            region.mean_of(uv, on_bnd),
            np.divide(np.bincount(region.image[on_bnd], minlength=n), size,
                      out=np.zeros(n), where=size > 0),
            np.log1p(_components(seg)),
            mean_img,
            np.sqrt(np.maximum(region.mean_of(iv ** 2) - mean_img ** 2, 0)),
        ]
    fg = masks.any(axis=1) if sigmoid else pred > 0
    # the histogram region includes a one-voxel rim: errors sit on the predicted border
    region = ndimage.binary_dilation(fg, _batch_structure(fg.ndim - 1))
    fg_region = _Region(fg)
    cols += [
        fg.reshape(n, -1).mean(axis=1),
        unc.reshape(n, -1).mean(axis=1),
        fg_region.mean(unc),
        fg_region.mean(top),
    ]
    if kind != "entropy":
        h = binary_entropy(proba).mean(axis=1) if sigmoid else entropy(proba)
        cols.append(h.reshape(n, -1).mean(axis=1))
    scale = _unc_scale(kind, 2 if sigmoid else k)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    scaled = np.clip(unc / scale, 0.0, 1.0)
    hist = np.zeros((n, n_bins))
    for i in range(n):
        vals = scaled[i][region[i]]
        if vals.size:
            hist[i] = np.histogram(vals, bins=edges)[0] / vals.size
    cols += list(hist.T)
    return np.column_stack(cols).astype(np.float64)


def maps_input(X: np.ndarray, proba: np.ndarray, unc: np.ndarray, kind: str) -> np.ndarray:
    """Stack ``(image, probabilities, uncertainty / max)`` into the CNN input.

    Parameters
    ----------
    X : ndarray of shape (N, C, *spatial)
    proba : ndarray of shape (N, K, *spatial)
    unc : ndarray of shape (N, *spatial)
    kind : str
        Uncertainty kind (sets the scale that maps the uncertainty to ``[0, 1]``).

    Returns
    -------
    ndarray of float32, shape (N, C + K + 1, *spatial)

    Examples
    --------
    >>> import numpy as np
    >>> X = np.zeros((2, 1, 4, 4)); P = np.full((2, 3, 4, 4), 1 / 3)
    >>> m = maps_input(X, P, np.full((2, 4, 4), np.log(3)), "entropy")
    >>> m.shape, float(m[0, -1, 0, 0])
    ((2, 5, 4, 4), 1.0)
    """
    scale = _unc_scale(kind, proba.shape[1])
    u = np.clip(unc / scale, 0.0, 1.0)[:, None]
    return np.concatenate([X, proba, u], axis=1).astype(np.float32)


# --------------------------------------------------------------------------- transformer
class QualityFeatures(TransformerMixin, BaseEstimator):
    """Per-image quality features of a segmenter's prediction, as a scikit-learn transformer.

    ``transform(X)`` runs the segmenter once per image (through the segmenter protocol: the
    probabilities and the uncertainty map from one pass) and returns :func:`quality_features`,
    one row per image, columns named by :meth:`get_feature_names_out`. It learns nothing:
    ``fit`` resolves the segmenter, the uncertainty kind and the number of classes. These are
    the features :class:`uqseg.QualityRegressor` regresses the Dice on (before its optional
    typicality and atlas columns); put the transformer in front of any scikit-learn regressor
    or classifier to build your own quality model.

    Parameters
    ----------
    estimator : segmenter, EnsembleSegmenter or str
        Anything following the segmenter protocol (``predict_proba``; ``predict_members`` or
        ``run`` with several maps for an ensemble). A path is wrapped in
        :class:`uqseg.OnnxSegmenter`; an unfitted segmenter is fitted with ``fit(X)``.
    uncertainty : {"auto", "entropy", "mutual_information", "expected_entropy", "variance"}
        The uncertainty map summarised. ``"auto"``: mutual information for an ensemble,
        softmax entropy otherwise.
    n_bins : int, default=8
        Bins of the uncertainty histogram over the predicted foreground (plus a one-voxel rim).

    Attributes
    ----------
    estimator_ : segmenter
    uncertainty_kind_ : str
    n_classes_ : int
    feature_names_ : list of str

    Examples
    --------
    >>> from sklearn.linear_model import RidgeCV
    >>> from sklearn.pipeline import make_pipeline
    >>> from uqseg import OnnxSegmenter, datasets
    >>> from uqseg.metrics import dice_score
    >>> from uqseg.quality_features import QualityFeatures
    >>> X, y = datasets.load_brain_tissue("val")
    >>> X, y = X[::8], y[::8]                                    # a few images
    >>> seg = OnnxSegmenter(datasets.reference_models()[0]).fit()
    >>> qf = QualityFeatures(seg).fit(X)
    >>> F = qf.transform(X[:3])
    >>> F.shape == (3, len(qf.get_feature_names_out()))
    True
    >>> [str(n) for n in qf.get_feature_names_out()[:2]]
    ['volume_c1', 'self_dice_c1']
    >>> dice_wm = dice_score(seg.predict(X), y, n_classes=3)[:, 1]  # true white-matter Dice
    >>> model = make_pipeline(QualityFeatures(seg), RidgeCV()).fit(X, dice_wm)
    >>> model.predict(X[:2]).shape
    (2,)
    """

    def __init__(self, estimator, uncertainty="auto", n_bins=8):
        self.estimator = estimator
        self.uncertainty = uncertainty
        self.n_bins = n_bins

    def fit(self, X, y=None):
        """Resolve the segmenter, the uncertainty kind and the number of classes.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays
            Images (an unfitted segmenter is fitted on them; a segmenter without
            ``n_classes_`` is run on the first one).
        y : ignored

        Returns
        -------
        self
        """
        self._check_params()
        X = check_images(X)
        est = resolve_segmenter(self.estimator, X, requires=("predict_proba",))
        kind = resolve_uncertainty(est, self.uncertainty, type(self).__name__)
        k = getattr(est, "n_classes_", None)
        if k is None:
            k = np.asarray(run(est, X[:1], maps=())["proba"]).shape[1]
        self._set_fitted(est, kind, int(k))
        return self

    def _check_params(self):
        check_uncertainty(self.uncertainty)
        check_n_bins(self.n_bins)

    def _set_fitted(self, est, kind: str, n_classes: int) -> QualityFeatures:
        self.estimator_, self.uncertainty_kind_, self.n_classes_ = est, kind, n_classes
        self.feature_names_ = feature_names(n_classes, kind, int(self.n_bins), is_sigmoid(est))
        return self

    def transform(self, X) -> np.ndarray:
        """Features of images ``X``, one inference pass.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays

        Returns
        -------
        ndarray of float64, shape (N, len(feature_names_))
        """
        check_is_fitted(self)
        X = check_images(X)
        kind = self.uncertainty_kind_
        rows = []
        for _, xb in chunks(X):
            out = run(self.estimator_, xb, maps=(kind,))
            rows.append(self.transform_maps(xb, out["proba"], out[kind]))
        return np.concatenate(rows)

    def transform_maps(self, X, proba, uncertainty) -> np.ndarray:
        """Features from one pass's outputs already at hand (no inference).

        Parameters
        ----------
        X : ndarray of shape (N, C, *spatial)
        proba : ndarray of shape (N, K, *spatial)
        uncertainty : ndarray of shape (N, *spatial) ((N, K, *spatial) for sigmoid outputs)
            The map of kind ``uncertainty_kind_``, e.g. ``uqseg.assess(...)[kind]``.

        Returns
        -------
        ndarray of float64, shape (N, len(feature_names_))
        """
        check_is_fitted(self)
        proba = np.asarray(proba, dtype=np.float32)
        if proba.ndim < 3 or proba.shape[1] != self.n_classes_:
            raise ValueError(f"proba must have shape (N, {self.n_classes_}, *spatial), got "
                             f"{proba.shape}")
        uncertainty = np.asarray(uncertainty)
        sig = is_sigmoid(self.estimator_)
        want = proba.shape if sig else (proba.shape[0], *proba.shape[2:])
        if uncertainty.shape != want:
            raise ValueError(f"uncertainty must have shape {want} (one map per "
                             f"{'channel' if sig else 'image'}), got {uncertainty.shape}")
        return quality_features(np.asarray(X), proba, uncertainty, self.uncertainty_kind_,
                                int(self.n_bins), sig)

    def get_feature_names_out(self, input_features=None) -> np.ndarray:
        """Names of the columns of :meth:`transform` (``input_features`` is ignored: the
        input is images)."""
        check_is_fitted(self)
        return np.asarray(self.feature_names_, dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags
