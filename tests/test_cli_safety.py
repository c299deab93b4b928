"""``uqseg predict`` never loses data: checks before writing, no overwrite without
--overwrite, nothing left behind by a failure, one-line errors, slab streaming."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from test_io import AFFINE, write_dicom_series

import uqseg
from uqseg import EnsembleSegmenter, cli
from uqseg.datasets import normalize_intensity

DICOM_KW = dict(orientation=[1, 0, 0, 0, 1, 0], spacing=[0.8, 0.6], origin=[-20.0, 30.0, 10.0])


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def listing(folder: Path):
    """Every file under ``folder`` with its size and modification time (None: no folder)."""
    if not folder.exists():
        return None
    return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                  for p in folder.rglob("*"))


def one_line_error(err: str, code: int, expected_code: int, *needles: str) -> None:
    assert code == expected_code, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("uqseg predict: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def _volume(path, shape=(9, 7, 11), seed=0):
    x = (np.random.default_rng(seed).random(shape) * 400).astype(np.float32)
    nib.save(nib.Nifti1Image(x, AFFINE), path)
    return x


@pytest.fixture
def out(tmp_path):
    """An output folder that already holds a file of the user's."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    return folder


# ---------------------------------------------------------------------- streaming
@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slab_streaming_equals_the_whole_volume(tmp_path, tiny_members, tiny_2d, axis,
                                                monkeypatch, capsys):
    """Many slabs and many file chunks give the maps of one pass over all slices."""
    from uqseg import SpectralOODDetector, _predict, _slabwriter

    x = _volume(tmp_path / "vol.nii.gz")
    per_slice = int(np.prod(x.shape)) // x.shape[axis]
    monkeypatch.setattr(_predict, "SLAB_VOXELS", 3 * per_slice)   # 3 slices per slab
    monkeypatch.setattr(_slabwriter, "CHUNK_BYTES", 2 * 9 * 7)    # 1-2 planes per chunk
    rng = np.random.default_rng(1)
    uqseg.save(SpectralOODDetector(tiny_2d).fit(rng.random((6, 1, 16, 16), np.float32)),
               tmp_path / "ood")
    code, _, err = run(["predict", *tiny_members[:2], tmp_path / "vol.nii.gz", "--out",
                        tmp_path / "o", "--axis", axis, "--estimators", tmp_path / "ood",
                        "--no-progress"], capsys)
    assert code == 0, err
    slices = normalize_intensity(np.moveaxis(x, axis, 0)[:, None])
    ens = EnsembleSegmenter(tiny_members[:2]).fit()
    proba, maps = ens.predict_with_uncertainty(slices)
    got = {k: nib.load(tmp_path / "o" / f"vol_{k}.nii.gz") for k in
           ("seg", "proba", "entropy", "mi")}
    for img in got.values():
        np.testing.assert_allclose(img.affine, AFFINE)
    np.testing.assert_allclose(np.asarray(got["proba"].dataobj),
                               np.moveaxis(np.moveaxis(proba, 1, -1), 0, axis), atol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["seg"].dataobj),
                                  np.moveaxis(proba.argmax(1), 0, axis))
    np.testing.assert_allclose(np.asarray(got["entropy"].dataobj),
                               np.moveaxis(maps["entropy"], 0, axis), atol=1e-6)
    np.testing.assert_allclose(np.asarray(got["mi"].dataobj),
                               np.moveaxis(maps["mutual_information"], 0, axis), atol=1e-6)
    report = json.loads((tmp_path / "o" / "vol_scores.json").read_text())
    assert report["class_voxels"] == np.bincount(proba.argmax(1).ravel(), minlength=3).tolist()
    np.testing.assert_allclose(report["mean_entropy"], maps["entropy"].mean(), rtol=1e-5)
    det = uqseg.load(tmp_path / "ood")
    np.testing.assert_allclose(report["estimators"]["ood"]["score_samples"],
                               det.score_samples(slices), rtol=1e-5)
    assert report["estimators"]["ood"]["fraction_outlier"] == pytest.approx(
        np.mean(det.score_samples(slices) < det.offset_))
    assert [p.name for p in (tmp_path / "o").iterdir() if p.name.startswith(".")] == []


# ---------------------------------------------------------------------- overwrite
def test_overwrite_refused_without_flag_and_stale_maps_removed_with_it(tmp_path, tiny_members,
                                                                      out, capsys):
    _volume(tmp_path / "scan.nii.gz")
    argv = ["predict", *tiny_members[:2], tmp_path / "scan.nii.gz", "--out", out,
            "--no-progress"]
    assert run(argv, capsys)[0] == 0
    assert (out / "scan_mi.nii.gz").exists()
    before = listing(out)
    code, _, err = run(argv, capsys)
    one_line_error(err, code, 2, "refusing to overwrite", "--overwrite", "scan_seg.nii.gz")
    assert listing(out) == before
    # scan.nii after scan.nii.gz: same stem, same output names
    _volume(tmp_path / "scan.nii", seed=3)
    code, _, err = run(["predict", tiny_members[0], tmp_path / "scan.nii", "--out", out],
                       capsys)
    one_line_error(err, code, 2, "refusing to overwrite")
    assert listing(out) == before
    # --overwrite replaces them; one member has no MI: the earlier run's map goes too
    code, _, err = run(["predict", tiny_members[0], tmp_path / "scan.nii", "--out", out,
                        "--overwrite", "--no-progress"], capsys)
    assert code == 0, err
    assert not (out / "scan_mi.nii.gz").exists()
    report = json.loads((out / "scan_scores.json").read_text())
    assert report["input"] == str(tmp_path / "scan.nii") and report["n_samples"] == 1
    assert (out / "notes.txt").read_text() == "keep me"


def test_inputs_colliding_in_one_run(tmp_path, tiny_2d, capsys):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        _volume(tmp_path / sub / "scan.nii.gz")
    np.save(tmp_path / "other.npy", np.zeros((8, 8), np.float32))
    code, _, err = run(["predict", tiny_2d, tmp_path / "other.npy", tmp_path / "a/scan.nii.gz",
                        tmp_path / "b/scan.nii.gz", "--out", tmp_path / "o"], capsys)
    one_line_error(err, code, 2, "same output names", "a/scan.nii.gz", "b/scan.nii.gz")
    assert listing(tmp_path / "o") is None


def test_several_inputs_in_one_run(tmp_path, tiny_2d, capsys):
    x = _volume(tmp_path / "a.nii.gz")
    np.save(tmp_path / "b.npy", x[..., 0])
    code, stdout, err = run(["predict", tiny_2d, tmp_path / "a.nii.gz", tmp_path / "b.npy",
                             "--out", tmp_path / "o", "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == sorted(
        f"{s}_{k}" for s in "ab" for k in ("seg.nii.gz", "proba.nii.gz", "entropy.nii.gz",
                                           "scores.json"))
    assert len(stdout.split()) == 8
    seg_b = np.asarray(nib.load(tmp_path / "o" / "b_seg.nii.gz").dataobj)
    np.testing.assert_array_equal(seg_b, np.asarray(
        nib.load(tmp_path / "o" / "a_seg.nii.gz").dataobj)[..., 0])


# ---------------------------------------------------------------------- failures write nothing
def test_truncated_and_corrupt_gzip(tmp_path, tiny_2d, out, capsys):
    _volume(tmp_path / "ok.nii.gz")
    data = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) * 2 // 3])
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0xFF
    (tmp_path / "flip.nii.gz").write_bytes(bytes(flipped))
    before = listing(out)
    for bad in ("cut", "flip"):
        # the good input comes first: its outputs must not be published either
        code, _, err = run(["predict", tiny_2d, tmp_path / "ok.nii.gz", tmp_path /
                            f"{bad}.nii.gz", "--out", out, "--no-progress"], capsys)
        one_line_error(err, code, 1, f"{bad}.nii.gz")
        assert listing(out) == before
    with pytest.raises((EOFError, OSError, gzip.BadGzipFile)):
        gzip.decompress((tmp_path / "cut.nii.gz").read_bytes())  # really truncated


def test_failure_mid_run_leaves_the_folder_as_it_was(tmp_path, tiny_2d, out, monkeypatch,
                                                     capsys):
    from uqseg import _predict

    _volume(tmp_path / "a.nii.gz")
    _volume(tmp_path / "b.nii.gz", seed=1)
    before = listing(out)
    calls, fail_at = [], {6}
    real = EnsembleSegmenter.run  # predict's one pass (uqseg.assess)

    def failing(self, X, layers=(), maps=(), **kw):
        calls.append(len(X))
        if len(calls) in fail_at:  # 11 slices = 4 slabs: call 6 is inside the second input
            raise OSError("disk full")
        return real(self, X, layers=layers, maps=maps, **kw)

    monkeypatch.setattr(_predict, "SLAB_VOXELS", 3 * 9 * 7)
    monkeypatch.setattr(EnsembleSegmenter, "run", failing)
    code, _, err = run(["predict", tiny_2d, tmp_path / "a.nii.gz", tmp_path / "b.nii.gz",
                        "--out", out, "--no-progress"], capsys)
    one_line_error(err, code, 1, "disk full")
    assert len(calls) == 6
    assert listing(out) == before  # no output, no temporary folder, no scratch file
    fail_at.add(7)
    code, _, err = run(["predict", tiny_2d, tmp_path / "a.nii.gz", "--out", tmp_path / "new",
                        "--no-progress"], capsys)
    assert code == 1 and listing(tmp_path / "new") is None  # a folder it created is removed


def test_invalid_models(tmp_path, tiny_2d, out, model_dir, capsys):
    import onnx
    from onnx_models import make_wrong_rank

    _volume(tmp_path / "v.nii.gz")
    (tmp_path / "junk.onnx").write_bytes(b"\x08\x07garbage" * 10)
    (tmp_path / "half.onnx").write_bytes(Path(tiny_2d).read_bytes()[:300])
    onnx.save(make_wrong_rank(), tmp_path / "classifier.onnx")
    before = listing(out)
    for name, why in [("junk", "not a valid ONNX model"), ("half", "not a valid ONNX model"),
                      ("classifier", "rank 2")]:
        code, _, err = run(["predict", tiny_2d, tmp_path / f"{name}.onnx", tmp_path / "v.nii.gz",
                            "--out", out], capsys)
        one_line_error(err, code, 1, f"{name}.onnx", why)
        assert listing(out) == before


def test_wrong_kind_of_estimator_found_before_any_work(tmp_path, tiny_2d, out, monkeypatch,
                                                       capsys):
    from uqseg import TemperatureCalibrator

    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    uqseg.save(TemperatureCalibrator().fit(logits, logits.argmax(1)), tmp_path / "cal")
    _volume(tmp_path / "v.nii.gz")
    for method in ("run", "predict_with_uncertainty", "predict_proba"):
        monkeypatch.setattr(EnsembleSegmenter, method,
                            lambda *a, **k: pytest.fail("inference ran before the check"))
    before = listing(out)
    code, _, err = run(["predict", tiny_2d, tmp_path / "v.nii.gz", "--out", out,
                        "--estimators", tmp_path / "cal"], capsys)
    one_line_error(err, code, 1, "TemperatureCalibrator", "OOD detectors")
    assert listing(out) == before


def test_out_is_a_file(tmp_path, tiny_2d, capsys):
    _volume(tmp_path / "v.nii.gz")
    (tmp_path / "o").write_text("x")
    code, _, err = run(["predict", tiny_2d, tmp_path / "v.nii.gz", "--out", tmp_path / "o"],
                       capsys)
    one_line_error(err, code, 2, "not a folder")


def test_models_after_inputs_are_a_usage_error(tmp_path, tiny_2d, capsys):
    _volume(tmp_path / "v.nii.gz")
    code, _, err = run(["predict", tiny_2d, tmp_path / "v.nii.gz", tiny_2d, "--out", tmp_path],
                       capsys)
    one_line_error(err, code, 2, "models must come before the inputs")


# ---------------------------------------------------------------------- DICOM
def _series(folder, n=5):
    vol = np.random.default_rng(4).integers(0, 4000, size=(8, 10, n)).astype(np.uint16)
    write_dicom_series(folder, vol, step=np.array([0, 0, 2.5]), shuffle=False, **DICOM_KW)
    return vol


def test_dicom_junk_last_file(tmp_path, tiny_2d, out, capsys):
    _series(tmp_path / "dcm")
    last = sorted((tmp_path / "dcm").glob("*.dcm"))[-1]
    last.write_bytes(np.random.default_rng(0).bytes(4000))
    before = listing(out)
    code, _, err = run(["predict", tiny_2d, tmp_path / "dcm", "--out", out], capsys)
    one_line_error(err, code, 1, last.name, "1 of 5 files")
    assert listing(out) == before


def test_dicom_truncated_pixel_data_and_stray_file_are_named(tmp_path):
    from uqseg.io import read_dicom_series

    _series(tmp_path / "dcm")
    files = sorted((tmp_path / "dcm").glob("*.dcm"))
    files[2].write_bytes(files[2].read_bytes()[:-50])
    (tmp_path / "dcm" / "notes.txt").write_text("not DICOM")
    with pytest.raises(ValueError, match=r"2 of 6 files") as exc:
        read_dicom_series(tmp_path / "dcm")
    assert files[2].name in str(exc.value) and "notes.txt" in str(exc.value)


def test_dicom_uneven_spacing_and_duplicates(tmp_path, tiny_2d, capsys):
    from uqseg.io import read_dicom_series

    vol = _series(tmp_path / "dcm", n=5)
    (sorted((tmp_path / "dcm").glob("*.dcm"))[2]).unlink()  # a missing slice: gaps 2.5, 5.0
    code, _, err = run(["predict", tiny_2d, tmp_path / "dcm", "--out", tmp_path / "o"],
                       capsys)
    one_line_error(err, code, 1, "not evenly spaced", "[2.5, 5.0]")
    assert listing(tmp_path / "o") is None
    write_dicom_series(tmp_path / "dup", vol[..., :3], step=np.zeros(3), shuffle=False,
                       **DICOM_KW)
    with pytest.raises(ValueError, match="same position"):
        read_dicom_series(tmp_path / "dup")


def test_dicom_complete_series_is_read_in_full(tmp_path):
    from uqseg.io import read_dicom_series

    vol = _series(tmp_path / "dcm", n=6)
    got = read_dicom_series(tmp_path / "dcm")
    assert got.data.shape == (10, 8, 6) and got.data.dtype == np.float32
    np.testing.assert_array_equal(got.data, vol.transpose(1, 0, 2))


# ---------------------------------------------------------------------- the real process
def test_process_prints_one_line_and_exits_nonzero(tmp_path, tiny_2d):
    _volume(tmp_path / "ok.nii.gz")
    data = (tmp_path / "ok.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    res = subprocess.run([sys.executable, "-m", "uqseg.cli", "predict", tiny_2d,
                          str(tmp_path / "cut.nii.gz"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 1
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "cut.nii.gz" in res.stderr and "truncated" in res.stderr
    assert not (tmp_path / "o").exists()
    res = subprocess.run([sys.executable, "-m", "uqseg.cli", "--debug", "predict", tiny_2d,
                          str(tmp_path / "cut.nii.gz"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True)
    assert res.returncode == 1 and "Traceback" in res.stderr  # --debug shows it
