"""Reading a DICOM series (for :func:`uqseg.io.read_dicom_series`): headers checked first,
slices sorted along their normal, evenly spaced, decoded one at a time; the affine built in
DICOM's LPS+ frame and converted to RAS+ (see :mod:`uqseg.io`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


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


def series_files(folder: Path):
    """Every regular file under ``folder`` except hidden ones and a ``DICOMDIR`` index."""
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).parts
        if p.is_file() and not any(part.startswith(".") for part in rel) and p.name != "DICOMDIR":
            yield p


def _bad_files_error(folder: Path, bad: dict, n_files: int) -> ValueError:
    shown = "; ".join(f"{p.relative_to(folder)} ({why})" for p, why in list(bad.items())[:5])
    more = f"; and {len(bad) - 5} more" if len(bad) > 5 else ""
    return ValueError(
        f"{str(folder)!r}: {len(bad)} of {n_files} files are not readable slices of a DICOM "
        f"series: {shown}{more}. A series folder must hold only the series' files (hidden "
        "files and DICOMDIR are ignored)"
    )


def _why(exc: Exception) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:200]

def read_series(folder: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, dict]:
    """``(data, affine, meta)`` of the series in ``folder`` (see ``read_dicom_series``)."""
    import pydicom

    folder = Path(folder)
    files = list(series_files(folder))
    if not files:
        raise ValueError(f"no DICOM image found in {str(folder)!r}")
    headers, bad = {}, {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
            if not int(ds.get("Rows", 0) or 0) or not int(ds.get("Columns", 0) or 0):
                raise ValueError("no Rows/Columns: not an image")
            headers[f] = ds
        except Exception as exc:  # untrusted bytes: any parser failure names the file
            bad[f] = _why(exc)
    if bad:  # name every bad file at once: decode the others too
        for f, ds in headers.items():
            try:
                _decode(f, (int(ds.Rows), int(ds.Columns)))
            except Exception as exc:
                bad[f] = _why(exc)
        raise _bad_files_error(folder, dict(sorted(bad.items())), len(files))
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in headers.values()})
    if len(series) > 1:
        raise ValueError(
            f"{str(folder)!r} holds {len(series)} DICOM series ({', '.join(series)}); put one "
            "series per folder"
        )
    files = list(headers)
    first = headers[files[0]]
    orient = _float_list(first, "ImageOrientationPatient", 6)
    spacing = _float_list(first, "PixelSpacing", 2)
    orient = np.array([1.0, 0, 0, 0, 1, 0]) if orient is None else orient
    spacing = np.array([1.0, 1.0]) if spacing is None else spacing
    size = (int(first.Rows), int(first.Columns))
    for f, ds in headers.items():
        o = _float_list(ds, "ImageOrientationPatient", 6)
        if o is not None and not np.allclose(o, orient, atol=1e-4):
            raise ValueError(f"{str(folder)!r}: slices have different orientations "
                             f"({files[0].name}: {orient.tolist()}, {f.name}: {o.tolist()})")
        sp = _float_list(ds, "PixelSpacing", 2)
        if sp is not None and not np.allclose(sp, spacing, rtol=1e-3):
            raise ValueError(f"{str(folder)!r}: slices have different pixel spacings "
                             f"({files[0].name}: {spacing.tolist()}, {f.name}: {sp.tolist()})")
        if (int(ds.Rows), int(ds.Columns)) != size:
            raise ValueError(f"{str(folder)!r}: slices have different sizes ({files[0].name}: "
                             f"{size}, {f.name}: {(int(ds.Rows), int(ds.Columns))})")
    normal = np.cross(orient[:3], orient[3:])
    positions = {f: _float_list(ds, "ImagePositionPatient", 3) for f, ds in headers.items()}
    missing = [f for f, p in positions.items() if p is None]
    if missing and len(missing) < len(files):
        raise _bad_files_error(folder, {f: "no ImagePositionPatient" for f in missing},
                               len(files))
    if not missing:
        files.sort(key=lambda f: float(positions[f] @ normal))
        sorted_by = "ImagePositionPatient"
        pos = np.array([positions[f] for f in files])
        _check_spacing(folder, files, pos, normal)
    else:
        files.sort(key=lambda f: int(headers[f].get("InstanceNumber", 0) or 0))
        sorted_by = "InstanceNumber"
        pos = np.array([normal * i for i in range(len(files))])
    # pixel_array is (rows, columns); the volume is (columns, rows, slices) like NIfTI/dcm2niix
    data = np.empty((size[1], size[0], len(files)), dtype=np.float32)
    for k, f in enumerate(files):
        try:
            ds, arr = _decode(f, size)
        except Exception as exc:  # untrusted bytes: any decoder failure names the file
            bad[f] = _why(exc)
            continue
        slope = float(ds.get("RescaleSlope", 1) or 1)
        intercept = float(ds.get("RescaleIntercept", 0) or 0)
        data[:, :, k] = arr.T
        if (slope, intercept) != (1.0, 0.0):
            data[:, :, k] *= np.float32(slope)
            data[:, :, k] += np.float32(intercept)
    if bad:
        raise _bad_files_error(folder, bad, len(files))
    thickness = float(first.get("SliceThickness", 1.0) or 1.0)
    affine = dicom_affine(orient, spacing, pos, thickness)
    return data, affine, {"series_uid": series[0], "n_slices": len(files),
                          "sorted_by": sorted_by}


def _decode(f: Path, size: tuple[int, int]):
    import pydicom

    ds = pydicom.dcmread(f)
    if "PixelData" not in ds:
        raise ValueError("no pixel data")
    arr = ds.pixel_array
    if arr.shape != size:
        raise ValueError(f"pixel array of shape {arr.shape}; only single-frame grey-level "
                         f"slices of {size} are supported")
    return ds, arr


def _check_spacing(folder: Path, files: list, pos: np.ndarray, normal: np.ndarray) -> None:
    """Slices must be distinct and evenly spaced along one line (no gap, no duplicate)."""
    if len(pos) < 2:
        return
    along = pos @ normal
    gaps = np.diff(along)
    dup = [(files[i].name, files[i + 1].name) for i in np.flatnonzero(gaps < 1e-3)]
    if dup:
        raise ValueError(f"{str(folder)!r}: slices at the same position along the slice "
                         f"normal: {dup[:5]}; duplicate slices or two acquisitions?")
    step = (pos[-1] - pos[0]) / (len(pos) - 1)
    off_line = np.abs(pos - (pos[0] + np.arange(len(pos))[:, None] * step)).max()
    tol = max(1e-3, 1e-2 * float(np.median(gaps)))
    if np.ptp(gaps) > tol or off_line > tol:
        seen = sorted({round(float(g), 3) for g in gaps})
        raise ValueError(
            f"{str(folder)!r}: slices are not evenly spaced along the slice normal: spacings "
            f"seen {seen[:10]} mm (largest deviation from a straight, even line "
            f"{off_line:.3g} mm); missing or extra slices?"
        )
