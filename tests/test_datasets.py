"""Tests of uqseg.datasets: embedded brain data, OOD images, corruptions, model zoo lookup."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from uqseg import datasets
from uqseg.datasets import (
    CORRUPTIONS,
    OOD_KINDS,
    _cache,
    _zoo,
    corrupt,
    load_brain_tissue,
    load_ood,
    normalize_intensity,
    reference_model_info,
    reference_models,
)

SMALL = (32, 32)  # cheap size for the tests that rebuild data


@pytest.fixture(scope="module", autouse=True)
def data_dir(tmp_path_factory):
    # one cache for the whole module: every split is built once
    path = tmp_path_factory.mktemp("uqseg_data")
    mp = pytest.MonkeyPatch()
    mp.setenv("UQSEG_DATA_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def test_split(data_dir):
    return load_brain_tissue("test")


@pytest.fixture(scope="module")
def small_splits(data_dir):
    return {s: load_brain_tissue(s, size=SMALL) for s in ("train", "val", "test")}


# ---------------------------------------------------------------- brain tissue data
def test_default_split_shapes_dtypes_labels(test_split):
    X, y = test_split
    assert X.dtype == np.float32 and y.dtype == np.int64
    assert X.ndim == 4 and X.shape[1:] == (1, 128, 128)
    assert y.shape == (X.shape[0], 128, 128)
    assert 80 <= X.shape[0] <= 5 * 24
    assert set(np.unique(y)) == {0, 1, 2}
    assert X.min() >= 0.0 and X.max() <= 1.0


def test_split_sizes(small_splits):
    n = {s: len(v[0]) for s, v in small_splits.items()}
    assert 200 <= n["train"] <= 12 * 24
    assert 80 <= n["val"] <= 5 * 24 and 80 <= n["test"] <= 5 * 24


def test_subject_ids(data_dir):
    X, y, subj = load_brain_tissue("val", size=SMALL, return_subjects=True)
    assert subj.shape == (len(X),) and set(subj) == set(range(5))
    assert np.all(np.diff(subj) >= 0)


def test_labels_plausible(test_split):
    X, y = test_split
    # grey and white matter both present in most slices
    both = [(lab == 1).any() and (lab == 2).any() for lab in y]
    assert np.mean(both) > 0.8
    # white matter is interior: wrapped by grey matter, it rarely touches background
    wm = y == 2
    near_bg = ndi.binary_dilation(y == 0, structure=np.ones((1, 3, 3), bool))
    assert (wm & near_bg).sum() / wm.sum() < 0.05
    # T1 contrast: white matter brighter than grey matter, brighter than background
    means = [X[:, 0][y == k].mean() for k in range(3)]
    assert means[2] > means[1] + 0.1 > means[0] + 0.2


def test_deterministic_across_fresh_builds(small_splits, tmp_path, monkeypatch):
    monkeypatch.setenv("UQSEG_DATA_DIR", str(tmp_path))
    X, y = load_brain_tissue("val", size=SMALL)
    assert not any(tmp_path.glob("*.tmp"))
    np.testing.assert_array_equal(X, small_splits["val"][0])
    np.testing.assert_array_equal(y, small_splits["val"][1])


def test_splits_share_no_slice(small_splits):
    tr = small_splits["train"][0].reshape(len(small_splits["train"][0]), -1)
    for other in ("val", "test"):
        te = small_splits[other][0].reshape(len(small_splits[other][0]), -1)
        # mean absolute difference between every pair: no near-duplicates across splits
        diff = np.abs(tr[:, None, :] - te[None, :, :]).mean(axis=2)
        assert diff.min() > 0.01
    va = small_splits["val"][0]
    te = small_splits["test"][0]
    n = min(len(va), len(te))
    assert not np.array_equal(va[:n], te[:n])


@pytest.mark.parametrize("plane", ["coronal", "sagittal"])
def test_other_planes(plane, small_splits):
    X, y = load_brain_tissue("val", plane=plane, size=SMALL)
    assert X.shape[1:] == (1, *SMALL) and set(np.unique(y)) == {0, 1, 2}
    assert X.shape != small_splits["val"][0].shape or not np.allclose(X, small_splits["val"][0])


def test_three_d_volumes(data_dir):
    X, y = load_brain_tissue("val", dims=3, size=(20, 24, 28))
    assert X.shape == (5, 1, 20, 24, 28) and X.dtype == np.float32
    assert y.shape == (5, 20, 24, 28) and y.dtype == np.int64
    assert set(np.unique(y)) == {0, 1, 2}
    means = [X[:, 0][y == k].mean() for k in range(3)]
    assert means[2] > means[1] > means[0]


def test_three_d_default_size(data_dir):
    X, y = load_brain_tissue("test", dims=3)
    assert X.shape == (5, 1, 64, 64, 64) and y.shape == (5, 64, 64, 64)


# ---------------------------------------------------------------- cache
def test_cache_file_reload_and_rebuild(small_splits, data_dir):
    key = _cache.cache_key(
        "brain_tissue",
        split="val",
        plane="axial",
        size=list(SMALL),
        dims=2,
        subjects=5,
        slices=22,
    )
    path = _cache.cache_path(key)
    assert path.parent == data_dir and path.exists()
    X0, y0 = small_splits["val"]
    X1, y1 = load_brain_tissue("val", size=SMALL)
    np.testing.assert_array_equal(X1, X0)
    np.testing.assert_array_equal(y1, y0)
    # a truncated file is rebuilt, not trusted
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    X2, y2 = load_brain_tissue("val", size=SMALL)
    np.testing.assert_array_equal(X2, X0)
    np.testing.assert_array_equal(y2, y0)
    assert path.read_bytes() == raw
    # so is garbage
    path.write_bytes(b"not an npz file")
    np.testing.assert_array_equal(load_brain_tissue("val", size=SMALL)[0], X0)
    assert path.read_bytes() == raw


def test_cache_rejects_file_with_other_key(tmp_path, monkeypatch):
    monkeypatch.setenv("UQSEG_DATA_DIR", str(tmp_path))
    key = _cache.cache_key("unit", a=1)
    path = _cache.cache_path(key)
    _cache._write(path, _cache.cache_key("unit", a=2), {"v": np.zeros(3)})
    calls = []

    def build():
        calls.append(1)
        return {"v": np.ones(3)}

    np.testing.assert_array_equal(_cache.cached(key, build)["v"], np.ones(3))
    np.testing.assert_array_equal(_cache.cached(key, build)["v"], np.ones(3))
    assert calls == [1]


def test_building_says_so_once(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("UQSEG_DATA_DIR", str(tmp_path))
    X, _ = load_brain_tissue("val", size=(16, 16))
    err = capsys.readouterr().err
    assert err.count("uqseg: building the brain tissue 'val' split (5 subjects") == 1
    assert str(tmp_path) in err
    np.testing.assert_array_equal(load_brain_tissue("val", size=(16, 16))[0], X)
    assert "building" not in capsys.readouterr().err  # read from the cache: silent


# ---------------------------------------------------------------- argument errors
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"split": "training"}, ValueError, "split"),
        ({"split": "train", "plane": "oblique"}, ValueError, "plane"),
        ({"split": "train", "dims": 4}, ValueError, "dims"),
        ({"split": "train", "dims": True}, ValueError, "dims"),
        ({"split": "train", "size": (64, 64, 64)}, ValueError, "size"),
        ({"split": "train", "size": (64, -1)}, ValueError, "size"),
        ({"split": "train", "size": (64.5, 64)}, ValueError, "size"),
        ({"split": "train", "size": "big"}, TypeError, "size"),
        ({"split": "train", "dims": 3, "size": (64, 64)}, ValueError, "size"),
    ],
)
def test_brain_bad_arguments(kwargs, exc, match):
    split = kwargs.pop("split")
    with pytest.raises(exc, match=match):
        load_brain_tissue(split, **kwargs)


# ---------------------------------------------------------------- normalisation
def test_normalize_against_sorted_values():
    rng = np.random.default_rng(3)
    img = rng.gamma(2.0, 10.0, size=(40, 50))
    v = np.sort(img.ravel())
    n = v.size
    lo, hi = v[int(np.floor(0.01 * (n - 1)))], v[int(np.ceil(0.99 * (n - 1)))]
    expected = np.clip((img - lo) / (hi - lo), 0, 1)
    out = normalize_intensity(img)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected, atol=1e-6)
    np.testing.assert_array_equal(normalize_intensity(out), out)  # idempotent


def test_normalize_batch_is_per_image():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(3, 2, 16, 16)) * np.array([1.0, 50.0])[None, :, None, None]
    out = normalize_intensity(X)
    for n in range(3):
        for c in range(2):
            np.testing.assert_array_equal(out[n, c], normalize_intensity(X[n, c]))
    assert np.all(normalize_intensity(np.full((8, 8), 5.0)) == 0)


@pytest.mark.parametrize(
    ("img", "exc"),
    [
        (np.zeros(5), ValueError),
        (np.zeros((2, 2, 2, 2, 2, 2)), ValueError),
        (np.array([[1.0, np.nan], [0.0, 1.0]]), ValueError),
        (np.array([["a", "b"], ["c", "d"]]), TypeError),
    ],
)
def test_normalize_bad_input(img, exc):
    with pytest.raises(exc, match="img"):
        normalize_intensity(img)


# ---------------------------------------------------------------- OOD images
@pytest.mark.parametrize("kind", OOD_KINDS)
def test_every_ood_kind(kind, test_split):
    X = load_ood(kind)
    assert X.dtype == np.float32 and X.ndim == 4 and X.shape[1:] == (1, 128, 128)
    assert X.shape[0] >= 20
    assert np.isfinite(X).all() and X.min() >= 0 and X.max() <= 1
    np.testing.assert_array_equal(normalize_intensity(X), X)
    # every image differs from every clean test image
    clean = test_split[0].reshape(len(test_split[0]), -1)[::4]
    flat = X.reshape(len(X), -1)
    diff = np.abs(flat[:, None, :] - clean[None, :, :]).mean(axis=2)
    assert diff.min() > 0.005
    if kind in ("noise", "ghosting", "bias", "blur", "orientation"):
        assert len(X) == len(test_split[0])


def test_ood_deterministic_and_sized(tmp_path, monkeypatch):
    a = load_ood("ct")
    monkeypatch.setenv("UQSEG_DATA_DIR", str(tmp_path))
    b = load_ood("ct")
    np.testing.assert_array_equal(a, b)
    assert load_ood("natural", size=(48, 40)).shape[1:] == (1, 48, 40)


def test_ood_bad_arguments():
    with pytest.raises(ValueError, match="kind"):
        load_ood("pet")
    with pytest.raises(ValueError, match="size"):
        load_ood("ct", size=(64, 64, 64))
    with pytest.raises(ValueError, match="plane"):
        load_ood("noise", plane="oblique")


# ---------------------------------------------------------------- corruptions
@pytest.fixture(scope="module")
def few(small_splits):
    return small_splits["test"][0][::25]


def test_corrupt_severity_zero_is_identity(few):
    for kind in CORRUPTIONS:
        out = corrupt(few, kind, 0.0)
        assert out.dtype == np.float32
        np.testing.assert_array_equal(out, few)


@pytest.mark.parametrize("kind", [k for k in CORRUPTIONS if k != "rotate"])
def test_corrupt_difference_grows_with_severity(kind, test_split):
    X = test_split[0][10::30]
    dist = [np.abs(corrupt(X, kind, s, seed=1) - X).mean() for s in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert dist[0] == 0
    assert all(b > a for a, b in zip(dist, dist[1:], strict=False)), dist
    out = corrupt(X, kind, 1.0, seed=1)
    assert out.min() >= 0 and out.max() <= 1
    np.testing.assert_array_equal(out, corrupt(X, kind, 1.0, seed=1))


def test_corrupt_rotate_matches_quarter_turn(test_split):
    X = test_split[0][40:43]
    out = corrupt(X, "rotate", 1.0, seed=2)
    inner = (0, slice(20, 108), slice(20, 108))
    for img, rot in zip(X, out, strict=True):
        # the direction of each image's turn comes from the seed: one of the two matches
        errs = [np.abs(rot[inner] - np.rot90(img, k, axes=(1, 2))[inner]).mean() for k in (1, -1)]
        assert min(errs) < 0.02 < max(errs), errs


def test_corrupt_downsample_removes_detail(test_split):
    X = test_split[0][40:43]
    out = corrupt(X, "downsample", 1.0)

    def detail(a):
        return np.abs(np.diff(a, axis=-1)).mean()

    assert detail(out) < 0.7 * detail(X)


def test_corrupt_works_in_3d(data_dir):
    X, _ = load_brain_tissue("val", dims=3, size=(20, 24, 28))
    for kind in CORRUPTIONS:
        out = corrupt(X[:1], kind, 0.7)
        assert out.shape == (1, 1, 20, 24, 28) and out.dtype == np.float32
        assert np.isfinite(out).all() and not np.array_equal(out, X[:1])


@pytest.mark.parametrize(
    ("args", "exc", "match"),
    [
        (("fog", 0.5), ValueError, "kind"),
        (("noise", 1.5), ValueError, "severity"),
        (("noise", -0.1), ValueError, "severity"),
        (("noise", "high"), TypeError, "severity"),
        (("noise", True), TypeError, "severity"),
    ],
)
def test_corrupt_bad_arguments(few, args, exc, match):
    with pytest.raises(exc, match=match):
        corrupt(few, *args)


def test_corrupt_bad_images():
    with pytest.raises(ValueError, match="X"):
        corrupt(np.zeros((4, 4)), "noise", 0.5)
    with pytest.raises(TypeError, match="seed"):
        corrupt(np.zeros((1, 1, 8, 8)), "noise", 0.5, seed=-1)


# ---------------------------------------------------------------- model zoo
def test_reference_models_missing(tmp_path, monkeypatch):
    monkeypatch.setattr(_zoo, "MODELS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="train_zoo.py"):
        reference_models()
    assert reference_model_info() == {}


def test_reference_models_sorted_and_info(tmp_path, monkeypatch):
    monkeypatch.setattr(_zoo, "MODELS_DIR", tmp_path)
    for name in ("unet_b.onnx", "unet_a.onnx", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    paths = reference_models()
    assert [p.rsplit("/", 1)[-1] for p in paths] == ["unet_a.onnx", "unet_b.onnx"]
    (tmp_path / "zoo.json").write_text(json.dumps({"members": ["unet_a.onnx"]}))
    assert reference_model_info() == {"members": ["unet_a.onnx"]}


def test_public_names_and_no_torch():
    for name in (
        "load_brain_tissue",
        "load_ood",
        "OOD_KINDS",
        "corrupt",
        "CORRUPTIONS",
        "normalize_intensity",
        "reference_models",
        "reference_model_info",
    ):
        assert name in datasets.__all__ and hasattr(datasets, name)
    code = "import sys, uqseg.datasets; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_mni_scan_other_orientation_is_the_template_reindexed():
    """Stored L, P, S at 1 mm, the template is its own voxels reversed along x and y: every
    voxel lands on a template voxel (no interpolation error), and both affines put a voxel
    and its reversed twin at the same world point."""
    from uqseg.datasets._brain import load_template

    t1, labels, aff = datasets.load_mni_scan()
    assert aff[:3, :3].tolist() == np.eye(3).tolist() and t1.dtype == np.uint8
    t1_lps, labels_lps, aff_lps = datasets.load_mni_scan("LPS")
    assert t1_lps.shape == t1.shape
    np.testing.assert_allclose(t1_lps, t1[::-1, ::-1].astype(np.float32), atol=1e-3)
    # labels agree but where background (1 - gm - wm) and grey matter tie exactly in the
    # template's 8-bit maps: float32 and float64 rounding break those ties differently
    tpl = load_template()
    gm, wm = (tpl[k].astype(int)[::-1, ::-1] for k in ("gm", "wm"))
    tie = np.clip(255 - gm - wm, 0, 255) == gm
    differ = labels_lps != labels[::-1, ::-1]
    assert not (differ & ~tie).any() and differ.sum() < 1e-3 * differ.size
    ijk = np.array([3, 50, 7, 1.0])
    twin = np.array([t1.shape[0] - 1 - 3, t1.shape[1] - 1 - 50, 7, 1.0])
    np.testing.assert_allclose(aff_lps @ ijk, aff @ twin)
    assert set(np.unique(labels).tolist()) == {0, 1, 2}
