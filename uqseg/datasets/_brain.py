"""Brain tissue segmentation data built from the MNI ICBM152 2009a template shipped in nilearn.

Every "subject" is the template seen through a seeded, realistic augmentation: a smooth 3-D
elastic deformation with a small rotation and anisotropic scaling (applied to the T1 image and
to the grey/white matter probability maps alike), then a change of tissue contrast, gamma, a
smooth multiplicative bias field and Rician noise. Images are sampled straight from the 1 mm
template on the output grid, so only the slices that are returned are ever interpolated.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import zlib
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

from ._cache import cache_key, cached
from ._intensity import normalize_intensity

SPLITS = {"train": 12, "val": 5, "test": 5}  # subjects per split
SLICES_PER_SUBJECT = 22
PLANES = ("axial", "coronal", "sagittal")
# through-plane axis; (row axis, rows flipped); (column axis, columns flipped), in voxel axes
# of the template (x: left->right, y: posterior->anterior, z: inferior->superior)
_PLANE_AXES = {
    "axial": (2, (1, True), (0, False)),  # rows anterior->posterior, columns along x
    "coronal": (1, (2, True), (0, False)),  # rows superior->inferior, columns along x
    "sagittal": (0, (2, True), (1, True)),  # rows superior->inferior, columns anterior->posterior
}
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"
_MIN_BRAIN_FRACTION = 0.05  # slices with less brain than this are skipped
_MARGIN_MM = 6.0


def template_dir() -> Path:
    """Folder of nilearn's packaged MNI template files (found without importing nilearn)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the MNI ICBM152 template ships with nilearn: pip install nilearn")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


@functools.lru_cache(maxsize=1)
def load_template() -> dict[str, np.ndarray]:
    """T1 image and GM/WM probability maps (uint8 at 1 mm) plus the brain bounding box."""
    import nibabel as nib

    vols = {}
    for name in ("t1", "gm", "wm"):
        path = template_dir() / _TEMPLATE.format(name)
        if not path.exists():
            raise FileNotFoundError(f"MNI ICBM152 template file missing from nilearn: {path}")
        vols[name] = np.asanyarray(nib.load(path).dataobj)
    brain = (vols["gm"].astype(np.int32) + vols["wm"]) > 25  # tissue probability > ~0.1
    idx = np.nonzero(brain)
    lo = np.array([i.min() for i in idx], dtype=np.float64) - _MARGIN_MM
    hi = np.array([i.max() for i in idx], dtype=np.float64) + _MARGIN_MM
    vols["bbox"] = np.stack([np.maximum(lo, 0), np.minimum(hi, np.array(brain.shape) - 1)])
    # brain area of every slice along each axis, to skip slices with little brain
    for ax in range(3):
        other = tuple(a for a in range(3) if a != ax)
        vols[f"area{ax}"] = brain.sum(axis=other)
    return vols


def labels_from_probabilities(gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Tissue label = argmax of (background = clip(1 - gm - wm, 0, 1), gm, wm); ties -> lower."""
    bg = np.clip(1.0 - gm - wm, 0.0, 1.0)
    return np.argmax(np.stack([bg, gm, wm]), axis=0).astype(np.int64)


def subject_rng(split: str, index: int) -> np.random.Generator:
    # split name and subject index both enter the seed: no subject is shared between splits
    return np.random.default_rng([7253, zlib.crc32(split.encode()), index])


def _rotation(angles: np.ndarray) -> np.ndarray:
    cx, cy, cz = np.cos(angles)
    sx, sy, sz = np.sin(angles)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


class Subject:
    """One synthetic subject: a seeded spatial warp and intensity model of the template."""

    def __init__(self, rng: np.random.Generator, bbox: np.ndarray):
        self.lo, self.hi = bbox
        self.center = bbox.mean(axis=0)
        angles = np.deg2rad(rng.uniform(-8.0, 8.0, size=3))
        scales = rng.uniform(0.92, 1.08, size=3)
        self.matrix = _rotation(angles) @ np.diag(scales)
        # elastic part: 6^3 control points (~30 mm apart), 3 mm std, cubic spline in between
        self.control = [
            ndi.spline_filter(rng.normal(0.0, 3.0, size=(6, 6, 6)), order=3, mode="nearest")
            for _ in range(3)
        ]
        self.tissue_gain = rng.uniform(-0.08, 0.08, size=2)  # GM and WM contrast change
        self.gamma = rng.uniform(0.8, 1.25)
        self.bias = rng.uniform(-0.2, 0.2, size=9)  # quadratic log-bias coefficients
        self.noise = rng.uniform(0.01, 0.04)
        self.rng = rng

    def _unit(self, points: np.ndarray) -> np.ndarray:
        return 2.0 * (points - self.lo) / (self.hi - self.lo) - 1.0  # bbox -> [-1, 1]

    def to_template(self, points: np.ndarray) -> np.ndarray:
        """Map subject-space voxel coordinates ``(3, n)`` to template coordinates."""
        grid = (self._unit(points.T).T + 1.0) * 2.5  # [-1, 1] -> control grid [0, 5]
        disp = np.stack(
            [
                ndi.map_coordinates(c, grid, order=3, mode="nearest", prefilter=False)
                for c in self.control
            ]
        )
        return self.center[:, None] + self.matrix @ (points - self.center[:, None]) + disp

    def sample(self, points: np.ndarray, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Image (not yet normalised) and labels of this subject at ``points`` ``(3, n)``."""
        tpl = load_template()
        src = self.to_template(points)
        vals = {
            k: ndi.map_coordinates(
                tpl[k], src, order=1, mode="constant", cval=0.0, output=np.float32
            ).astype(np.float64)
            / 255.0
            for k in ("t1", "gm", "wm")
        }
        labels = labels_from_probabilities(vals["gm"], vals["wm"])
        img = vals["t1"] * (
            1.0 + self.tissue_gain[0] * vals["gm"] + self.tissue_gain[1] * vals["wm"]
        )
        img = np.clip(img, 0.0, None) ** self.gamma
        u = self._unit(points.T).T
        terms = np.stack(
            [
                u[0],
                u[1],
                u[2],
                u[0] * u[1],
                u[0] * u[2],
                u[1] * u[2],
                u[0] ** 2,
                u[1] ** 2,
                u[2] ** 2,
            ]
        )
        img = img * np.exp(self.bias @ terms)
        # Rician noise: magnitude of a complex signal with Gaussian noise in both channels
        n1, n2 = self.rng.normal(0.0, self.noise, size=(2, img.size))
        img = np.sqrt((img + n1) ** 2 + n2**2)
        return img.reshape(shape), labels.reshape(shape)


def _axis_coords(lo: float, hi: float, n: int, flip: bool) -> np.ndarray:
    c = lo + (np.arange(n) + 0.5) / n * (hi - lo)  # pixel centres spanning the bounding box
    return c[::-1] if flip else c


def _subject_arrays(split: str, index: int, plane: str, size: tuple[int, ...], dims: int):
    tpl = load_template()
    lo, hi = tpl["bbox"]
    subject = Subject(subject_rng(split, index), tpl["bbox"])
    through, (row_ax, row_flip), (col_ax, col_flip) = _PLANE_AXES[plane]
    if dims == 2:
        area = tpl[f"area{through}"]
        valid = np.nonzero(area >= 0.3 * area.max())[0]
        first, last = float(valid[0]), float(valid[-1])
        step = (last - first) / (SLICES_PER_SUBJECT - 1)
        jitter = subject.rng.uniform(-0.4, 0.4, size=SLICES_PER_SUBJECT) * step
        positions = np.linspace(first, last, SLICES_PER_SUBJECT) + jitter
        shape = (SLICES_PER_SUBJECT, *size)
    else:
        positions = _axis_coords(lo[through], hi[through], size[0], False)
        shape = tuple(size)
    rows = _axis_coords(lo[row_ax], hi[row_ax], size[-2], row_flip)
    cols = _axis_coords(lo[col_ax], hi[col_ax], size[-1], col_flip)
    grid = np.meshgrid(positions, rows, cols, indexing="ij")
    points = np.empty((3, grid[0].size))
    for ax, g in zip((through, row_ax, col_ax), grid, strict=True):
        points[ax] = g.ravel()
    img, lab = subject.sample(points, shape)
    if dims == 3:
        return normalize_intensity(img)[None, None], lab[None]
    keep = (lab > 0).mean(axis=(1, 2)) >= _MIN_BRAIN_FRACTION
    img, lab = img[keep], lab[keep]
    return normalize_intensity(img[:, None]), lab


def build_brain_tissue(split: str, plane: str, size: tuple[int, ...], dims: int):
    from tqdm.auto import tqdm

    # a bar in a terminal or notebook only (disable=None): logs get the one-line message
    parts = [_subject_arrays(split, i, plane, size, dims) for i in
             tqdm(range(SPLITS[split]), desc=f"{split} subjects", unit="subject",
                  file=sys.stderr, leave=False, disable=None)]
    X = np.concatenate([p[0] for p in parts]).astype(np.float32)
    y = np.concatenate([p[1] for p in parts]).astype(np.uint8)
    subject = np.concatenate([np.full(len(p[1]), i, dtype=np.int64) for i, p in enumerate(parts)])
    return {"X": X, "y": y, "subject": subject}


def _check_size(size: object, dims: int) -> tuple[int, ...]:
    if size is None:
        return (128, 128) if dims == 2 else (64, 64, 64)
    try:
        out = tuple(int(s) for s in size)  # type: ignore[union-attr]
        ok = all(float(s) == int(s) for s in size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise TypeError(f"size must be a tuple of {dims} ints, got {size!r}") from None
    if not ok or len(out) != dims or any(s < 8 for s in out):
        raise ValueError(f"size must be {dims} integers >= 8 for dims={dims}, got {size!r}")
    return out


def load_brain_tissue(
    split: str,
    *,
    plane: str = "axial",
    size: tuple[int, ...] | None = None,
    dims: int = 2,
    return_subjects: bool = False,
):
    """Brain tissue segmentation data (background / grey matter / white matter).

    Built from the real MNI ICBM152 2009a nonlinear symmetric T1 template and its grey and
    white matter probability maps, as shipped inside the nilearn wheel. Each split holds
    distinct synthetic "subjects" (train 12, val 5, test 5): the template is deformed by a
    seeded smooth 3-D elastic warp plus a small rotation (up to 8 degrees per axis) and
    anisotropic scaling (0.92-1.08), applied to the image and to the probability maps alike;
    the image then gets a tissue-contrast change, a gamma change (0.8-1.25), a smooth
    quadratic bias field and Rician noise. Seeds come from the split name and the subject
    index, so no subject appears in two splits.

    Labels are ``argmax(background, gm, wm)`` of the *deformed* probability maps with
    ``background = clip(1 - gm - wm, 0, 1)`` (CSF and non-brain count as background).
    The field of view is the template brain's bounding box (plus 6 mm), resized to ``size``.
    Intensities go through :func:`normalize_intensity` per image.

    The first call builds the split (a few seconds) and caches it in ``$UQSEG_DATA_DIR``
    (default ``~/.cache/uqseg``); later calls read the cache. Results are deterministic.

    Parameters
    ----------
    split : {"train", "val", "test"}
    plane : {"axial", "coronal", "sagittal"}, default "axial"
        Slice orientation (2-D) or the axis order of the volume (3-D: the first spatial axis
        is the through-plane axis). Axial rows run anterior to posterior; coronal and
        sagittal rows run superior to inferior.
    size : tuple of int, optional
        Output spatial size: 2 ints for ``dims=2`` (default ``(128, 128)``), 3 ints for
        ``dims=3`` (default ``(64, 64, 64)``).
    dims : {2, 3}, default 2
        2: 22 slices per subject through the brain (slices with under 5 % brain are
        skipped). 3: one whole-brain volume per subject.
    return_subjects : bool, default False
        Also return the subject index ``(N,)`` of every image (for grouped splits).

    Returns
    -------
    X : ndarray of float32, shape (N, 1, H, W) or (N, 1, D, H, W)
        Images with values in ``[0, 1]``.
    y : ndarray of int64, shape (N, H, W) or (N, D, H, W)
        0 background, 1 grey matter, 2 white matter.
    subjects : ndarray of int64, shape (N,)
        Only when ``return_subjects`` is true.

    Examples
    --------
    >>> from uqseg.datasets import load_brain_tissue
    >>> X, y = load_brain_tissue("val")
    >>> X.shape, y.shape
    ((110, 1, 128, 128), (110, 128, 128))
    """
    if not isinstance(split, str) or split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if not isinstance(plane, str) or plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    if isinstance(dims, bool) or dims not in (2, 3):
        raise ValueError(f"dims must be 2 or 3, got {dims!r}")
    size_t = _check_size(size, dims)
    key = cache_key(
        "brain_tissue",
        split=split,
        plane=plane,
        size=list(size_t),
        dims=dims,
        subjects=SPLITS[split],
        slices=SLICES_PER_SUBJECT,
    )
    data = cached(key, lambda: build_brain_tissue(split, plane, size_t, dims),
                  what=f"the brain tissue {split!r} split ({SPLITS[split]} subjects, "
                       f"{dims}-D, {plane})")
    X, y = data["X"], data["y"].astype(np.int64)
    if return_subjects:
        return X, y, data["subject"]
    return X, y
