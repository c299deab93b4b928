"""Reading images from NIfTI, NumPy and DICOM series; writing NIfTI maps.

Every reader returns a :class:`Volume`: the voxel array with its spatial axes in file order
(NIfTI ``i, j, k``; DICOM ``column, row, slice``; a 4-D NIfTI keeps its channels last) and the
4x4 ``affine`` mapping voxel indices to world coordinates in millimetres in **RAS+**, the
convention of NIfTI and nibabel.

Coordinate conventions
----------------------
NIfTI and nibabel use RAS+: ``+x`` = towards the patient's **R**ight, ``+y`` = **A**nterior,
``+z`` = **S**uperior. DICOM uses LPS+: ``+x`` = patient's **L**eft, ``+y`` = **P**osterior,
``+z`` = **S**uperior. The DICOM affine is first built in LPS from ``ImageOrientationPatient``,
``PixelSpacing`` and the slices' ``ImagePositionPatient``, then converted with
``diag(-1, -1, 1, 1) @ affine_lps`` (flip the signs of x and y), as dcm2niix and nibabel do.

Only :mod:`nibabel` (core dependency) and :mod:`pydicom` (core dependency) are used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = [
    "LPS_TO_RAS",
    "Volume",
    "dicom_affine",
    "image_stem",
    "read_dicom_series",
    "read_image",
    "read_nifti",
    "read_numpy",
    "write_nifti",
]

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
NIFTI_SUFFIXES = (".nii", ".nii.gz")
NUMPY_SUFFIXES = (".npy", ".npz")


@dataclass
class Volume:
    """An image read from disk.

    Attributes
    ----------
    data : ndarray
        Voxel values, spatial axes in file order; a 4-D NIfTI keeps its channels last.
    affine : ndarray of shape (4, 4)
        Voxel index ``(i, j, k, 1)`` -> RAS+ world coordinates in mm (identity when the file
        carries none, e.g. ``.npy``).
    kind : {"nifti", "numpy", "dicom"}
        Where it came from.
    meta : dict
        Extra facts (e.g. the DICOM series UID and slice order, the NIfTI zooms).
    """

    data: np.ndarray
    affine: np.ndarray
    kind: str
    meta: dict = field(default_factory=dict)


def image_stem(path: str | os.PathLike) -> str:
    """File name without ``.nii.gz`` / ``.nii`` / ``.npy`` / ``.npz`` (folder name for DICOM)."""
    name = Path(path).name
    for suffix in (*NIFTI_SUFFIXES, *NUMPY_SUFFIXES):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def read_image(path: str | os.PathLike) -> Volume:
    """Read a NIfTI file, a NumPy file or a folder holding one DICOM series.

    Parameters
    ----------
    path : str or path-like
        ``.nii`` / ``.nii.gz`` (nibabel), ``.npy`` / ``.npz`` (see :func:`read_numpy`) or a
        directory of DICOM files (see :func:`read_dicom_series`).

    Returns
    -------
    Volume

    Raises
    ------
    FileNotFoundError
        When ``path`` does not exist.
    ValueError
        When the format is not recognised or the file holds no usable image.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input {str(p)!r} does not exist")
    if p.is_dir():
        return read_dicom_series(p)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return read_nifti(p)
    if name.endswith(NUMPY_SUFFIXES):
        return read_numpy(p)
    raise ValueError(
        f"input {str(p)!r}: unknown format; expected .nii, .nii.gz, .npy, .npz or a folder "
        "holding a DICOM series"
    )


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI-1/2 file with nibabel (data as float32 unless integer, affine as stored).

    Returns
    -------
    Volume
        ``data`` of 2 to 4 dimensions (a 4-D image: channels last); ``affine`` is nibabel's
        best affine (sform, else qform, else the zooms).
    """
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ValueError(f"cannot read NIfTI file {str(path)!r}: {exc}") from exc
    data = np.asanyarray(img.dataobj)
    if data.ndim == 5 and data.shape[3] == 1:  # (x, y, z, 1, c): NIfTI's vector layout
        data = data[:, :, :, 0]
    if data.ndim not in (2, 3, 4):
        raise ValueError(
            f"NIfTI file {str(path)!r} must hold a 2-D or 3-D image (4-D: channels last), got "
            f"shape {data.shape}"
        )
    return Volume(
        data=np.asarray(data),
        affine=np.asarray(img.affine, dtype=np.float64),
        kind="nifti",
        meta={"zooms": [float(z) for z in img.header.get_zooms()]},
    )


def read_numpy(path: str | os.PathLike) -> Volume:
    """Read a ``.npy`` array, or an ``.npz`` archive with the image and an optional affine.

    An ``.npz`` file is searched for the keys ``image``, ``data`` or ``arr_0`` (else its only
    array); an ``affine`` key (4x4) is used as the affine. Without one the affine is the
    identity (1 mm voxels at the origin). ``allow_pickle`` stays off.
    """
    p = Path(path)
    affine = np.eye(4)
    try:
        loaded = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise ValueError(f"cannot read NumPy file {str(p)!r}: {exc}") from exc
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            key = next((k for k in ("image", "data", "arr_0") if k in keys), None)
            others = [k for k in keys if k != "affine"]
            if key is None and len(others) == 1:
                key = others[0]
            if key is None:
                raise ValueError(
                    f"{str(p)!r}: an .npz input needs an 'image' array (and optionally "
                    f"'affine'), got keys {keys}"
                )
            data = loaded[key]
            if "affine" in keys:
                affine = np.asarray(loaded["affine"], dtype=np.float64)
                if affine.shape != (4, 4) or not np.isfinite(affine).all():
                    raise ValueError(f"{str(p)!r}: 'affine' must be a finite 4x4 array, got "
                                     f"shape {affine.shape}")
    else:
        data = loaded
    if data.ndim not in (2, 3, 4):
        raise ValueError(
            f"NumPy input {str(p)!r} must hold a 2-D or 3-D image (or one with a channel axis), "
            f"got shape {data.shape}"
        )
    return Volume(data=np.asarray(data), affine=affine, kind="numpy")


# ---------------------------------------------------------------------- DICOM
def _float_list(ds, name: str, n: int) -> np.ndarray | None:
    value = ds.get(name)
    if value is None:
        return None
    arr = np.asarray([float(v) for v in value], dtype=np.float64)
    return arr if arr.shape == (n,) else None


def dicom_affine(orientation, spacing, positions, slice_thickness: float = 1.0) -> np.ndarray:
    """Voxel ``(column, row, slice)`` -> RAS+ affine of a sorted DICOM series.

    Parameters
    ----------
    orientation : sequence of 6 floats
        ``ImageOrientationPatient``: direction cosines of the first row (the direction in
        which the column index grows) then of the first column (row index grows), in LPS.
    spacing : sequence of 2 floats
        ``PixelSpacing``: distance between rows, then between columns, in mm.
    positions : array of shape (n_slices, 3)
        ``ImagePositionPatient`` of each slice in the sorted order (LPS, mm): the centre of
        the slice's first voxel.
    slice_thickness : float
        Slice step used when there is a single slice (along the slice normal).

    Returns
    -------
    ndarray of shape (4, 4)
        ``LPS_TO_RAS @ affine_lps``.
    """
    o = np.asarray(orientation, dtype=np.float64)
    row_dir, col_dir = o[:3], o[3:]
    d_row, d_col = float(spacing[0]), float(spacing[1])
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 3)
    if len(pos) > 1:
        step = (pos[-1] - pos[0]) / (len(pos) - 1)
    else:
        step = np.cross(row_dir, col_dir) * float(slice_thickness)
    aff = np.eye(4)
    aff[:3, 0] = row_dir * d_col  # voxel axis 0 = column index: moves along the row direction
    aff[:3, 1] = col_dir * d_row  # voxel axis 1 = row index
    aff[:3, 2] = step
    aff[:3, 3] = pos[0]
    return LPS_TO_RAS @ aff


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read one DICOM series from a folder into a ``(columns, rows, slices)`` volume.

    Files that are not DICOM are skipped. Slices are sorted by the projection of
    ``ImagePositionPatient`` on the slice normal (the cross product of the two
    ``ImageOrientationPatient`` directions), or by ``InstanceNumber`` when positions are
    missing. ``RescaleSlope`` / ``RescaleIntercept`` are applied. The affine is built in the
    DICOM LPS+ frame and converted to RAS+ (see the module docstring).

    Raises
    ------
    ValueError
        When the folder holds no DICOM image, more than one series, slices of different
        sizes or orientations, or unevenly spaced slices.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    folder = Path(folder)
    slices = []
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(f)
        except (InvalidDicomError, OSError):
            continue
        if "PixelData" in ds:
            slices.append(ds)
    if not slices:
        raise ValueError(f"no DICOM image found in {str(folder)!r}")
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in slices})
    if len(series) > 1:
        raise ValueError(
            f"{str(folder)!r} holds {len(series)} DICOM series ({', '.join(series)}); put one "
            "series per folder"
        )
    orient = _float_list(slices[0], "ImageOrientationPatient", 6)
    spacing = _float_list(slices[0], "PixelSpacing", 2)
    if orient is None:
        orient = np.array([1.0, 0, 0, 0, 1, 0])
    if spacing is None:
        spacing = np.array([1.0, 1.0])
    for ds in slices[1:]:
        o = _float_list(ds, "ImageOrientationPatient", 6)
        if o is not None and not np.allclose(o, orient, atol=1e-4):
            raise ValueError(f"{str(folder)!r}: slices have different orientations")
    normal = np.cross(orient[:3], orient[3:])
    positions = [_float_list(ds, "ImagePositionPatient", 3) for ds in slices]
    if all(p is not None for p in positions):
        order = np.argsort([float(p @ normal) for p in positions], kind="stable")
        sorted_by = "ImagePositionPatient"
    else:
        order = np.argsort([int(ds.get("InstanceNumber", i)) for i, ds in enumerate(slices)],
                           kind="stable")
        sorted_by = "InstanceNumber"
        positions = [np.zeros(3) + normal * i for i in range(len(slices))]
    slices = [slices[i] for i in order]
    pos = np.array([positions[i] for i in order])
    if len(pos) > 2:
        gaps = np.linalg.norm(np.diff(pos, axis=0), axis=1)
        if gaps.min() <= 0 or not np.allclose(gaps, gaps.mean(), rtol=1e-2, atol=1e-3):
            raise ValueError(
                f"{str(folder)!r}: slices are not evenly spaced (gaps {np.round(gaps, 3)} mm); "
                "duplicate or missing slices?"
            )
    planes = []
    for ds in slices:
        arr = ds.pixel_array.astype(np.float32)
        if arr.ndim != 2:
            raise ValueError(f"{str(folder)!r}: only single-frame grey-level slices are "
                             f"supported, got pixel array shape {arr.shape}")
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        planes.append(arr * slope + intercept)
    if len({p.shape for p in planes}) > 1:
        raise ValueError(f"{str(folder)!r}: slices have different sizes")
    # pixel_array is (rows, columns); the volume is (columns, rows, slices) like NIfTI/dcm2niix
    data = np.stack(planes, axis=-1).transpose(1, 0, 2)
    thickness = float(slices[0].get("SliceThickness", 1.0) or 1.0)
    affine = dicom_affine(orient, spacing, pos, thickness)
    return Volume(
        data=data,
        affine=affine,
        kind="dicom",
        meta={"series_uid": series[0], "n_slices": len(slices), "sorted_by": sorted_by},
    )


# ---------------------------------------------------------------------- writing
def write_nifti(path: str | os.PathLike, data, affine) -> Path:
    """Write ``data`` as a NIfTI-1 file with ``affine`` (sform and qform, scanner frame).

    Parameters
    ----------
    path : str or path-like
        Output file (``.nii`` or ``.nii.gz``); parent folders are created.
    data : ndarray
        Written with its own dtype (use uint8 labels, float32 maps).
    affine : array of shape (4, 4)

    Returns
    -------
    pathlib.Path
    """
    import nibabel as nib

    p = Path(path)
    if not p.name.lower().endswith(NIFTI_SUFFIXES):
        raise ValueError(f"path must end in .nii or .nii.gz, got {str(p)!r}")
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"affine must be 4x4, got shape {affine.shape}")
    p.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1)
    nib.save(img, str(p))
    return p
