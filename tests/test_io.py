"""uqseg.io: NIfTI / NumPy / DICOM readers and the NIfTI writer."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from uqseg.io import (
    LPS_TO_RAS,
    dicom_affine,
    image_stem,
    read_dicom_series,
    read_image,
    write_nifti,
)

AFFINE = np.array([[0.0, 0.0, 2.0, -10.0],
                   [1.5, 0.0, 0.0, 5.0],
                   [0.0, -1.0, 0.0, 7.0],
                   [0.0, 0.0, 0.0, 1.0]])


def write_dicom_series(folder, volume, *, orientation, spacing, origin, step, shuffle=True,
                       series_uid="1.2.3.4", slope=1.0, intercept=0.0):
    """A tiny MR series: ``volume`` is (rows, columns, slices) uint16; slice i sits at
    ``origin + i * step`` (LPS); files are written in a shuffled order."""
    from pydicom import Dataset
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    n = volume.shape[2]
    order = np.random.default_rng(0).permutation(n) if shuffle else np.arange(n)
    for file_i, s in enumerate(order):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.SeriesInstanceUID = series_uid
        ds.InstanceNumber = int(s) + 1
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(v) for v in spacing]
        ds.ImagePositionPatient = [float(v) for v in np.asarray(origin) + s * np.asarray(step)]
        ds.SliceThickness = float(np.linalg.norm(step))
        ds.RescaleSlope = slope
        ds.RescaleIntercept = intercept
        plane = np.ascontiguousarray(volume[:, :, s].astype(np.uint16))
        ds.Rows, ds.Columns = plane.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        ds.PixelData = plane.tobytes()
        ds.save_as(folder / f"IM{file_i:04d}.dcm", enforce_file_format=True)
    (folder / ".hidden_notes").write_text("hidden files are ignored")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_round_trip_keeps_affine_and_dtype(tmp_path, suffix):
    data = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    path = write_nifti(tmp_path / f"img{suffix}", data, AFFINE)
    vol = read_image(path)
    assert vol.kind == "nifti"
    np.testing.assert_allclose(vol.affine, AFFINE)
    np.testing.assert_array_equal(vol.data, data)
    labels = write_nifti(tmp_path / "seg.nii.gz", (data % 3).astype(np.uint8), AFFINE)
    assert nib.load(labels).get_data_dtype() == np.uint8


def test_numpy_inputs(tmp_path):
    x = np.random.default_rng(0).random((6, 7)).astype(np.float32)
    np.save(tmp_path / "a.npy", x)
    vol = read_image(tmp_path / "a.npy")
    np.testing.assert_array_equal(vol.data, x)
    np.testing.assert_array_equal(vol.affine, np.eye(4))
    np.savez(tmp_path / "b.npz", image=x[None], affine=AFFINE)
    vol = read_image(tmp_path / "b.npz")
    assert vol.data.shape == (1, 6, 7)
    np.testing.assert_array_equal(vol.affine, AFFINE)
    np.savez(tmp_path / "c.npz", foo=x, bar=x)
    with pytest.raises(ValueError, match="'image'"):
        read_image(tmp_path / "c.npz")
    np.savez(tmp_path / "d.npz", image=x, affine=np.eye(3))
    with pytest.raises(ValueError, match="4x4"):
        read_image(tmp_path / "d.npz")


def test_read_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_image(tmp_path / "missing.nii.gz")
    (tmp_path / "x.txt").write_text("hello")
    with pytest.raises(ValueError, match="unknown format"):
        read_image(tmp_path / "x.txt")
    np.save(tmp_path / "x1.npy", np.zeros(5))
    with pytest.raises(ValueError, match="2-D or 3-D"):
        read_image(tmp_path / "x1.npy")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no DICOM"):
        read_image(tmp_path / "empty")
    with pytest.raises(ValueError, match=".nii"):
        write_nifti(tmp_path / "out.npy", np.zeros((2, 2)), np.eye(4))


def test_image_stem():
    assert image_stem("/a/b/brain.nii.gz") == "brain"
    assert image_stem("x.npz") == "x"
    assert image_stem("/data/series01") == "series01"


def test_dicom_affine_axial_identity_orientation():
    # axial slices, rows along +x (L), columns along +y (P), 0.5 x 0.8 mm pixels, 2 mm slices
    aff = dicom_affine([1, 0, 0, 0, 1, 0], [0.8, 0.5],
                       [[-10, 20, 30], [-10, 20, 32], [-10, 20, 34]])
    # voxel (i=column, j=row, k=slice) -> LPS = origin + i*0.5*x + j*0.8*y + k*2*z
    lps = np.array([[0.5, 0, 0, -10], [0, 0.8, 0, 20], [0, 0, 2, 30], [0, 0, 0, 1]])
    np.testing.assert_allclose(aff, LPS_TO_RAS @ lps)
    np.testing.assert_allclose(aff @ [0, 0, 0, 1], [10, -20, 30, 1])  # L/P flipped to R/A


def test_dicom_series_sorted_by_position_with_affine(tmp_path):
    rng = np.random.default_rng(1)
    vol = rng.integers(0, 1000, size=(4, 5, 3)).astype(np.uint16)  # rows, cols, slices
    # an oblique, coronal-ish orientation: rows along x, columns along -z
    orient = [1, 0, 0, 0, 0, -1]
    normal = np.cross(orient[:3], orient[3:])  # (0, 1, 0)
    step = 3.0 * normal
    origin = np.array([-5.0, 12.0, 40.0])
    write_dicom_series(tmp_path / "series", vol, orientation=orient, spacing=[0.7, 0.9],
                       origin=origin, step=step, slope=2.0, intercept=-100.0)
    out = read_image(tmp_path / "series")
    assert out.kind == "dicom"
    assert out.meta["sorted_by"] == "ImagePositionPatient"
    # (columns, rows, slices), slices in position order, rescaled
    np.testing.assert_allclose(out.data, vol.transpose(1, 0, 2) * 2.0 - 100.0)
    # every voxel maps to the LPS position DICOM defines, converted to RAS
    for i, j, k in [(0, 0, 0), (4, 3, 2), (2, 1, 1)]:
        lps = origin + i * 0.9 * np.array(orient[:3]) + j * 0.7 * np.array(orient[3:]) + k * step
        np.testing.assert_allclose(out.affine @ [i, j, k, 1], [-lps[0], -lps[1], lps[2], 1],
                                   atol=1e-9)


def test_dicom_two_series_is_an_error(tmp_path):
    vol = np.zeros((3, 3, 2), np.uint16)
    kw = dict(orientation=[1, 0, 0, 0, 1, 0], spacing=[1, 1], origin=[0, 0, 0], step=[0, 0, 1])
    write_dicom_series(tmp_path / "s", vol, series_uid="1.1", **kw)
    write_dicom_series(tmp_path / "s" / "b", vol, series_uid="1.2", **kw)
    with pytest.raises(ValueError, match="2 DICOM series"):
        read_dicom_series(tmp_path / "s")


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_forged_nifti_header_is_refused_before_allocation(tmp_path, suffix):
    """A header claiming far more voxels than the file holds (a valid gzip stream: no
    truncation error) is refused from the file length, not by allocating what it claims."""
    from uqseg.io import check_image

    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4))
    img.header.set_data_shape((4000, 4000, 4000))  # 238 GiB of float32
    raw = img.header.binaryblock + b"\0" * 4 + np.zeros(64, np.float32).tobytes()
    path = tmp_path / f"forged{suffix}"
    path.write_bytes(gzip.compress(raw) if suffix == ".nii.gz" else raw)
    for reader in (read_image, check_image):
        with pytest.raises(ValueError, match=r"truncated: its header \(\(4000, 4000, 4000\)"):
            reader(path)
