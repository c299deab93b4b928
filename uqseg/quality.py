"""Per-image segmentation quality prediction (Mehrtash et al. 2020; DeVries & Taylor 2018).

:class:`QualityRegressor` runs a segmenter (or an ensemble) once per image, summarises the
prediction and its uncertainty into a few dozen per-image features (segment-level entropy and
mutual information inside the predicted structure and on its boundary, predicted volumes,
uncertainty histograms, ...) and regresses the true per-class Dice (or IoU) on them. A second
option follows DeVries & Taylor: a small CNN exported to ONNX that reads the stacked
``(image, probabilities, uncertainty map)`` and outputs the quality directly.

:func:`make_quality_set` widens a labelled split with corrupted copies so the regressor sees a
spread of good and bad segmentations.
"""

from __future__ import annotations

import hashlib
import numbers
import os

import numpy as np
from scipy import ndimage
from scipy.special import expit, logit
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import ExtraTreesRegressor, VotingRegressor
from sklearn.linear_model import RidgeCV
from sklearn.multioutput import MultiOutputRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import get_tags
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import available_maps, feature_segmenter, run
from uqseg._validation import check_images, check_labels
from uqseg.metrics.quality import quality_report
from uqseg.metrics.segmentation import dice_score, iou_score
from uqseg.metrics.uncertainty import binary_entropy
from uqseg.segmenter import resolve_segmenter
from uqseg.uncertainty import (
    KINDS,
    entropy,
)

__all__ = ["QualityRegressor", "atlas_agreement", "atlas_bank", "atlas_maps",
           "default_regressor",
           "make_quality_set", "maps_input", "typicality_distances", "TARGETS"]

TARGETS = ("dice", "iou")
TARGET_TRANSFORMS = ("identity", "logit")
REGRESSOR_INPUTS = ("auto", "features", "maps")
_CHUNK = 32  # images per inference call: bounds the memory of member probabilities
_EPS = 1e-3  # logit targets are clipped to [eps, 1 - eps]
TYPICALITY_GRID = 16  # pooling grid of the spectral signature (SpectralOODDetector's default)
TYPICALITY_K = 5  # the second typicality column averages the distances to this many neighbours
_SAME = 1e-4  # signature distance below which two images are the same image
TYPICALITY_NAMES = ("typicality_nn1", f"typicality_nn{TYPICALITY_K}")
ATLAS_GRID = 32  # class maps are pooled to this grid for the atlas comparison
ATLAS_ANGLES = tuple(range(0, 360, 15))  # in-plane rotations searched (degrees)
ATLAS_FOLDS = 5  # contiguous blocks of reference label maps for the cross-fitted fit features


# --------------------------------------------------------------------------- helpers
def default_regressor() -> VotingRegressor:
    """The feature regressor ``QualityRegressor(regressor=None)`` uses.

    The mean of extra trees and a standardised ridge regression (``VotingRegressor``; wrapped
    per output in ``MultiOutputRegressor`` by the estimator). Trees fit the kinds of failure they
    were shown closely but cannot extrapolate; the linear part can, so the average generalises
    better to degradations absent from the fitting set. Chosen by leave-one-degradation-kind-out
    cross-validation on the fitting set (``docs/quality.md``).
    """
    trees = ExtraTreesRegressor(n_estimators=300, min_samples_leaf=2, max_features=0.5,
                                random_state=0, n_jobs=1)
    linear = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 3, 13)))
    return VotingRegressor([("trees", trees), ("linear", linear)])


def _is_ensemble(est) -> bool:
    """Whether ``est`` gives several predictions per image (mutual information)."""
    return "mutual_information" in available_maps(est)


def _unc_scale(kind: str, n_classes: int) -> float:
    """Largest possible value of an uncertainty map: histograms and CNN inputs use [0, 1]."""
    return 0.25 if kind == "variance" else float(np.log(n_classes))


def _batch_structure(nd: int) -> np.ndarray:
    """Face-neighbour structure that never connects two images of a batch."""
    return ndimage.generate_binary_structure(nd, 1)[None]


def _boundary(seg: np.ndarray) -> np.ndarray:
    """Inner boundary of a batch of masks ``(n, *sp)`` (face neighbours, image border outside)."""
    return seg & ~ndimage.binary_erosion(seg, _batch_structure(seg.ndim - 1))


def _masked_mean(values: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``values`` over ``mask`` per image (axis 0 is the image); 0 where empty."""
    axes = tuple(range(1, values.ndim))
    count = mask.sum(axis=axes)
    total = np.where(mask, values, 0).sum(axis=axes, dtype=np.float64)
    return np.divide(total, count, out=np.zeros(len(count)), where=count > 0)


def atlas_names(n_classes: int) -> list[str]:
    """Names of the :func:`atlas_agreement` columns."""
    return [f"atlas_dice_c{c}" for c in range(1, n_classes)] + ["atlas_dice_joint"]


def feature_names(n_classes: int, kind: str, n_bins: int) -> list[str]:
    """Names of the columns :meth:`QualityRegressor.features` returns, in order."""
    per_class = ["volume", "self_dice", "soft_volume_ratio", "mean_proba", "seg_binary_entropy",
                 "boundary_binary_entropy", f"seg_{kind}", f"boundary_{kind}", "boundary_fraction",
                 "log_components", "mean_intensity", "std_intensity"]
    names = [f"{f}_c{c}" for c in range(1, n_classes) for f in per_class]
    names += ["foreground_fraction", f"mean_{kind}", f"foreground_{kind}",
              "foreground_max_proba"]
    if kind != "entropy":  # else the same column as mean_entropy
        names.append("mean_entropy")
    names += [f"{kind}_hist_{b}" for b in range(n_bins)]
    return names


def _features(X: np.ndarray, proba: np.ndarray, unc: np.ndarray, kind: str,
              n_bins: int) -> np.ndarray:
    """Per-image features from images ``(n, C, *sp)``, probabilities ``(n, K, *sp)`` and an
    uncertainty map ``(n, *sp)``."""
    n, k = proba.shape[:2]
    # tissue intensities inside each predicted class: a changed contrast shows up here
    img = np.asarray(X, dtype=np.float64).mean(axis=1)
    pred = proba.argmax(axis=1)
    n_vox = float(np.prod(proba.shape[2:]))
    cols = []
    for c in range(1, k):
        seg = pred == c
        bnd = _boundary(seg)
        p = proba[:, c].astype(np.float64)
        size = seg.reshape(n, -1).sum(axis=1).astype(np.float64)
        soft = p.reshape(n, -1).sum(axis=1)
        overlap = np.where(seg, p, 0).reshape(n, -1).sum(axis=1)
        # Dice of the hard prediction against the model's own soft one: 1 when both are empty
        denom = soft + size
        self_dice = np.divide(2 * overlap, denom, out=np.ones(n), where=denom > 1e-6)
        h = binary_entropy(p)
        n_comp = np.array([ndimage.label(s)[1] for s in seg], dtype=np.float64)
        cols += [
            size / n_vox,
            self_dice,
            np.minimum(np.divide(soft, size, out=np.zeros(n), where=size > 0), 10.0),
            _masked_mean(p, seg),
            _masked_mean(h, seg),
            _masked_mean(h, bnd),
            _masked_mean(unc, seg),
            _masked_mean(unc, bnd),
            np.divide(bnd.reshape(n, -1).sum(axis=1), size, out=np.zeros(n), where=size > 0),
            np.log1p(n_comp),
            _masked_mean(img, seg),
            np.sqrt(np.maximum(_masked_mean(img**2, seg) - _masked_mean(img, seg) ** 2, 0)),
        ]
    fg = pred > 0
    # the histogram region includes a one-voxel rim: errors sit on the predicted border
    region = ndimage.binary_dilation(fg, _batch_structure(fg.ndim - 1))
    cols += [
        fg.reshape(n, -1).mean(axis=1),
        unc.reshape(n, -1).mean(axis=1),
        _masked_mean(unc, fg),
        _masked_mean(proba.max(axis=1), fg),
    ]
    if kind != "entropy":
        cols.append(entropy(proba).reshape(n, -1).mean(axis=1))
    scale = _unc_scale(kind, k)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    scaled = np.clip(unc / scale, 0.0, 1.0)
    hist = np.zeros((n, n_bins))
    for i in range(n):
        vals = scaled[i][region[i]]
        if vals.size:
            hist[i] = np.histogram(vals, bins=edges)[0] / vals.size
    cols += list(hist.T)
    return np.column_stack(cols).astype(np.float64)


def _feature_member(est):
    """``est``, checked to give feature maps (an ensemble gives its feature member's, as
    :class:`uqseg.SpectralOODDetector` takes them)."""
    seg = feature_segmenter(est, "typicality=True")
    if not list(seg.feature_layers_):
        raise ValueError("typicality=True needs a model that exposes a feature layer")
    return seg


def _typicality_layer(seg) -> str:
    layers = list(seg.feature_layers_)
    found = (getattr(seg, "layer_roles_", None) or {}).get("decoder_last")  # by structure
    return "decoder_last" if "decoder_last" in layers else found if found in layers \
        else layers[0]


def typicality_distances(sig: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distances of signatures ``(n, L)`` to reference signatures ``(m, L)``.

    Returns ``(n, 2)``: Euclidean distance to the nearest reference signature and the mean
    distance to the ``TYPICALITY_K`` nearest. A reference signature equal to the query up to the
    float noise of batched inference (distance below ``1e-4``; signatures have unit norm and
    distinct images lie orders of magnitude further apart) is the image itself and is left out,
    so reference images get leave-one-out distances at fit and at predict time alike.
    """
    sig = np.asarray(sig, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    d2 = (np.einsum("ij,ij->i", sig, sig)[:, None] - 2.0 * sig @ ref.T
          + np.einsum("ij,ij->i", ref, ref)[None, :])
    d = np.sqrt(np.maximum(d2, 0.0))
    d[d < _SAME] = np.inf
    k = min(TYPICALITY_K, ref.shape[0])
    d.sort(axis=1)
    near = d[:, :k]
    finite = np.isfinite(near)
    nn1 = np.where(finite[:, 0], near[:, 0], 0.0)
    cnt = finite.sum(axis=1)
    mean_k = np.divide(np.where(finite, near, 0.0).sum(axis=1), cnt, out=np.zeros(len(sig)),
                       where=cnt > 0)
    return np.column_stack([nn1, mean_k])


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


def atlas_maps(labels, n_classes: int) -> np.ndarray:
    """Foreground class maps of 2-D label maps, pooled and centred for :func:`atlas_agreement`.

    Each class ``1..K-1`` becomes its fraction per cell of an ``ATLAS_GRID`` x ``ATLAS_GRID``
    grid (adaptive average pooling, so any image size gives the same grid), and the maps are
    shifted so that the foreground's centroid lies at the grid centre.

    Parameters
    ----------
    labels : int array of shape (N, H, W) or list of (H, W) arrays
    n_classes : int

    Returns
    -------
    ndarray of float32, shape (N, K - 1, ATLAS_GRID, ATLAS_GRID)
    """
    from uqseg.ood import adaptive_avg_pool

    items = list(labels) if isinstance(labels, list) else [labels]
    parts = []
    for lab in items:
        lab = np.asarray(lab)
        if lab.ndim == 2:
            lab = lab[None]
        onehot = np.stack([lab == c for c in range(1, n_classes)], axis=1).astype(np.float32)
        parts.append(adaptive_avg_pool(onehot, ATLAS_GRID).astype(np.float32))
    maps = np.concatenate(parts)
    centre = (ATLAS_GRID - 1) / 2
    for i, m in enumerate(maps):
        fg = m.sum(axis=0)
        if fg.sum() > 0:
            cy, cx = ndimage.center_of_mass(fg)
            maps[i] = ndimage.shift(m, (0, centre - cy, centre - cx), order=1, mode="constant")
    return maps


def atlas_bank(atlas: np.ndarray) -> np.ndarray:
    """Every reference map rotated by every angle of :data:`ATLAS_ANGLES` about the grid centre.

    Returns float32 ``(n_angles, M, K - 1, G * G)``; :func:`atlas_agreement` compares queries
    with it (rotating the references once instead of every query).
    """
    atlas = np.asarray(atlas, dtype=np.float32)
    rot = [atlas if a == 0 else ndimage.rotate(atlas, -a, axes=(2, 3), reshape=False, order=1,
                                               mode="constant") for a in ATLAS_ANGLES]
    return np.stack(rot).reshape(len(ATLAS_ANGLES), *atlas.shape[:2], -1)


def atlas_agreement(maps: np.ndarray, atlas: np.ndarray, exclude: np.ndarray | None = None,
                    bank: np.ndarray | None = None,
                    blocks: np.ndarray | None = None) -> np.ndarray:
    """How well predicted class maps match the reference label maps, in any in-plane pose.

    For each reference map turned by each angle of :data:`ATLAS_ANGLES` about the grid centre
    (the maps are centroid-aligned), the soft Dice ``2 sum(p a) / (sum p + sum a)`` with the
    predicted map, per class (1 where a class is empty in both). The best over poses and
    references: per class, and for the mean over classes (the single best-matching pose and
    reference). A version of reverse classification accuracy (Valindria et al. 2017) in which
    the references' own labels stand in for segmentations propagated from them, and a rotation
    search for registration.

    Parameters
    ----------
    maps : ndarray (n, K - 1, G, G)
        :func:`atlas_maps` of the predicted labels.
    atlas : ndarray (M, K - 1, G, G)
        :func:`atlas_maps` of the reference label maps.
    exclude : bool ndarray (n, M), optional
        Reference maps a query may not use (cross-fitting).
    bank : ndarray, optional
        ``atlas_bank(atlas)``, when already computed.
    blocks : int ndarray (M,), optional
        Block of each reference: the result is then the mean, over blocks, of the agreement
        without that block's references — distributed as cross-fitted values, where each image
        misses one block (what ``QualityRegressor`` uses at predict time).

    Returns
    -------
    ndarray of shape (n, K), float64: ``K - 1`` per-class columns, then the joint one.
    """
    n, k1 = maps.shape[:2]
    bank = atlas_bank(atlas) if bank is None else bank
    P = np.asarray(maps, dtype=np.float32).reshape(n, k1, -1)
    dice = np.empty((n, bank.shape[0] * bank.shape[1], k1), dtype=np.float64)
    for c in range(k1):
        B = bank[:, :, c].reshape(-1, P.shape[2])  # (angles * M, G * G)
        inter = (P[:, c] @ B.T).astype(np.float64)  # BLAS: einsum was 9x slower here
        den = P[:, c].sum(axis=1, dtype=np.float64)[:, None] + B.sum(axis=1, dtype=np.float64)
        np.divide(2.0 * inter, den, out=dice[:, :, c], where=den > 0)
        dice[:, :, c][den <= 0] = 1.0
    def best(d):
        return np.column_stack([d.max(axis=1), d.mean(axis=2).max(axis=1)])

    n_angles = bank.shape[0]
    if exclude is not None:
        dice[np.tile(exclude, (1, n_angles))] = -np.inf  # columns: angle-major, then M
    if blocks is None:
        return best(dice)
    cols = np.tile(np.asarray(blocks), n_angles)
    return np.mean([best(dice[:, cols != b]) for b in np.unique(blocks)], axis=0)


def _atlas_fit(pred_maps, label_maps, label_keys, groups=None):
    """Cross-fitted atlas features of the fitting images, the reference maps and their blocks.

    The references are the distinct ground-truth maps (corrupted copies share theirs). The
    groups (``groups``, else one per distinct map), in order of first appearance, are cut into
    ``ATLAS_FOLDS`` contiguous blocks (slices of one scan stay together); a fitting image is
    compared only with the references of the other blocks.
    """
    keep, block = _atlas_split(label_keys, groups)
    ref_block = block[keep]
    exclude = block[:, None] == ref_block[None, :]
    return atlas_agreement(pred_maps, label_maps[keep], exclude), label_maps[keep], ref_block


def _first_index(keys) -> tuple[np.ndarray, np.ndarray]:
    """(id of each key in order of first appearance, index of each id's first occurrence)."""
    seen: dict = {}
    ids = np.array([seen.setdefault(k, len(seen)) for k in keys])
    return ids, np.unique(ids, return_index=True)[1]


def _atlas_split(label_keys, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the distinct label maps (first occurrences) and each image's block: the
    groups (``groups``, else one per distinct map) cut into ``ATLAS_FOLDS`` contiguous blocks
    in order of first appearance."""
    _, keep = _first_index(label_keys)
    gid, first_of_group = _first_index(label_keys if groups is None else list(groups))
    n = len(first_of_group)
    return keep, (np.arange(n) * min(ATLAS_FOLDS, n) // n)[gid]


# --------------------------------------------------------------------------- estimator
class QualityRegressor(BaseEstimator):
    """Predict the per-class Dice (or IoU) of a segmentation without the ground truth.

    ``fit(X, y)`` runs the segmenter once per image, computes the true per-image, per-class
    Dice against ``y`` with :func:`uqseg.metrics.dice_score` and regresses it on features of
    the prediction and its uncertainty. Where a class is absent from both the prediction and
    the truth, Dice is undefined (NaN); the target is then ``empty_score`` (default 1: the
    network correctly found nothing).

    Parameters
    ----------
    estimator : segmenter, EnsembleSegmenter or str
        Anything following the segmenter protocol (``predict_proba``); an object with
        ``predict_members`` (an ensemble) gives mutual information too. A path is wrapped in
        :class:`uqseg.OnnxSegmenter`. A fitted estimator is used as is; an unfitted one is
        fitted with ``fit(X)``.
    regressor : sklearn regressor, object with fit/predict, str or path-like, optional
        ``None``: :func:`default_regressor`, the mean of extra trees and a standardised ridge
        regression on the features (chosen by leave-one-degradation-kind-out cross-validation,
        see ``docs/quality.md``).
        Any scikit-learn regressor is cloned and fitted on :meth:`features`; one without native
        multi-output support is wrapped in ``MultiOutputRegressor``. A path to an ONNX file is
        a pretrained quality network (DeVries & Taylor): it reads :func:`maps_input`
        ``(N, C + K + 1, *spatial)`` and outputs ``(N, K - 1)`` qualities in ``[0, 1]``; it is
        not retrained by ``fit``.
    target : {"dice", "iou"}, default="dice"
        What is regressed and returned by :meth:`predict` (DeVries & Taylor regress IoU).
    uncertainty : {"auto", "entropy", "mutual_information", "expected_entropy", "variance"}
        Uncertainty map summarised by the features (and fed to a quality CNN). ``"auto"``:
        mutual information for an ensemble, entropy of the softmax otherwise. Kinds other than
        ``"entropy"`` need an ensemble.
    target_transform : {"logit", "identity"}, default="logit"
        Fit the feature regressor on ``logit(clip(t, 1e-3, 1 - 1e-3))`` (as Mehrtash et al.
        regress logit(Dice)) or on ``t`` itself. Predictions are mapped back and clipped to
        ``[0, 1]``.
    n_bins : int, default=8
        Bins of the uncertainty histogram over the predicted foreground (plus a one-voxel rim).
    empty_score : float, default=1.0
        Target where a class is absent from both prediction and truth.
    regressor_input : {"auto", "features", "maps"}, default="auto"
        What a regressor object receives: the feature table, or the stacked maps of
        :func:`maps_input` (e.g. ``uqseg.training.quality_net.QualityNetRegressor``).
        ``"auto"``: maps for an ONNX path, features otherwise. Training on maps holds all of
        them in memory (``N x (C + K + 1)`` float32 images); an ONNX network runs chunk by chunk.
    typicality : {"auto", True, False}, default="auto"
        Add two *typicality* features (feature regressor only): the distance of the image's
        spectral signature (:func:`uqseg.ood.spectral_signature` of the ``decoder_last`` feature
        maps of the segmenter, or of an ensemble's first member, pooled to 16 x 16, as
        :class:`uqseg.SpectralOODDetector` computes it) to its nearest reference signature and
        the mean distance to the 5 nearest (:func:`typicality_distances`). A single
        ``OnnxSegmenter`` gives logits and features in one pass; an ensemble runs its first
        member a second time (about ``1 / n_members`` more inference). ``"auto"``: on when the
        regressor reads features and the segmenter (or an ensemble's first member) exposes a
        feature layer through ``run(X, layers)``, off otherwise; ``True`` makes either missing
        an error. Chosen by the leave-one-kind-out check of ``docs/quality.md``, where it lowers
        the error on unfitted degradation kinds.
    atlas : {"auto", True, False}, default="auto"
        Add ``K`` *atlas agreement* features (feature regressor, 2-D images): how well the
        predicted label map matches the fitting set's ground-truth label maps in the best
        in-plane pose (:func:`atlas_agreement`: centroid-aligned, rotations every 15 degrees,
        per class and jointly). A prediction that puts tissue where no reference has it (a
        confident, consistent failure that uncertainty does not show) scores low. At fit
        time each image is compared only with references outside its own block of 5
        contiguous blocks of distinct label maps, so its own (and its neighbouring slices')
        truth is never used. The blocks are built over ``groups`` of :meth:`fit` (the source
        of each image); without them identical label maps form a group, which does not join
        an image with its rotated copies, whose truth then leaks across blocks (measured: it
        makes predictions worse). ``"auto"``: on when ``groups`` is given, the images are 2-D,
        the regressor reads features and the labels hold at least 2 distinct maps; ``True``
        also without ``groups`` (safe when no fitting image is a moved copy of another) and
        makes the other conditions errors. Measured in ``docs/quality.md``.
    reference : array of shape (M, C, *spatial), list of arrays or None, default=None
        Clean images whose signatures are the reference (no labels needed; pass them
        intensity-normalised like the images to score, e.g. the clean copies
        ``make_quality_set`` puts first). ``None``: the fitting images themselves, each compared
        with the others (leave-one-out; weaker when the fitting set holds corrupted copies,
        which are then typical of each other). Used only when typicality is on.

    Attributes
    ----------
    estimator_ : segmenter
    regressor_ : estimator or str
        The fitted regressor, or the ONNX path.
    input_kind_ : {"features", "maps"}
    n_classes_ : int
    uncertainty_kind_ : str
    feature_names_ : list of str
    typicality_ : bool
        Whether the typicality features are used (``typicality`` resolved).
    reference_signatures_ : ndarray of shape (M, L)
        Only when typicality is on.
    typicality_layer_ : str
        Only when typicality is on.
    atlas_ : bool
        Whether the atlas agreement features are used (``atlas`` resolved).
    atlas_maps_ : ndarray of shape (M, K - 1, 32, 32)
        :func:`atlas_maps` of the distinct fitting label maps; only when ``atlas_`` is on.
    atlas_blocks_ : ndarray of shape (M,)
        Cross-fitting block of each reference map (predictions average over leaving each
        block out, as every fitting image missed its own).
    fit_report_ : dict
        ``quality_report`` of predicted against true targets on the fitting set (in-sample).

    Examples
    --------
    >>> from uqseg import QualityRegressor, datasets
    >>> X, y = datasets.load_brain_tissue("val")
    >>> qr = QualityRegressor(datasets.reference_models()[0]).fit(X[:32], y[:32])
    >>> qr.predict(X[32:34]).shape                          # Dice of grey and white matter
    (2, 2)
    >>> qr.flag(X[32:34], min_dice=0.0).tolist()            # nothing is below Dice 0
    [False, False]
    """

    def __init__(self, estimator, regressor=None, target="dice", uncertainty="auto",
                 target_transform="logit", n_bins=8, empty_score=1.0, regressor_input="auto",
                 typicality="auto", reference=None, atlas="auto"):
        self.estimator = estimator
        self.regressor = regressor
        self.target = target
        self.uncertainty = uncertainty
        self.target_transform = target_transform
        self.n_bins = n_bins
        self.empty_score = empty_score
        self.regressor_input = regressor_input
        self.typicality = typicality
        self.reference = reference
        self.atlas = atlas

    # ----------------------------------------------------------------- validation
    def _check_params(self):
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {TARGETS}, got {self.target!r}")
        if self.target_transform not in TARGET_TRANSFORMS:
            raise ValueError(f"target_transform must be one of {TARGET_TRANSFORMS}, got "
                             f"{self.target_transform!r}")
        if self.regressor_input not in REGRESSOR_INPUTS:
            raise ValueError(f"regressor_input must be one of {REGRESSOR_INPUTS}, got "
                             f"{self.regressor_input!r}")
        if (isinstance(self.n_bins, bool) or not isinstance(self.n_bins, numbers.Integral)
                or self.n_bins < 1):
            raise ValueError(f"n_bins must be a positive integer, got {self.n_bins!r}")
        if (isinstance(self.empty_score, bool) or not isinstance(self.empty_score, numbers.Real)
                or not 0 <= self.empty_score <= 1):
            raise ValueError(f"empty_score must be a number in [0, 1], got {self.empty_score!r}")
        for name in ("typicality", "atlas"):
            v = getattr(self, name)
            if not (isinstance(v, (bool, np.bool_)) or (isinstance(v, str) and v == "auto")):
                raise ValueError(f"{name} must be 'auto', True or False, got {v!r}")
        if self.uncertainty != "auto" and self.uncertainty not in KINDS:
            raise ValueError(f"uncertainty must be 'auto' or one of {KINDS}, got "
                             f"{self.uncertainty!r}")

    def _resolve_estimator(self, X):
        return resolve_segmenter(self.estimator, X, requires=("predict_proba",))

    def _resolve_regressor(self, n_out: int):
        reg = self.regressor
        if isinstance(reg, (str, os.PathLike)):
            if self.regressor_input == "features":
                raise ValueError("regressor is an ONNX path, which reads maps; "
                                 "regressor_input='features' cannot apply")
            return os.fspath(reg), "maps"
        if reg is None:
            reg = default_regressor()
        if not (callable(getattr(reg, "fit", None)) and callable(getattr(reg, "predict", None))):
            raise TypeError("regressor must be None, a path to an ONNX quality network or an "
                            f"object with fit and predict, got {type(reg).__name__}")
        kind = "maps" if self.regressor_input == "maps" else "features"
        reg = clone(reg) if hasattr(reg, "get_params") else reg
        if kind == "features" and n_out > 1 and isinstance(reg, BaseEstimator):
            if not get_tags(reg).target_tags.multi_output:
                reg = MultiOutputRegressor(reg)
        return reg, kind

    # ----------------------------------------------------------------- inference
    def _maps(self, X, signatures=False):
        """Yield ``(slice, X chunk, proba, uncertainty, signatures or None)`` over chunks, one
        inference each (plus one pass of an ensemble's first member for signatures)."""
        est, kind = self.estimator_, self.uncertainty_kind_
        layer = getattr(self, "typicality_layer_", None) if signatures else None
        if isinstance(X, list):
            for i, x in enumerate(X):
                yield from self._chunk_maps(est, kind, x[None], slice(i, i + 1), layer)
            return
        for start in range(0, X.shape[0], _CHUNK):
            sl = slice(start, min(start + _CHUNK, X.shape[0]))
            yield from self._chunk_maps(est, kind, X[sl], sl, layer)

    @staticmethod
    def _signature(feats) -> np.ndarray:
        from uqseg.ood import spectral_signature

        return spectral_signature(np.asarray(feats), TYPICALITY_GRID)

    @classmethod
    def _chunk_maps(cls, est, kind, xb, sl, layer=None):
        # probabilities, the map and the feature member's features from one pass
        out = run(est, xb, layers=() if layer is None else [layer], maps=(kind,))
        sig = None if layer is None else cls._signature(out[layer])
        yield sl, xb, np.asarray(out["proba"], dtype=np.float32), out[kind], sig

    def _reference_signatures(self, X):
        """Signatures of images ``X`` from the feature network alone (one pass)."""
        seg, layer = self.estimator_, self.typicality_layer_

        def sig(x):
            return self._signature(run(seg, x, layers=[layer], proba=False)[layer])

        if isinstance(X, list):
            return np.concatenate([sig(x[None]) for x in X])
        return np.concatenate([sig(X[s:s + _CHUNK]) for s in range(0, X.shape[0], _CHUNK)])

    def _atlas_bank(self) -> np.ndarray:
        """The rotated references, built on first use (not pickled)."""
        cache = self.__dict__.setdefault("_atlas_cache", {})
        if "bank" not in cache:
            cache["bank"] = atlas_bank(self.atlas_maps_)
        return cache["bank"]

    def _resolve_atlas(self, X, groups) -> bool:
        """``atlas`` resolved before fitting (the distinct-map count is checked after)."""
        auto = isinstance(self.atlas, str)
        if (not auto and not self.atlas) or (auto and groups is None):
            return False
        why = None
        if self.regressor_input == "maps" or isinstance(self.regressor, (str, os.PathLike)):
            why = "the feature regressor (regressor_input 'features' or 'auto', not an ONNX path)"
        elif (X[0].ndim if isinstance(X, list) else X.ndim - 1) != 3:
            why = "2-D images (N, C, H, W)"
        if why is None:
            return True
        if auto:
            return False
        raise ValueError(f"atlas=True needs {why}")

    def _resolve_typicality(self, est) -> bool:
        """``typicality`` resolved: ``"auto"`` is on where it can apply, ``True`` raises where
        it cannot."""
        auto = isinstance(self.typicality, str)  # "auto", checked in _check_params
        if not auto and not self.typicality:
            return False
        if self.regressor_input == "maps" or isinstance(self.regressor, (str, os.PathLike)):
            if auto:
                return False
            raise ValueError("typicality=True adds features: it needs the feature regressor "
                             "(regressor_input 'features' or 'auto', not an ONNX path)")
        try:
            _feature_member(est)
        except (TypeError, ValueError):
            if auto:
                return False
            raise
        return True

    def _typicality(self, sig):
        return typicality_distances(sig, self.reference_signatures_)

    def _targets(self, proba_pred, y, k):
        fn = dice_score if self.target == "dice" else iou_score
        # NaN = class absent from prediction and truth alike
        return np.nan_to_num(fn(proba_pred, y, n_classes=k), nan=float(self.empty_score))

    # ----------------------------------------------------------------- public API
    def fit(self, X, y, groups=None):
        """Run the segmenter once on ``X``, compute the true quality and fit the regressor.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays
        y : array of int, shape (N, *spatial), or list of (*spatial) arrays
            True labels in ``[0, K)``.
        groups : array-like of shape (N,), optional
            Source (or subject) of each image, e.g. ``info["source"]`` of
            :func:`make_quality_set`. Turns on the atlas features (``atlas="auto"``), whose
            cross-fitting keeps the images of one group from serving as each other's
            references. Without it, identical label maps form a group, which does not join a
            source with its *rotated* copies (their labels differ).

        Returns
        -------
        self
        """
        self._check_params()
        X = check_images(X)
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != (len(X),):
                raise ValueError(f"groups must have one entry per image, shape ({len(X)},); "
                                 f"got shape {groups.shape}")
        est = self._resolve_estimator(X)
        if getattr(est, "activation_", "softmax") != "softmax":
            raise ValueError(
                f"QualityRegressor needs a softmax (multi-class) segmenter; this one's outputs "
                f"are activation_={est.activation_!r} (independent per-channel probabilities "
                "or given probabilities), which its Dice targets and features do not model "
                "yet. SpectralOODDetector and ConformalRiskController take such networks")
        ensemble = _is_ensemble(est)
        kind = ("mutual_information" if ensemble else "entropy") if self.uncertainty == "auto" \
            else self.uncertainty
        if kind != "entropy" and not ensemble:
            raise ValueError(f"uncertainty={kind!r} needs an ensemble (an estimator with "
                             f"predict_members); {type(est).__name__} gives only 'entropy'")
        shapes = [x.shape[1:] for x in X] if isinstance(X, list) else None
        if isinstance(X, list):
            if not isinstance(y, (list, tuple)):
                raise TypeError("X is a list of images, so y must be a list of label maps, got "
                                f"{type(y).__name__}")
            y = check_labels(list(y), shapes=shapes)
        else:
            y = check_labels(y, shapes=(X.shape[0], *X.shape[2:]))
        self.estimator_ = est
        self.uncertainty_kind_ = kind
        for attr in ("reference_signatures_", "typicality_layer_", "atlas_maps_",
                     "atlas_blocks_", "_atlas_cache"):
            self.__dict__.pop(attr, None)
        typ = self.typicality_ = self._resolve_typicality(est)
        use_atlas = self._resolve_atlas(X, groups)
        pmaps, ymaps, ykeys = [], [], []
        if typ:
            self.typicality_layer_ = _typicality_layer(_feature_member(est))
        feats, targets, maps, onnx_pred, k, reg, sigs = [], [], [], [], None, None, []
        for sl, xb, proba, unc, sig in self._maps(X, signatures=typ):
            k = proba.shape[1]
            yb = y[sl] if not isinstance(y, list) else [y[i] for i in range(sl.start, sl.stop)]
            yb = np.asarray(yb)
            hi = int(yb.max())
            if yb.min() < 0 or hi >= k:
                raise ValueError(f"y holds labels in [{int(yb.min())}, {hi}] but the segmenter "
                                 f"predicts {k} classes (valid labels 0..{k - 1})")
            if reg is None:
                self.n_classes_ = int(k)
                self._runner = None
                reg, self.input_kind_ = self._resolve_regressor(k - 1)
            targets.append(self._targets(proba.argmax(axis=1), yb, k))
            feats.append(_features(xb, proba, unc, kind, int(self.n_bins)))
            if use_atlas:
                pmaps.append(atlas_maps(proba.argmax(axis=1), k))
                ymaps.append(atlas_maps(yb, k))
                ykeys += [hashlib.blake2b(np.ascontiguousarray(v, dtype=np.int64).tobytes(),
                                          digest_size=16).hexdigest() + str(v.shape)
                          for v in yb]
            if typ:
                sigs.append(sig)
            if isinstance(reg, str):
                # a pretrained network: checked on the first chunk, then run chunk by chunk
                m = maps_input(xb, proba, unc, kind)
                if not onnx_pred:
                    self.regressor_ = reg
                    self._check_onnx_regressor(m)
                onnx_pred.append(self._predict_maps(m))
            elif self.input_kind_ == "maps":
                maps.append(maps_input(xb, proba, unc, kind))
        self.feature_names_ = feature_names(k, kind, int(self.n_bins))
        T = np.concatenate(targets)
        F = np.concatenate(feats)
        if typ:
            S = np.concatenate(sigs)
            self.reference_signatures_ = S if self.reference is None else \
                self._reference_signatures(check_images(self.reference))
            F = np.hstack([F, self._typicality(S)])
            self.feature_names_ += list(TYPICALITY_NAMES)
        if use_atlas and min(len(set(ykeys)),
                             len(set(ykeys if groups is None else groups.tolist()))) < 2:
            if self.atlas is True:
                raise ValueError("atlas=True needs at least 2 distinct label maps in y and at "
                                 "least 2 groups to cross-fit over")
            use_atlas = False
        self.atlas_ = use_atlas
        if use_atlas:
            A, self.atlas_maps_, self.atlas_blocks_ = _atlas_fit(
                np.concatenate(pmaps), np.concatenate(ymaps), ykeys, groups)
            F = np.hstack([F, A])
            self.feature_names_ += atlas_names(k)
        if isinstance(reg, str):
            pred = np.concatenate(onnx_pred)
        elif self.input_kind_ == "maps":
            M = np.concatenate(maps)
            self.regressor_ = reg.fit(M, T)
            pred = self._predict_maps(M)
        else:
            Tt = logit(np.clip(T, _EPS, 1 - _EPS)) if self.target_transform == "logit" else T
            self.regressor_ = reg.fit(F, Tt if Tt.shape[1] > 1 else Tt.ravel())
            pred = self._predict_features(F)
        self.fit_report_ = quality_report(pred, T)
        return self

    def _check_onnx_regressor(self, sample: np.ndarray):
        runner = self._onnx_runner()
        name = runner.input_names
        if len(name) != 1:
            raise ValueError(f"the ONNX regressor {self.regressor_!r} must take one input "
                             f"(the stacked maps), it takes {name}")
        want_c = sample.shape[1]
        shape = runner.input_shapes.get(name[0])
        if shape is not None and len(shape) != sample.ndim:
            raise ValueError(f"the ONNX regressor {self.regressor_!r} takes rank-{len(shape)} "
                             f"input, expected (N, C + K + 1, *spatial) of rank {sample.ndim}")
        if shape is not None and shape[1] is not None and shape[1] != want_c:
            raise ValueError(
                f"the ONNX regressor {self.regressor_!r} takes {shape[1]} input channels, "
                f"expected {want_c} = image channels + {self.n_classes_} class probabilities "
                "+ 1 uncertainty map")
        self._predict_maps(sample[:1])

    def _onnx_runner(self):
        if getattr(self, "_runner", None) is None:
            from uqseg import backends

            self._runner = backends.load(self.regressor_)
        return self._runner

    def _predict_maps(self, maps: np.ndarray) -> np.ndarray:
        want = (maps.shape[0], self.n_classes_ - 1)
        if isinstance(self.regressor_, str):
            runner = self._onnx_runner()
            try:
                out = runner.run({runner.input_names[0]: maps})
            except ValueError:
                raise
            except Exception as exc:  # engine errors on inputs the network cannot take
                raise ValueError(f"the ONNX regressor {self.regressor_!r} failed on maps of "
                                 f"shape {maps.shape}: {exc}") from exc
            out = np.asarray(out[runner.output_names[0]], dtype=np.float64)
        else:
            out = np.asarray(self.regressor_.predict(maps), dtype=np.float64)
        if out.ndim == 1 and want[1] == 1:
            out = out[:, None]
        if out.shape != want:
            raise ValueError(f"the quality regressor must output shape (N, K - 1) = {want}, "
                             f"got {out.shape}")
        return np.clip(out, 0.0, 1.0)

    def _predict_features(self, F: np.ndarray) -> np.ndarray:
        out = np.asarray(self.regressor_.predict(F), dtype=np.float64).reshape(F.shape[0], -1)
        if self.target_transform == "logit":
            out = expit(out)
        return np.clip(out, 0.0, 1.0)

    def features(self, X) -> np.ndarray:
        """Per-image features (columns named by ``feature_names_``), one inference per image.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays

        Returns
        -------
        ndarray of shape (N, len(feature_names_))
        """
        check_is_fitted(self)
        X = check_images(X)
        return np.concatenate([self._row_features(x, p, u, s)
                               for _, x, p, u, s in self._maps(X, signatures=True)])

    def _row_features(self, xb, proba, unc, sig):
        F = _features(xb, proba, unc, self.uncertainty_kind_, int(self.n_bins))
        if sig is not None:
            F = np.hstack([F, self._typicality(sig)])
        if getattr(self, "atlas_", False):
            maps = atlas_maps(proba.argmax(axis=1), self.n_classes_)
            # as at fit time, one block of references is always missing (averaged over blocks)
            F = np.hstack([F, atlas_agreement(maps, self.atlas_maps_, bank=self._atlas_bank(),
                                              blocks=self.atlas_blocks_)])
        return F

    def predict(self, X) -> np.ndarray:
        """Predicted quality (Dice, or IoU for ``target="iou"``) per foreground class.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays

        Returns
        -------
        ndarray of shape (N, K - 1), values in ``[0, 1]``
        """
        check_is_fitted(self)
        X = check_images(X)
        return np.concatenate([self._predict_outputs(xb, p, u, s)
                               for _, xb, p, u, s in self._maps(X, signatures=True)])

    def _predict_outputs(self, xb, proba, unc, sig) -> np.ndarray:
        """Predicted quality from one pass's probabilities, uncertainty map and typicality
        signatures (also used by :func:`uqseg.assess`)."""
        if self.input_kind_ == "maps":
            return self._predict_maps(maps_input(xb, proba, unc, self.uncertainty_kind_))
        return self._predict_features(self._row_features(xb, proba, unc, sig))

    def flag(self, X, min_dice=0.8, reduce="any") -> np.ndarray:
        """Images to route to human review: predicted Dice below ``min_dice``.

        Parameters
        ----------
        X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays
        min_dice : float in [0, 1], default=0.8
            Always a Dice threshold: with ``target="iou"`` the predicted IoU ``J`` is
            converted to Dice ``2J / (1 + J)`` first.
        reduce : {"any", "mean"}, default="any"
            ``"any"``: flag when any foreground class is predicted below ``min_dice``;
            ``"mean"``: when the mean over foreground classes is.

        Returns
        -------
        ndarray of bool, shape (N,)
        """
        check_is_fitted(self)
        if isinstance(min_dice, bool) or not isinstance(min_dice, numbers.Real) \
                or not 0 <= min_dice <= 1:
            raise ValueError(f"min_dice must be a number in [0, 1], got {min_dice!r}")
        if reduce not in ("any", "mean"):
            raise ValueError(f"reduce must be 'any' or 'mean', got {reduce!r}")
        q = self.predict(X)
        if self.target == "iou":
            q = 2 * q / (1 + q)
        return (q < min_dice).any(axis=1) if reduce == "any" else q.mean(axis=1) < min_dice

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_runner", None)  # onnxruntime sessions do not pickle; rebuilt lazily
        state.pop("_atlas_cache", None)
        return state

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.requires_fit = True
        tags.input_tags.two_d_array = False
        return tags


# --------------------------------------------------------------------------- training data
def _rotated_labels(x_clean: np.ndarray, x_rot: np.ndarray, y: np.ndarray, angle: float):
    """Rotate labels like ``corrupt(kind="rotate")`` rotated the image (sign read off the image)."""
    from uqseg.datasets import normalize_intensity

    base = normalize_intensity(x_clean[None])[0].astype(np.float64)
    best, best_err = None, np.inf
    for sign in (1.0, -1.0):
        cand = np.stack([ndimage.rotate(c, sign * angle, axes=(-2, -1), reshape=False, order=1,
                                        mode="constant", cval=float(c.min())) for c in base])
        err = float(np.mean((normalize_intensity(cand[None])[0] - x_rot) ** 2))
        if err < best_err:
            best, best_err = sign, err
    return ndimage.rotate(y, best * angle, axes=(-2, -1), reshape=False, order=0,
                          mode="constant", cval=0)


def make_quality_set(X, y, corruptions=None, severities=(0.25, 0.5, 0.75, 1.0), seed=0,
                     include_clean=True):
    """Widen a labelled split with corrupted copies, for a spread of segmentation quality.

    Every image is repeated once per (corruption, severity) with
    :func:`uqseg.datasets.corrupt`; the labels are repeated alongside (and rotated with the
    image for ``"rotate"``, the one corruption that moves the anatomy).

    Parameters
    ----------
    X : array of shape (N, C, *spatial)
    y : array of int, shape (N, *spatial)
    corruptions : sequence of str, optional
        Kinds from :data:`uqseg.datasets.CORRUPTIONS` (default: all of them).
    severities : sequence of float in (0, 1], default=(0.25, 0.5, 0.75, 1.0)
    seed : int, default=0
        Seed of the corruptions' random parts (each (kind, severity) gets its own stream).
    include_clean : bool, default=True
        Keep the original images (intensity-normalised) first.

    Returns
    -------
    X_wide : ndarray of float32, shape (N * n_copies, C, *spatial)
    y_wide : ndarray of int64, shape (N * n_copies, *spatial)
    info : dict
        ``source`` (index into ``X``), ``corruption`` (``"none"`` for clean copies) and
        ``severity`` (0 for clean copies), one entry per output image (numpy arrays).

    Examples
    --------
    >>> import numpy as np
    >>> X = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float32)
    >>> y = np.zeros((2, 16, 16), int)
    >>> Xw, yw, info = make_quality_set(X, y, corruptions=["blur", "noise"], severities=[0.5])
    >>> Xw.shape, [str(c) for c in info["corruption"]]
    ((6, 1, 16, 16), ['none', 'none', 'blur', 'blur', 'noise', 'noise'])
    """
    from uqseg.datasets import CORRUPTIONS, corrupt, normalize_intensity

    X = check_images(X, allow_list=False)
    y = check_labels(y, shapes=(X.shape[0], *X.shape[2:]))
    kinds = list(CORRUPTIONS) if corruptions is None else (
        [corruptions] if isinstance(corruptions, str) else list(corruptions))
    bad = [c for c in kinds if c not in CORRUPTIONS]
    if bad:
        raise ValueError(f"corruptions must be taken from {CORRUPTIONS}, got unknown {bad}")
    sevs = [severities] if isinstance(severities, numbers.Real) else list(severities)
    for s in sevs:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 < s <= 1:
            raise ValueError(f"severities must be numbers in (0, 1], got {severities!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not kinds and not include_clean:
        raise ValueError("nothing to return: no corruption and include_clean=False")
    n = X.shape[0]
    xs, ys, src, names, levels = [], [], [], [], []
    if include_clean:
        xs.append(normalize_intensity(X))
        ys.append(y)
        src.append(np.arange(n))
        names += ["none"] * n
        levels.append(np.zeros(n))
    for j, kind in enumerate(kinds):
        for m, s in enumerate(sevs):
            xc = corrupt(X, kind, float(s), seed=int(seed) * 1000 + 37 * j + m)
            yc = y
            if kind == "rotate":
                yc = np.stack([_rotated_labels(X[i], xc[i], y[i], 90.0 * float(s))
                               for i in range(n)])
            xs.append(xc)
            ys.append(yc)
            src.append(np.arange(n))
            names += [kind] * n
            levels.append(np.full(n, float(s)))
    info = {"source": np.concatenate(src), "corruption": np.array(names),
            "severity": np.concatenate(levels)}
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64), info

