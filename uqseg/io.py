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

import gzip
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from uqseg._dicom import LPS_TO_RAS, dicom_affine, read_series, series_files

__all__ = [
    "LPS_TO_RAS",
    "Volume",
    "check_image",
    "dicom_affine",
    "image_stem",
    "read_dicom_series",
    "read_image",
    "read_nifti",
    "read_numpy",
    "write_nifti",
]

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
    raise _unknown_format(p)


def read_nifti(path: str | os.PathLike) -> Volume:
    """Read a NIfTI-1/2 file with nibabel (data in the stored dtype, or float32 when scaled).

    ``scl_slope`` / ``scl_inter`` are applied in float32 (nibabel would give float64: twice
    the memory of a float32 volume).

    Returns
    -------
    Volume
        ``data`` of 2 to 4 dimensions (a 4-D image: channels last); ``affine`` is nibabel's
        best affine (sform, else qform, else the zooms).

    Raises
    ------
    ValueError
        When the header or the voxel data cannot be read, or a ``.nii.gz`` is truncated or
        corrupt (its whole gzip stream is checked, CRC included: :func:`verify_gzip`).
    """
    img = _load_nifti_header(path)
    _check_nifti_length(img, path)
    try:
        proxy = img.dataobj
        data = np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        slope = float(getattr(proxy, "slope", 1.0))
        inter = float(getattr(proxy, "inter", 0.0))
    except (EOFError, OSError, ValueError, zlib.error) as exc:
        raise ValueError(f"cannot read the voxel data of NIfTI file {str(path)!r} (truncated "
                         f"or corrupt?): {exc}") from exc
    if (slope, inter) != (1.0, 0.0) and np.isfinite([slope, inter]).all():
        data = data.astype(np.float32)
        data *= np.float32(slope)
        data += np.float32(inter)
    if data.ndim == 5 and data.shape[3] == 1:  # (x, y, z, 1, c): NIfTI's vector layout
        data = data[:, :, :, 0]
    return Volume(
        data=data,
        affine=np.asarray(img.affine, dtype=np.float64),
        kind="nifti",
        meta={"zooms": [float(z) for z in img.header.get_zooms()]},
    )


def _load_nifti_header(path):
    import nibabel as nib

    try:
        img = nib.load(str(path))
    except Exception as exc:  # nibabel raises several types for unreadable files
        raise ValueError(f"cannot read NIfTI file {str(path)!r}: {exc}") from exc
    shape = img.shape
    if len(shape) == 5 and shape[3] == 1:
        shape = shape[:3] + shape[4:]
    if len(shape) not in (2, 3, 4):
        raise ValueError(
            f"NIfTI file {str(path)!r} must hold a 2-D or 3-D image (4-D: channels last), got "
            f"shape {tuple(img.shape)}"
        )
    return img


def verify_gzip(path: str | os.PathLike, chunk: int = 1 << 22) -> int:
    """Decompress a gzip file to its end in ``chunk``-byte steps (constant memory).

    Returns the decompressed length. Raises ValueError when it is truncated or corrupt (bad
    CRC, bad deflate data), so a broken ``.nii.gz`` is found before anything is computed or
    written.
    """
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            while block := f.read(chunk):
                total += len(block)
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{str(path)!r} is a truncated or corrupt gzip file: {exc}") from exc
    return total


def _check_nifti_length(img, path) -> None:
    """The file must hold the voxels its header promises, checked before they are allocated
    (a forged header would otherwise make nibabel allocate whatever it claims)."""
    gz = str(path).lower().endswith(".gz")
    # nibabel reads only the bytes it needs: without this pass a .nii.gz CRC goes unchecked
    available = verify_gzip(path) if gz else os.path.getsize(path)
    header = img.header
    need = int(header.get_data_offset()) + int(np.prod(img.shape, dtype=np.float64)) * int(
        header.get_data_dtype().itemsize)
    if available < need:
        raise ValueError(f"NIfTI file {str(path)!r} is truncated: its header ({img.shape} "
                         f"{header.get_data_dtype()}) needs {need} bytes of data, the file "
                         f"holds {available}")


def check_image(path: str | os.PathLike) -> tuple[int, ...] | None:
    """Cheap checks that ``path`` can be read, before any work: returns its shape if known.

    NIfTI: the header, and for ``.nii.gz`` the whole compressed stream (:func:`verify_gzip`);
    ``.npy``: the header and the file length; ``.npz``: the archive's CRCs; a folder: that it
    holds files (the DICOM series itself is checked when read).
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input {str(p)!r} does not exist")
    if p.is_dir():
        if not any(series_files(p)):
            raise ValueError(f"no DICOM image found in {str(p)!r}")
        return None
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        img = _load_nifti_header(p)
        _check_nifti_length(img, p)
        return tuple(int(s) for s in img.shape)
    if name.endswith(".npy"):
        try:
            arr = np.load(p, mmap_mode="r", allow_pickle=False)
        except Exception as exc:
            raise ValueError(f"cannot read NumPy file {str(p)!r}: {exc}") from exc
        return tuple(arr.shape)
    if name.endswith(".npz"):
        import zipfile

        try:
            with zipfile.ZipFile(p) as z:
                bad = z.testzip()
        except Exception as exc:
            raise ValueError(f"cannot read NumPy file {str(p)!r}: {exc}") from exc
        if bad is not None:
            raise ValueError(f"NumPy file {str(p)!r}: member {bad!r} is corrupt")
        return None
    raise _unknown_format(p)


def _unknown_format(p: Path) -> ValueError:
    return ValueError(
        f"input {str(p)!r}: unknown format; expected .nii, .nii.gz, .npy, .npz or a folder "
        "holding a DICOM series"
    )


def read_numpy(path: str | os.PathLike) -> Volume:
    """Read a ``.npy`` array, or an ``.npz`` archive with the image and an optional affine.

    An ``.npz`` file is searched for the keys ``image``, ``data`` or ``arr_0`` (else its only
    array); an ``affine`` key (4x4) is used as the affine. Without one the affine is the
    identity (1 mm voxels at the origin) and ``meta["affine_given"]`` is False (a model's
    preprocessing then needs the spacing given). ``allow_pickle`` stays off.
    """
    p = Path(path)
    affine, affine_given = np.eye(4), False
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
                affine_given = True
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
    return Volume(data=np.asarray(data), affine=affine, kind="numpy",
                  meta={"affine_given": affine_given})


def read_dicom_series(folder: str | os.PathLike) -> Volume:
    """Read one DICOM series from a folder into a ``(columns, rows, slices)`` volume.

    Every file under the folder (except hidden files and ``DICOMDIR``) must be a slice of the
    series: a file that does not parse as DICOM, has no pixel data, lacks
    ``ImagePositionPatient`` while others have it, or whose pixels cannot be decoded is an
    error naming the files -- never a volume with a slice missing. Slices are sorted by the
    projection of ``ImagePositionPatient`` on the slice normal (the cross product of the two
    ``ImageOrientationPatient`` directions), or by ``InstanceNumber`` when no file has a
    position; the positions must be evenly spaced along that line. ``RescaleSlope`` /
    ``RescaleIntercept`` are applied. The affine is built in the DICOM LPS+ frame and
    converted to RAS+ (see the module docstring). Headers are read first and pixel data one
    slice at a time into the volume, so memory holds one float32 volume.

    Raises
    ------
    ValueError
        When the folder holds no DICOM image, unreadable files, more than one series, slices
        of different sizes, orientations or pixel spacings, or unevenly spaced slices.
    """
    data, affine, meta = read_series(folder)
    return Volume(data=data, affine=affine, kind="dicom", meta=meta)


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
