"""Files of :func:`uqseg.distributed.score_dataset`: reading a record's image on a worker and
naming the maps it writes (public home :mod:`uqseg.distributed`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_SUFFIXES = (".npy", ".npz", ".nii", ".nii.gz")


def _suffix(path: str) -> str:
    low = path.lower()
    return next((s for s in _SUFFIXES if low.endswith(s)), "")


def read_image(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray | None]:
    """One image as float32 ``(C, *spatial)`` and its affine, by :func:`uqseg.io.read_image`.

    ``.npy``/``.npz`` files hold ``(C, *spatial)`` like one item of ``X`` (the affine is None
    unless an ``.npz`` carries one); NIfTI files and DICOM series folders hold the spatial axes,
    with channels (if any) on the last axis. Truncated or corrupt files are a ValueError naming
    them.
    """
    from uqseg.io import read_image as read

    vol = read(path)
    data = vol.data.astype(np.float32, copy=False)
    if vol.kind == "numpy":
        return data, vol.affine if vol.meta.get("affine_given") else None
    data = data[None] if data.ndim <= 3 else np.moveaxis(data, -1, 0)
    return data, vol.affine


def map_stems(paths: list[str]) -> list[str]:
    """Output stems that keep each file's folder relative to the inputs' common folder.

    ``a/scan.nii.gz`` and ``b/scan.nii.gz`` give ``a/scan`` and ``b/scan`` (not ``scan``
    twice). Raises ValueError when two inputs still map to the same stem (``x.nii`` and
    ``x.npy`` in one folder).
    """
    dirs = [os.path.dirname(os.path.abspath(p)) for p in paths]
    root = os.path.commonpath(dirs) if dirs else ""
    stems = [os.path.normpath(os.path.join(os.path.relpath(d, root), _stem(p)))
             for d, p in zip(dirs, paths, strict=True)]
    seen: dict[str, str] = {}
    for stem, p in zip(stems, paths, strict=True):
        if stem in seen:
            raise ValueError(f"inputs {seen[stem]!r} and {p!r} would write their maps to the "
                             f"same names ({stem}_*); rename one of them")
        seen[stem] = p
    return stems


def _stem(path: str) -> str:
    name = os.path.basename(path)
    return name[:-len(_suffix(name))] if _suffix(name) else name


def _absolute_stem(path: str) -> str:
    """A Ray Dataset's paths are not known up front: keep the whole absolute folder."""
    folder = os.path.splitdrive(os.path.dirname(os.path.abspath(path)))[1].lstrip(os.sep)
    return os.path.join(folder, _stem(path))


def _write_map(arr: np.ndarray, stem: Path, fmt: str, affine: np.ndarray | None) -> str:
    stem.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "nifti":
        import nibabel as nib

        out = str(stem) + ".nii.gz"
        data = arr.astype(np.float32) if arr.dtype == np.float16 else arr  # NIfTI-1 has no fp16
        nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), out)
        return out
    out = str(stem) + ".npy"
    np.save(out, arr)
    return out
