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
