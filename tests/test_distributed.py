"""uqseg.distributed.score_dataset on a small local Ray cluster started by this module."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray")

import uqseg  # noqa: E402
from uqseg import EnsembleSegmenter, OnnxSegmenter  # noqa: E402
from uqseg.distributed import score_dataset, score_images  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).standard_normal((5, 1, 16, 16)).astype(np.float32)


def _entropy(p):
    """Independent entropy: -sum p log p over the class axis, 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(p > 0, p * np.log(p), 0.0).sum(axis=0)


def test_segmenter_matches_local(cluster, tiny_2d, X):
    seg = OnnxSegmenter(tiny_2d).fit()
    res = score_dataset(seg, X, batch_size=2, outputs=(
        "labels", "volumes", "uncertainty", "uncertainty_map"))
    proba = seg.predict_proba(X)
    assert [r["id"] for r in res] == list(range(len(X)))
    for r, p in zip(res, proba, strict=True):
        labels = p.argmax(axis=0)
        assert r["labels"].dtype == np.uint8
        np.testing.assert_array_equal(r["labels"], labels)
        np.testing.assert_array_equal(r["volumes"], [(labels == k).sum() for k in range(3)])
        np.testing.assert_allclose(r["uncertainty"], _entropy(p).mean(), rtol=1e-5)
        assert r["uncertainty_map"].dtype == np.float16
        np.testing.assert_allclose(r["uncertainty_map"], _entropy(p), rtol=2e-3, atol=1e-3)


def test_saved_folder_paths_and_maps(cluster, tiny_members, X, tmp_path):
    """An ensemble (with OOD detector and quality regressor when present) saved with
    uqseg.save, images as .npy and NIfTI files, full maps written by the workers."""
    ood_mod = pytest.importorskip("uqseg.ood")
    quality_mod = pytest.importorskip("uqseg.quality")
    nib = pytest.importorskip("nibabel")
    ens = EnsembleSegmenter(tiny_members).fit()
    rng = np.random.default_rng(1)
    X_fit = rng.standard_normal((6, 1, 16, 16)).astype(np.float32)
    y_fit = ens.predict(X_fit)
    y_fit[:, :4] = 0  # imperfect so that the regressor sees a spread of Dice
    roles = {"segmenter": ens,
             "ood": ood_mod.UncertaintyOODDetector(ens).fit(X_fit),
             "quality": quality_mod.QualityRegressor(ens).fit(X_fit, y_fit)}
    folder = uqseg.save(roles, tmp_path / "saved")
    paths = []
    for i, x in enumerate(X[:3]):
        paths.append(tmp_path / f"img{i}.npy")
        np.save(paths[-1], x)
    affine = np.diag([2.0, 3.0, 1.0, 1.0])
    nib.save(nib.Nifti1Image(X[3, 0], affine), tmp_path / "img3.nii.gz")
    paths.append(tmp_path / "img3.nii.gz")
    res = score_dataset(folder, paths, batch_size=2, write_maps_to=tmp_path / "maps")
    local = {"proba": ens.predict_proba(X[:4]), "ood": roles["ood"].score_samples(X[:4]),
             "quality": roles["quality"].predict(X[:4])}
    assert [r["path"] for r in res] == [str(p) for p in paths]
    for i, r in enumerate(res):
        assert set(r) == {"id", "path", "labels_path", "uncertainty", "ood", "quality"}
        want = local["proba"][i].argmax(axis=0)
        if i < 3:
            assert r["labels_path"] == str(tmp_path / "maps" / f"img{i}_labels.npy")
            np.testing.assert_array_equal(np.load(r["labels_path"]), want)
        else:
            img = nib.load(r["labels_path"])
            assert r["labels_path"].endswith("img3_labels.nii.gz")
            np.testing.assert_array_equal(np.asarray(img.dataobj), want)
            np.testing.assert_array_equal(img.affine, affine)
        np.testing.assert_allclose(r["uncertainty"], _entropy(local["proba"][i]).mean(),
                                   rtol=1e-5)
        np.testing.assert_allclose(r["ood"], local["ood"][i], rtol=1e-5)
        np.testing.assert_allclose(r["quality"], local["quality"][i], rtol=1e-5)


def test_ragged_list_and_ray_dataset(cluster, tiny_2d):
    seg = OnnxSegmenter(tiny_2d).fit()
    rng = np.random.default_rng(2)
    images = [rng.standard_normal((1, h, w)).astype(np.float32)
              for h, w in [(8, 8), (12, 16), (8, 8), (16, 10)]]
    ds = ray.data.from_items([{"id": f"case{i}", "image": im} for i, im in enumerate(images)])
    for data in (images, ds):
        res = score_dataset(seg, data, batch_size=3, concurrency=1)
        assert set(res[0]) == {"id", "labels", "uncertainty"}  # default: what a segmenter has
        for r, im in zip(res, images, strict=True):
            np.testing.assert_array_equal(r["labels"], seg.predict(im[None])[0])


def test_score_images_is_the_actor_kernel(tiny_2d, X):
    seg = OnnxSegmenter(tiny_2d).fit()
    rows = score_images({"segmenter": seg}, list(X[:2]), ("labels",))
    np.testing.assert_array_equal(np.stack([r["labels"] for r in rows]), seg.predict(X[:2]))


def test_score_images_runs_the_ensemble_once_for_every_output(tiny_members, X, monkeypatch):
    import onnxruntime as ort

    from uqseg import QualityRegressor, SpectralOODDetector

    rng = np.random.default_rng(1)
    Xf = rng.standard_normal((12, 1, 16, 16)).astype(np.float32)
    ens = EnsembleSegmenter(tiny_members[:2], cache_size=0).fit()
    det = SpectralOODDetector(ens).fit(Xf)
    qr = QualityRegressor(ens, typicality=False).fit(Xf, ens.predict(Xf))
    calls = []
    real = ort.InferenceSession.run
    monkeypatch.setattr(ort.InferenceSession, "run",
                        lambda sess, *a, **k: calls.append(1) or real(sess, *a, **k))
    ens.predict_proba(X)
    one_pass, calls[:] = len(calls), []
    rows = score_images({"segmenter": ens, "ood": det, "quality": qr}, list(X),
                        ("labels", "uncertainty_map", "ood", "quality"))
    assert len(calls) == one_pass
    monkeypatch.undo()
    proba = ens.predict_proba(X)
    np.testing.assert_array_equal(np.stack([r["labels"] for r in rows]), proba.argmax(1))
    np.testing.assert_allclose(np.stack([r["uncertainty_map"] for r in rows]).astype(float),
                               np.stack([_entropy(p) for p in proba]), atol=2e-3)
    np.testing.assert_allclose([r["ood"] for r in rows], det.score_samples(X), atol=1e-5)
    np.testing.assert_allclose(np.stack([r["quality"] for r in rows]), qr.predict(X),
                               atol=1e-5)


def test_errors(tiny_2d, X, tmp_path):
    seg = OnnxSegmenter(tiny_2d).fit()
    with pytest.raises(ValueError, match=r"unknown outputs \['dice'\]"):
        score_dataset(seg, X, outputs=("labels", "dice"))
    with pytest.raises(ValueError, match=r"outputs \['ood'\] need a \['ood'\] estimator"):
        score_dataset(seg, X, outputs=("labels", "ood"))
    with pytest.raises(TypeError, match="outputs must be a non-empty tuple"):
        score_dataset(seg, X, outputs="labels")
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        score_dataset(seg, X, batch_size=0)
    with pytest.raises(ValueError, match="concurrency must be an integer >= 1"):
        score_dataset(seg, X, concurrency=(1, 0))
    with pytest.raises(ValueError, match="num_gpus_per_actor must be a number >= 0"):
        score_dataset(seg, X, num_gpus_per_actor=-1)
    with pytest.raises(ValueError, match="map_format must be one of"):
        score_dataset(seg, X, map_format="png")
    with pytest.raises(ValueError, match="on_error must be one of"):
        score_dataset(seg, X, on_error="ignore")
    with pytest.raises(ValueError, match="preprocess must be 'auto', True or False"):
        score_dataset(seg, X, preprocess="yes")
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
    np.save(tmp_path / "a" / "x.npy", X[0])
    np.save(tmp_path / "x.npy", X[0])
    with pytest.raises(ValueError, match="same names"):
        score_dataset(seg, [tmp_path / "x.npy", tmp_path / "a/../x.npy"])
    with pytest.raises(TypeError, match="estimator must be a segmenter"):
        score_dataset(object(), X)
    with pytest.raises(ValueError, match="estimator dict keys must be among"):
        score_dataset({"seg": seg}, X)
    with pytest.raises(TypeError, match="data must be a Ray Dataset"):
        score_dataset(seg, 3)
    with pytest.raises(ValueError, match="image files must be"):
        score_dataset(seg, [str(tmp_path / "a.png")])
    with pytest.raises(FileNotFoundError, match="image file not found"):
        score_dataset(seg, [str(tmp_path / "a.npy")])
    with pytest.raises(ValueError, match="data contains 1 NaN"):
        score_dataset(seg, np.where(X == X.max(), np.nan, X))
    with pytest.raises(ValueError, match="not a uqseg.save folder"):
        score_dataset(str(Path(tmp_path)), X)


def test_on_error_record_keeps_partial_results(cluster, tiny_2d, X, tmp_path):
    """Bad records (junk bytes, wrong channel count, truncated gzip) share batches with good
    ones: each gets its path in ``error``; the good ones are scored and their maps written."""
    nib = pytest.importorskip("nibabel")
    seg = OnnxSegmenter(tiny_2d).fit()
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"good{i}.npy")
        np.save(paths[-1], X[i])
    (tmp_path / "junk.npy").write_bytes(b"\x93NUMPY garbage" * 5)
    np.save(tmp_path / "two_channels.npy", np.concatenate([X[3], X[3]]))
    noise = np.random.default_rng(3).standard_normal((64, 64)).astype(np.float32)
    nib.save(nib.Nifti1Image(noise, np.eye(4)), tmp_path / "full.nii.gz")
    data = (tmp_path / "full.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) * 2 // 3])  # header intact
    order = [paths[0], tmp_path / "junk.npy", paths[1], tmp_path / "two_channels.npy",
             tmp_path / "cut.nii.gz", paths[2]]
    res = score_dataset(seg, order, batch_size=2, on_error="record",
                        write_maps_to=tmp_path / "maps")
    assert [r["path"] for r in res] == [str(p) for p in order]
    for r in res:
        assert set(r) == {"id", "path", "labels_path", "uncertainty", "error"}
    good = [r for r in res if r["error"] is None]
    assert [r["path"] for r in good] == [str(p) for p in paths]
    for i, r in enumerate(good):
        assert r["labels_path"] == str(tmp_path / "maps" / f"good{i}_labels.npy")
        np.testing.assert_array_equal(np.load(r["labels_path"]), seg.predict(X[i:i + 1])[0])
        assert r["uncertainty"] > 0
    bad = {Path(r["path"]).name: r for r in res if r["error"] is not None}
    assert set(bad) == {"junk.npy", "two_channels.npy", "cut.nii.gz"}
    for name, r in bad.items():
        assert name in r["error"] and r["labels_path"] is None and r["uncertainty"] is None
    assert "truncated" in bad["cut.nii.gz"]["error"]
    assert "channel" in bad["two_channels.npy"]["error"]
    assert sorted(p.name for p in (tmp_path / "maps").iterdir()) == [
        f"good{i}_labels.npy" for i in range(3)]


def test_on_error_raise_names_the_record(cluster, tiny_2d, X, tmp_path):
    seg = OnnxSegmenter(tiny_2d).fit()
    np.save(tmp_path / "ok.npy", X[0])
    (tmp_path / "junk.npy").write_bytes(b"garbage")
    with pytest.raises(Exception, match="junk.npy"):
        score_dataset(seg, [tmp_path / "ok.npy", tmp_path / "junk.npy"], batch_size=2)


def test_same_name_in_different_folders_keeps_both_maps(cluster, tiny_2d, X, tmp_path):
    seg = OnnxSegmenter(tiny_2d).fit()
    for i, sub in enumerate(("a", "b/c")):
        (tmp_path / sub).mkdir(parents=True)
        np.save(tmp_path / sub / "img.npy", X[i])
    res = score_dataset(seg, [tmp_path / "a/img.npy", tmp_path / "b/c/img.npy"],
                        outputs=("labels",), write_maps_to=tmp_path / "maps")
    assert [r["labels_path"] for r in res] == [str(tmp_path / "maps/a/img_labels.npy"),
                                               str(tmp_path / "maps/b/c/img_labels.npy")]
    for i, r in enumerate(res):
        np.testing.assert_array_equal(np.load(r["labels_path"]), seg.predict(X[i:i + 1])[0])


def test_map_names_and_read_image(tmp_path, X):
    from uqseg.distributed import map_stems, read_image

    assert map_stems(["/d/a/x.nii.gz", "/d/b/x.npy", "/d/y.npy"]) == ["a/x", "b/x", "y"]
    with pytest.raises(ValueError, match="same names"):
        map_stems(["/d/x.nii", "/d/x.npy"])
    nib = pytest.importorskip("nibabel")
    img = nib.Nifti1Image(np.stack([X[0, 0], X[1, 0]], axis=-1), np.diag([2.0, 1, 1, 1]))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, tmp_path / "c.nii.gz")
    data, affine = read_image(tmp_path / "c.nii.gz")
    assert data.shape == (1, 16, 16, 2) and data.dtype == np.float32  # 3-D: one channel
    np.testing.assert_allclose(data[0], np.stack([X[0, 0], X[1, 0]], axis=-1) * 2.0 + 1.0,
                               rtol=1e-6, atol=1e-6)  # scl_slope/inter applied
    np.testing.assert_array_equal(affine, np.diag([2.0, 1, 1, 1]))
    # NumPy inputs keep the (C, *spatial) layout of one item of X; an .npz may carry an affine
    np.save(tmp_path / "d.npy", X[0])
    data, affine = read_image(tmp_path / "d.npy")
    np.testing.assert_array_equal(data, X[0])
    assert affine is None
    np.savez(tmp_path / "e.npz", image=X[1], affine=np.diag([3.0, 1, 1, 1]))
    data, affine = read_image(tmp_path / "e.npz")
    np.testing.assert_array_equal(data, X[1])
    np.testing.assert_array_equal(affine, np.diag([3.0, 1, 1, 1]))
    assert map_stems(["/d/e.npz"]) == ["e"]
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(ValueError, match="bad.npy"):
        read_image(tmp_path / "bad.npy")
