"""Overlap and surface-distance metrics of a segmentation, per image and foreground class.

Labels are integer maps ``(N, *spatial)`` (2-D or 3-D) or lists of differently sized
``(*spatial)`` maps. Class 0 is the background; results have one column per foreground class
``1..K-1``.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from uqseg._validation import check_labels

__all__ = ["dice_score", "hausdorff_distance_95", "iou_score"]


def _pairs(pred, y, n_classes, ignore_index):
    """Validated per-image (pred, y) lists and the number of classes."""
    if isinstance(pred, (list, tuple)) != isinstance(y, (list, tuple)):
        raise TypeError("pred and y must both be arrays or both be lists of label maps")
    if n_classes is not None and (
        isinstance(n_classes, bool) or not isinstance(n_classes, (int, np.integer)) or n_classes < 2
    ):
        raise ValueError(f"n_classes must be an integer >= 2, got {n_classes!r}")
    if isinstance(pred, (list, tuple)):
        if len(pred) == 0:
            raise ValueError("pred is an empty list: at least one label map is required")
        p = check_labels(list(pred), n_classes=n_classes, name="pred")
        t = check_labels(
            list(y),
            n_classes=n_classes,
            ignore_index=ignore_index,
            shapes=[a.shape for a in p],
            name="y",
        )
    else:
        p = check_labels(pred, n_classes=n_classes, name="pred")
        t = check_labels(
            y, n_classes=n_classes, ignore_index=ignore_index, shapes=p.shape, name="y"
        )
        if p.shape[0] == 0:
            raise ValueError("pred is an empty batch: at least one label map is required")
        p, t = list(p), list(t)
    if n_classes is None:
        top = 1
        for a, b in zip(p, t, strict=True):
            bv = b if ignore_index is None else b[b != ignore_index]
            top = max(top, int(a.max(initial=0)), int(bv.max(initial=0)))
        for name, maps in (("pred", p), ("y", t)):
            lo = min(
                int(
                    (m if ignore_index is None or name == "pred" else m[m != ignore_index]).min(
                        initial=0
                    )
                )
                for m in maps
            )
            if lo < 0:
                raise ValueError(f"{name} holds negative labels (min {lo}); labels are 0..K-1")
        n_classes = top + 1
    return p, t, int(n_classes)


def _confusion(p, t, k, ignore_index):
    if ignore_index is not None:
        keep = t != ignore_index
        p, t = p[keep], t[keep]
    cm = np.bincount(p.ravel().astype(np.int64) * k + t.ravel(), minlength=k * k)
    return cm.reshape(k, k)  # rows: predicted, columns: true


def _overlap(pred, y, n_classes, ignore_index, kind):
    p, t, k = _pairs(pred, y, n_classes, ignore_index)
    out = np.full((len(p), k - 1), np.nan)
    for i, (a, b) in enumerate(zip(p, t, strict=True)):
        cm = _confusion(a, b, k, ignore_index)
        tp = np.diag(cm)[1:].astype(np.float64)
        size_p, size_t = cm.sum(axis=1)[1:], cm.sum(axis=0)[1:]
        denom = size_p + size_t if kind == "dice" else size_p + size_t - tp
        num = 2 * tp if kind == "dice" else tp
        np.divide(num, denom, out=out[i], where=denom > 0)
    return out


def dice_score(pred, y, n_classes: int | None = None, *, ignore_index: int | None = None):
    """Dice coefficient ``2|P ∩ G| / (|P| + |G|)`` per image and foreground class.

    Parameters
    ----------
    pred, y : array_like of int, shape (N, *spatial), or lists of (*spatial) maps
        Predicted and true labels.
    n_classes : int, optional
        Default: the largest label seen plus one.
    ignore_index : int, optional
        Voxels where ``y`` equals it are left out.

    Returns
    -------
    ndarray of shape (N, K - 1)
        NaN where both the prediction and the truth are empty for that class (Dice undefined);
        ``np.nanmean`` averages over the defined ones.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([[[0, 1, 1, 0]]]); pred = np.array([[[0, 1, 0, 0]]])
    >>> dice_score(pred, y, n_classes=3).round(4)
    array([[0.6667,    nan]])
    """
    return _overlap(pred, y, n_classes, ignore_index, "dice")


def iou_score(pred, y, n_classes: int | None = None, *, ignore_index: int | None = None):
    """Jaccard index ``|P ∩ G| / |P ∪ G|`` per image and foreground class.

    Parameters and NaN convention as in :func:`dice_score`.

    Returns
    -------
    ndarray of shape (N, K - 1)

    Examples
    --------
    >>> import numpy as np
    >>> y = np.array([[[0, 1, 1, 0]]]); pred = np.array([[[0, 1, 0, 0]]])
    >>> iou_score(pred, y)
    array([[0.5]])
    """
    return _overlap(pred, y, n_classes, ignore_index, "iou")


def _surface(mask: np.ndarray, structure: np.ndarray) -> np.ndarray:
    # voxels of the object with a 4/6-neighbour outside it (the image border counts as outside)
    return mask & ~ndimage.binary_erosion(mask, structure, border_value=0)


def _hd95_pair(a: np.ndarray, b: np.ndarray, spacing: np.ndarray, structure) -> float:
    if not a.any() and not b.any():
        return np.nan
    if not a.any() or not b.any():
        return np.inf
    # crop to the union's bounding box (+1 voxel) so the distance transforms stay small
    box = ndimage.find_objects((a | b).astype(np.int8))[0]
    box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
    a, b = a[box], b[box]
    sa, sb = _surface(a, structure), _surface(b, structure)
    d_ab = ndimage.distance_transform_edt(~sb, sampling=spacing)[sa]
    d_ba = ndimage.distance_transform_edt(~sa, sampling=spacing)[sb]
    return float(max(np.percentile(d_ab, 95), np.percentile(d_ba, 95)))


def hausdorff_distance_95(pred, y, spacing=None, n_classes: int | None = None):
    """Symmetric 95th-percentile Hausdorff distance between surfaces, in physical units.

    Surfaces are the object voxels with a face neighbour outside the object. For each surface
    voxel of one segmentation, the Euclidean distance (with voxel ``spacing``) to the nearest
    surface voxel of the other is taken; the result is the larger of the two directed 95th
    percentiles (linear interpolation), as in MONAI's ``percentile=95``.

    Parameters
    ----------
    pred, y : array_like of int, shape (N, *spatial), or lists of (*spatial) maps
    spacing : float or sequence of float, optional
        Voxel size per spatial axis (default 1).
    n_classes : int, optional
        Default: the largest label seen plus one.

    Returns
    -------
    ndarray of shape (N, K - 1)
        NaN where both segmentations are empty for that class; ``inf`` where exactly one is.

    Examples
    --------
    >>> import numpy as np
    >>> y = np.zeros((1, 8, 8), int); y[0, 2:5, 2:5] = 1
    >>> pred = np.roll(y, 2, axis=2)                      # shifted by two columns
    >>> hausdorff_distance_95(pred, y, spacing=(1.0, 0.5))
    array([[1.]])
    """
    p, t, k = _pairs(pred, y, n_classes, None)
    nd = p[0].ndim
    if spacing is None:
        sp = np.ones(nd)
    else:
        sp = (
            np.broadcast_to(np.asarray(spacing, dtype=np.float64), (nd,))
            if np.ndim(spacing) <= 1 and np.size(spacing) in (1, nd)
            else None
        )
        if sp is None or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise ValueError(
                f"spacing must be one positive number or {nd} of them, got {spacing!r}"
            )
    structure = ndimage.generate_binary_structure(nd, 1)
    out = np.full((len(p), k - 1), np.nan)
    for i, (a, b) in enumerate(zip(p, t, strict=True)):
        if a.ndim != nd:
            raise ValueError(f"pred[{i}] has {a.ndim} spatial axes, expected {nd}")
        for c in range(1, k):
            out[i, c - 1] = _hd95_pair(a == c, b == c, sp, structure)
    return out
