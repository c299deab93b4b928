"""How a scan maps onto a model's voxel grid and back (for :mod:`uqseg.preprocessing`).

The foreground threshold and box (chunked, bounded memory), the reorientation and the
per-axis sampling that :func:`uqseg.preprocessing.preprocess` chains into one affine map, and
:class:`~uqseg.preprocessing.Inverse`, which applies that map backwards to model outputs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

_CHUNK = 1 << 22  # voxels per pass of the chunked statistics (bounded extra memory)
_OTSU_BINS = 256


# ---------------------------------------------------------------------- foreground
def chunks(data: np.ndarray):
    """Views of ``data`` along its last axis, about ``_CHUNK`` voxels each."""
    per = max(1, _CHUNK // max(1, int(np.prod(data.shape[:-1]))))
    for s in range(0, data.shape[-1], per):
        yield data[..., s:s + per]


def otsu_threshold(data: np.ndarray, bins: int = _OTSU_BINS) -> float:
    """Otsu's threshold of ``data`` from a ``bins``-bin histogram, computed in chunks.

    Same definition as :func:`skimage.filters.threshold_otsu` (the centre of the bin that
    maximises the between-class variance; voxels strictly above it are foreground), without
    its whole-volume temporary arrays.
    """
    lo = min(float(np.min(c)) for c in chunks(data))
    hi = max(float(np.max(c)) for c in chunks(data))
    if hi <= lo:
        return lo
    counts = np.zeros(bins, dtype=np.float64)
    for c in chunks(data):
        counts += np.histogram(c, bins=bins, range=(lo, hi))[0]
    centres = lo + (np.arange(bins) + 0.5) * (hi - lo) / bins
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    m1 = np.cumsum(counts * centres) / np.maximum(w1, 1e-300)
    m2 = (np.cumsum((counts * centres)[::-1]) / np.maximum(w2[::-1], 1e-300))[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    return float(centres[:-1][np.argmax(between)])


def foreground_threshold(data: np.ndarray, crop: dict | None) -> float | None:
    """The intensity above which a voxel is foreground (None without a crop)."""
    if crop is None:
        return None
    if crop["method"] == "threshold":
        return float(crop["threshold"])
    return otsu_threshold(data)


def foreground_bbox(data: np.ndarray, threshold: float) -> np.ndarray | None:
    """``(2, 3)`` first/last voxel index of ``data > threshold`` per axis (None if empty)."""
    hit = [np.zeros(n, dtype=bool) for n in data.shape]
    start = 0
    for c in chunks(data):
        m = c > threshold
        hit[0] |= m.any(axis=(1, 2))
        hit[1] |= m.any(axis=(0, 2))
        hit[2][start:start + c.shape[2]] = m.any(axis=(0, 1))
        start += c.shape[2]
    if not hit[0].any():
        return None
    return np.array([[np.flatnonzero(h)[0] for h in hit], [np.flatnonzero(h)[-1] for h in hit]],
                    dtype=np.float64)


# ---------------------------------------------------------------------- geometry
def check_volume(data, affine):
    arr = np.asarray(data)
    if arr.ndim == 4:
        raise ValueError(f"got a 4-D series of shape {arr.shape}: preprocessing takes one 3-D "
                         "volume (split the series into volumes first)")
    if arr.ndim != 3:
        raise ValueError(f"preprocessing takes a 3-D volume, got shape {arr.shape}")
    if arr.dtype.kind not in "uif" or arr.size == 0:
        raise ValueError(f"the scan must be a non-empty real-valued volume, got dtype "
                         f"{arr.dtype} and shape {arr.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4) or not np.isfinite(aff).all():
        raise ValueError(f"the affine must be a finite 4x4 array, got shape {aff.shape}")
    spacing = np.sqrt((aff[:3, :3] ** 2).sum(axis=0))
    if (spacing <= 1e-6).any():
        raise ValueError(f"the scan's voxel spacing is zero along voxel axis "
                         f"{int(np.argmin(spacing))} (spacing {spacing.round(6).tolist()} mm "
                         "from the affine): fix the header or give the spacing")
    if abs(np.linalg.det(aff[:3, :3])) < 1e-9 * float(np.prod(spacing)):
        raise ValueError("the scan's affine is singular (two voxel axes point the same way)")
    return arr, aff, spacing


def reorientation(affine: np.ndarray, shape, codes: str | None):
    """(ornt, R, reoriented shape, reoriented axis codes): R maps reoriented -> scan voxels."""
    import nibabel.orientations as nio

    start = nio.io_orientation(affine)
    if codes is None:
        ornt = np.array([[i, 1] for i in range(3)], dtype=float)
    else:
        ornt = nio.ornt_transform(start, nio.axcodes2ornt(tuple(codes)))
    r = nio.inv_ornt_aff(ornt, shape)
    new_shape = [0, 0, 0]
    for i, (ax, _) in enumerate(ornt):
        new_shape[int(ax)] = int(shape[i])
    out_codes = "".join(nio.aff2axcodes(affine @ r))
    return ornt, r, tuple(new_shape), out_codes


def sampling(lo: float, hi: float, n_size: int | None, step: float | None):
    """(first sample position, step, count) along one axis of the box ``[lo, hi]``."""
    if n_size is not None:  # the box's ends are the outer pixel edges (the training data's)
        st = (hi - lo) / n_size if hi > lo else 1.0 / n_size
        return lo + 0.5 * st, st, n_size
    if step is not None:
        n = max(1, int(round((hi - lo) / step)) + 1)
        return 0.5 * (lo + hi) - 0.5 * (n - 1) * step, step, n
    first, last = math.ceil(lo - 1e-9), math.floor(hi + 1e-9)
    return float(first), 1.0, max(1, last - first + 1)


@dataclass
class Inverse:
    """What :func:`preprocess` did, to put model outputs back into the scan's grid.

    Attributes
    ----------
    shape : tuple of 3 ints
        The scan's voxel grid.
    affine : ndarray (4, 4)
        The scan's affine (outputs are written with it).
    matrix : ndarray (4, 4)
        Model voxel index (model axis order) -> scan voxel index.
    model_shape : tuple of 3 ints
        ``(slices, rows, columns)`` of a 2-D model, ``(D, H, W)`` of a 3-D one.
    two_d : bool
        The model input is a batch of slices (``(N, 1, H, W)``) rather than one volume.
    threshold : float or None
        Foreground threshold (intensity) of the crop.
    box : ndarray (2, 3) or None
        Crop box in reoriented voxel coordinates (None: whole scan).
    foreground : ndarray (n_slices,)
        Fraction of foreground pixels of each model slice (ones without a crop).
    scored : ndarray of bool (n_slices,)
        Slices with enough foreground to be scored by OOD/quality estimators.
    orientation : str
        Axis codes of the reoriented volume.
    """

    shape: tuple
    affine: np.ndarray
    matrix: np.ndarray
    model_shape: tuple
    two_d: bool
    threshold: float | None
    box: np.ndarray | None
    foreground: np.ndarray
    scored: np.ndarray
    orientation: str

    @property
    def model_affine(self) -> np.ndarray:
        """Model voxel index -> world (mm): the model-space volume as a NIfTI would carry it."""
        return self.affine @ self.matrix

    def to_volume(self, arr) -> np.ndarray:
        """A model batch ``(N, [K,] H, W)`` / ``(1, [K,] D, H, W)`` -> ``([K,] *model_shape)``."""
        a = np.asarray(arr)
        if self.two_d:
            if a.shape[0] != self.model_shape[0] or a.shape[-2:] != tuple(self.model_shape[1:]):
                raise ValueError(f"expected model outputs of {self.model_shape[0]} slices of "
                                 f"{self.model_shape[1:]}, got shape {a.shape}")
            return np.moveaxis(a, 0, 1) if a.ndim == 4 else a
        if a.shape[0] != 1 or a.shape[-3:] != tuple(self.model_shape):
            raise ValueError(f"expected model outputs of shape (1, [K,] {self.model_shape}), "
                             f"got {a.shape}")
        return a[0]

    def _inside(self, start: int, stop: int, axis: int) -> np.ndarray:
        """Scan voxels of the slab that fall inside the model's field of view."""
        inv = np.linalg.inv(self.matrix)
        masks = []
        for ax, n in enumerate(self.shape):
            idx = np.arange(start, stop) if ax == axis else np.arange(n)
            ok = np.ones(len(idx), dtype=bool)
            for k in range(3):
                c = inv[k, ax]
                if abs(c) > 1e-12:
                    m = c * idx + inv[k, 3]
                    ok &= (m >= -0.5 - 1e-6) & (m <= self.model_shape[k] - 0.5 + 1e-6)
            masks.append(ok)
        return masks[0][:, None, None] & masks[1][None, :, None] & masks[2][None, None, :]

    def invert(self, arr, kind: str = "map", *, start: int = 0, stop: int | None = None,
               axis: int = 2) -> np.ndarray:
        """Model-space outputs -> the scan's voxel grid (or the slab ``[start:stop]`` of it).

        Parameters
        ----------
        arr : ndarray
            ``(N, H, W)`` / ``(N, K, H, W)`` for a 2-D model, ``(1, D, H, W)`` /
            ``(1, K, D, H, W)`` for a 3-D one (as the model returns them).
        kind : {"labels", "proba", "map", "channels"}
            "labels": nearest neighbour, background (0) outside the crop. "proba": linear,
            class probabilities (class axis 1) with background (class 0 = 1) outside.
            "map": linear, 0 outside (uncertainty). "channels": linear per channel (axis 1),
            0 outside (sigmoid probabilities, per-channel maps).
        start, stop, axis : int
            Only scan slices ``start:stop`` along voxel ``axis`` (streaming).

        Returns
        -------
        ndarray
            ``shape`` (with ``stop - start`` on ``axis``); classes last for "proba" and
            "channels".
        """
        return self.invert_volume(self.to_volume(arr), kind, start=start, stop=stop, axis=axis)

    def invert_volume(self, vol, kind: str = "map", *, start: int = 0, stop: int | None = None,
                      axis: int = 2) -> np.ndarray:
        """:meth:`invert` for outputs already in model-volume form: ``model_shape``, or
        ``(K, *model_shape)`` for "proba" and "channels" (e.g. a disk-backed array filled chunk
        by chunk)."""
        if kind not in ("labels", "proba", "map", "channels"):
            raise ValueError(f"kind must be 'labels', 'proba', 'map' or 'channels', got {kind!r}")
        if axis not in (0, 1, 2):
            raise ValueError(f"axis must be 0, 1 or 2, got {axis!r}")
        stop = self.shape[axis] if stop is None else stop
        if not 0 <= start < stop <= self.shape[axis]:
            raise ValueError(f"need 0 <= start < stop <= {self.shape[axis]}, got {start}, {stop}")
        classes = kind in ("proba", "channels")
        want = (*(["K"] if classes else []), *self.model_shape)
        if np.ndim(vol) != len(want) or tuple(np.shape(vol)[-3:]) != tuple(self.model_shape):
            raise ValueError(f"kind {kind!r} needs outputs of shape {want}, got "
                             f"{np.shape(vol)}")
        out_shape = list(self.shape)
        out_shape[axis] = stop - start
        inv = np.linalg.inv(self.matrix)
        shift = np.zeros(3)
        shift[axis] = start
        offset = inv[:3, :3] @ shift + inv[:3, 3]
        inside = self._inside(start, stop, axis)
        order = 0 if kind == "labels" else 1

        def one(v, outside):
            dtype = v.dtype if kind == "labels" else np.float32
            res = ndimage.affine_transform(v, inv[:3, :3], offset=offset,
                                           output_shape=tuple(out_shape), order=order,
                                           mode="nearest", output=dtype)
            res[~inside] = outside
            return res

        if not classes:
            return one(np.asarray(vol), 0)
        out = np.empty((*out_shape, vol.shape[0]), dtype=np.float32)
        for k in range(vol.shape[0]):
            v = np.ascontiguousarray(vol[k], dtype=np.float32)
            # outside the crop: background (softmax class 0), or nothing (independent channels)
            out[..., k] = one(v, 1.0 if k == 0 and kind == "proba" else 0.0)
        return out
