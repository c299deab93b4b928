"""Atlas agreement: how well a predicted label map matches reference label maps in any pose.

A version of reverse classification accuracy (Valindria et al. 2017) that
:class:`uqseg.QualityRegressor` adds as features (``atlas=``): the predicted label map and the
fitting set's distinct ground-truth maps are pooled to a coarse grid of class fractions, centred
on their centroid, and compared by soft Dice over in-plane rotations
(:func:`atlas_maps`, :func:`atlas_bank`, :func:`atlas_agreement`). The fitting images get
cross-fitted values (:func:`atlas_cross_fit`): an image never meets its own truth.
"""

from __future__ import annotations

import hashlib

import numpy as np
from scipy import ndimage

__all__ = ["ATLAS_ANGLES", "ATLAS_FOLDS", "ATLAS_GRID", "atlas_agreement", "atlas_bank",
           "atlas_blocks", "atlas_cross_fit", "atlas_maps", "atlas_names", "label_key"]

ATLAS_GRID = 32  # class maps are pooled to this grid for the atlas comparison
ATLAS_ANGLES = tuple(range(0, 360, 15))  # in-plane rotations searched (degrees)
ATLAS_FOLDS = 5  # contiguous blocks of reference label maps for the cross-fitted fit features


def atlas_names(n_classes: int) -> list[str]:
    """Names of the :func:`atlas_agreement` columns."""
    return [f"atlas_dice_c{c}" for c in range(1, n_classes)] + ["atlas_dice_joint"]


def resolve_atlas(atlas, X, groups, reads_maps: bool) -> bool:
    """``atlas`` of :class:`uqseg.QualityRegressor` resolved before fitting (the count of
    distinct label maps is checked after)."""
    auto = isinstance(atlas, str)
    if (not auto and not atlas) or (auto and groups is None):
        return False
    why = None
    if reads_maps:
        why = "the feature regressor (regressor_input 'features' or 'auto', not an ONNX path)"
    elif (X[0].ndim if isinstance(X, list) else X.ndim - 1) != 3:
        why = "2-D images (N, C, H, W)"
    if why is None:
        return True
    if auto:
        return False
    raise ValueError(f"atlas=True needs {why}")


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
    # foreground centroids of all maps at once (what ndimage.center_of_mass gives per map)
    fg = maps.sum(axis=1, dtype=np.float64)
    total = fg.sum(axis=(1, 2))
    ys, xs = np.arange(fg.shape[1], dtype=np.float64), np.arange(fg.shape[2], dtype=np.float64)
    safe = np.where(total > 0, total, 1.0)
    cy = fg.sum(axis=2) @ ys / safe
    cx = fg.sum(axis=1) @ xs / safe
    for i in np.flatnonzero(total > 0):
        maps[i] = ndimage.shift(maps[i], (0, centre - cy[i], centre - cx[i]), order=1,
                                mode="constant")
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
    # the best over the other blocks' columns = the best of the other blocks' own bests
    # (maxima are exact): each column is read once, not once per block
    ids = np.unique(blocks)
    own = np.stack([best(dice[:, cols == b]) for b in ids], axis=1)  # (n, B, K)
    return np.mean([own[:, np.arange(len(ids)) != i].max(axis=1) for i in range(len(ids))],
                   axis=0)


def atlas_cross_fit(pred_maps, label_maps, label_keys, groups=None):
    """Cross-fitted atlas agreement of the fitting images, with the reference maps and blocks.

    The references are the distinct ground-truth maps (corrupted copies share theirs). The
    groups (``groups``, else one per distinct map), in order of first appearance, are cut into
    ``ATLAS_FOLDS`` contiguous blocks (slices of one scan stay together); a fitting image is
    compared only with the references of the other blocks (:func:`atlas_blocks`).

    Parameters
    ----------
    pred_maps : ndarray (n, K - 1, G, G)
        :func:`atlas_maps` of the predicted labels of the fitting images.
    label_maps : ndarray (n, K - 1, G, G)
        :func:`atlas_maps` of their true labels.
    label_keys : sequence of hashable, length n
        Equal keys for equal label maps (e.g. :func:`label_key`).
    groups : array-like of shape (n,), optional
        Source of each image.

    Returns
    -------
    features : ndarray (n, K)
        :func:`atlas_agreement` of each image with the references outside its block.
    references : ndarray (M, K - 1, G, G)
        The distinct label maps (first occurrences).
    reference_blocks : int ndarray (M,)
        Block of each reference: pass as ``blocks=`` to :func:`atlas_agreement` for new images.

    Examples
    --------
    >>> import numpy as np
    >>> labels = np.zeros((4, 32, 32), int)
    >>> for i in range(4):
    ...     labels[i, 8:20 + i, 8:24] = 1
    >>> maps = atlas_maps(labels, 2)
    >>> feats, refs, blocks = atlas_cross_fit(maps, maps, [label_key(v) for v in labels])
    >>> feats.shape, refs.shape[0], blocks.tolist()
    ((4, 2), 4, [0, 1, 2, 3])
    """
    keep, block = atlas_blocks(label_keys, groups)
    ref_block = block[keep]
    exclude = block[:, None] == ref_block[None, :]
    return atlas_agreement(pred_maps, label_maps[keep], exclude), label_maps[keep], ref_block


def label_key(labels) -> str:
    """A key equal for equal label maps (content digest and shape), for :func:`atlas_cross_fit`."""
    v = np.ascontiguousarray(labels, dtype=np.int64)
    return hashlib.blake2b(v.tobytes(), digest_size=16).hexdigest() + str(v.shape)


def _first_index(keys) -> tuple[np.ndarray, np.ndarray]:
    """(id of each key in order of first appearance, index of each id's first occurrence)."""
    seen: dict = {}
    ids = np.array([seen.setdefault(k, len(seen)) for k in keys])
    return ids, np.unique(ids, return_index=True)[1]


def atlas_blocks(label_keys, groups=None) -> tuple[np.ndarray, np.ndarray]:
    """The distinct label maps and the cross-fitting block of each image.

    Parameters
    ----------
    label_keys : sequence of hashable, length n
        Equal keys for equal label maps.
    groups : array-like of shape (n,), optional
        Source of each image; default: one group per distinct label map.

    Returns
    -------
    keep : int ndarray
        Indices of the distinct label maps (first occurrences).
    block : int ndarray (n,)
        Each image's block: the groups cut into ``ATLAS_FOLDS`` contiguous blocks in order of
        first appearance.

    Examples
    --------
    >>> keep, block = atlas_blocks(["a", "a", "b", "c"], groups=[0, 0, 1, 1])
    >>> keep.tolist(), block.tolist()
    ([0, 2, 3], [0, 0, 1, 1])
    """
    _, keep = _first_index(label_keys)
    gid, first_of_group = _first_index(label_keys if groups is None else list(groups))
    n = len(first_of_group)
    return keep, (np.arange(n) * min(ATLAS_FOLDS, n) // n)[gid]
