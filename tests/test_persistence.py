"""uqseg.save / uqseg.load: round trips, integrity checks, allowlist, no pickle."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx_models import make_unet_like
from sklearn.base import BaseEstimator
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler

import uqseg
from uqseg import EnsembleSegmenter, OnnxSegmenter, _restore, persistence


class StandIn(BaseEstimator):
    """Follows the estimator rules: params via get_params, fitted state ends in ``_``."""

    def __init__(self, segmenter=None, scale=1.0, options=None):
        self.segmenter = segmenter
        self.scale = scale
        self.options = options

    def fit(self, X, y=None):
        self.segmenter_ = self.segmenter  # the same object: identity must survive
        self.stats_ = {"mean": np.arange(3, dtype=np.float32), (1, 2): "tuple key", "n": 3}
        self.shape_ = (3, 4)
        self.nan_ = float("nan")
        self.inf_ = -np.inf
        self.offset_ = np.float16(0.25)
        self.dtype_ = np.dtype("int16")
        self.rng_ = np.random.default_rng(7)
        self.scaler_ = StandardScaler().fit(np.arange(12.0).reshape(6, 2))
        self._cache = "runtime only"
        return self

    def predict(self, X):
        proba = X if self.segmenter_ is None else self.segmenter_.predict_proba(X)
        return proba * self.scale + self.stats_["mean"][None, :, None, None] + self.offset_


@pytest.fixture
def allow_standin(monkeypatch):
    """Put StandIn on the exact allowlist; its restore checks accept any value (test only)."""
    spec = _restore.Spec(lambda est, where: None, lambda est, state, where: None)
    monkeypatch.setitem(_restore.CHECKS, f"{StandIn.__module__}.{StandIn.__qualname__}", spec)


@pytest.fixture
def X2():
    return np.random.default_rng(0).standard_normal((2, 1, 12, 16)).astype(np.float32)


def _files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


@pytest.mark.parametrize("fixture", ["tiny_2d", "tiny_3d"])
def test_onnx_segmenter_round_trip(request, fixture, tmp_path):
    model = request.getfixturevalue(fixture)
    seg = OnnxSegmenter(model, batch_size=3, tta="flips", overlap=0.25).fit()
    shape = (2, 1, 12, 16) if fixture == "tiny_2d" else (2, 1, 8, 8, 10)
    X = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    folder = uqseg.save(seg, tmp_path / "seg")
    assert _files(folder) == ["arrays.npz", "manifest.json", f"models/0/{Path(model).name}"]
    loaded = uqseg.load(folder)
    assert type(loaded) is OnnxSegmenter
    # the loaded model points at the copy, which is byte-identical to the original
    assert Path(loaded.model).parent == (folder / "models" / "0").resolve()
    assert Path(loaded.model).read_bytes() == Path(model).read_bytes()
    params = seg.get_params()
    params.pop("model")
    assert {k: v for k, v in loaded.get_params().items() if k != "model"} == params
    for attr in ("n_classes_", "input_shape_", "feature_layers_", "spatial_divisor_",
                 "input_name_", "mc_dropout_"):
        assert getattr(loaded, attr) == getattr(seg, attr)
    np.testing.assert_array_equal(loaded.transform(X), seg.transform(X))
    np.testing.assert_array_equal(loaded.predict(X), seg.predict(X))


def test_manifest_contents(tiny_mc, tmp_path):
    seg = OnnxSegmenter(Path(tiny_mc)).fit()
    folder = uqseg.save(seg, tmp_path / "s")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["format"] == persistence.FORMAT
    assert manifest["format_version"] == persistence.FORMAT_VERSION
    assert manifest["uqseg_version"] == uqseg.__version__
    root = manifest["root"]
    assert root["class"] == "uqseg.segmenter.OnnxSegmenter"
    assert set(root["params"]) == set(seg.get_params())
    assert set(root["fitted"]) == {k for k in vars(seg) if k.endswith("_")
                                   and not k.startswith("_")}
    assert set(manifest["files"]) == set(_files(folder)) - {"manifest.json"}
    loaded = uqseg.load(folder)
    assert isinstance(loaded.model, Path)  # a Path param comes back as a Path
    assert loaded.mc_dropout_ == seg.mc_dropout_
    X = np.ones((3, 1, 8, 8), np.float32)
    mask = np.random.default_rng(0).integers(0, 2, (3, 4)).astype(np.float32) * 2
    np.testing.assert_array_equal(loaded.run(X, layers=["auto"], mc_mask=mask)["bottleneck"],
                                  seg.run(X, layers=["auto"], mc_mask=mask)["bottleneck"])


def test_unfitted_round_trip(tiny_2d, tmp_path):
    loaded = uqseg.load(uqseg.save(OnnxSegmenter(tiny_2d, batch_size=5), tmp_path / "u"))
    assert loaded.batch_size == 5 and not hasattr(loaded, "n_classes_")


def test_nested_state_and_shared_objects(allow_standin, tiny_2d, tmp_path, X2):
    seg = OnnxSegmenter(tiny_2d).fit()
    est = StandIn(seg, scale=2.0, options={"a": [1, 2.5, None], "b": (True, "x")}).fit(None)
    folder = uqseg.save(est, tmp_path / "n")
    assert len(list((folder / "models").iterdir())) == 1  # one ONNX file, stored once
    loaded = uqseg.load(folder)
    assert loaded.segmenter_ is loaded.segmenter
    assert loaded.options == est.options and isinstance(loaded.options["b"], tuple)
    assert loaded.stats_[(1, 2)] == "tuple key" and loaded.stats_["n"] == 3
    np.testing.assert_array_equal(loaded.stats_["mean"], est.stats_["mean"])
    assert loaded.stats_["mean"].dtype == np.float32
    assert loaded.shape_ == (3, 4) and np.isnan(loaded.nan_) and loaded.inf_ == -np.inf
    assert type(loaded.offset_) is np.float16 and loaded.offset_ == est.offset_
    assert loaded.dtype_ == np.dtype("int16")
    assert loaded.rng_.random() == np.random.default_rng(7).random()
    assert not hasattr(loaded, "_cache")
    Z = np.random.default_rng(3).standard_normal((4, 2))
    np.testing.assert_array_equal(loaded.scaler_.transform(Z), est.scaler_.transform(Z))
    np.testing.assert_array_equal(loaded.predict(X2), est.predict(X2))


def test_sklearn_pipeline_and_skops(allow_standin, tiny_2d, tmp_path, X2):
    rng = np.random.default_rng(0)
    Z, t = rng.standard_normal((40, 3)), rng.integers(0, 2, 40)
    pipe = make_pipeline(StandardScaler(), LogisticRegression()).fit(Z, t)
    seg_pipe = Pipeline([("seg", OnnxSegmenter(tiny_2d).fit()), ("head", StandIn().fit(None))])
    folder = uqseg.save({"classifier": pipe, "segmentation": seg_pipe}, tmp_path / "p")
    # scaler, logistic regression, the stand-in's scaler_: skops; the rest field by field
    assert len(list((folder / "skops").iterdir())) == 3
    loaded = uqseg.load(folder)
    assert type(loaded["classifier"]) is Pipeline
    np.testing.assert_array_equal(loaded["classifier"].predict_proba(Z), pipe.predict_proba(Z))
    np.testing.assert_array_equal(loaded["segmentation"].predict(X2), seg_pipe.predict(X2))


def test_load_never_unpickles(allow_standin, tiny_2d, tmp_path, monkeypatch, X2):
    est = StandIn(OnnxSegmenter(tiny_2d).fit()).fit(None)
    folder = uqseg.save(est, tmp_path / "p")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    np.testing.assert_array_equal(uqseg.load(folder).predict(X2), est.predict(X2))


def test_copy_models_false_checks_sha(tiny_2d, tmp_path, X2):
    model = tmp_path / "m.onnx"
    shutil.copyfile(tiny_2d, model)
    seg = OnnxSegmenter(str(model)).fit()
    folder = uqseg.save(seg, tmp_path / "ref", copy_models=False)
    assert not (folder / "models").exists()
    with pytest.raises(ValueError, match="estimator.model: refers to a model outside.*opt in"):
        uqseg.load(folder)  # outside references are an explicit opt-in
    loaded = uqseg.load(folder, trusted_paths=[tmp_path])
    assert loaded.model == str(model.resolve())
    np.testing.assert_array_equal(loaded.predict(X2), seg.predict(X2))
    onnx.save(make_unet_like(dims=2, seed=99), str(model))
    with pytest.raises(ValueError, match=r"m\.onnx.*changed since it was saved"):
        uqseg.load(folder, trusted_paths=[tmp_path])
    model.unlink()
    with pytest.raises(FileNotFoundError, match=r"m\.onnx.*is missing"):
        uqseg.load(folder, trusted_paths=[tmp_path])


def _external_model(tmp_path) -> Path:
    src = tmp_path / "src"
    (src / "weights").mkdir(parents=True)
    onnx.save(make_unet_like(dims=2, seed=3), str(src / "ext.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="weights/ext.data", size_threshold=0)
    return src / "ext.onnx"


def test_external_data_is_copied(tmp_path):
    model = _external_model(tmp_path)
    seg = OnnxSegmenter(str(model)).fit()
    folder = uqseg.save(seg, tmp_path / "e")
    assert "models/0/weights/ext.data" in _files(folder)
    shutil.rmtree(model.parent)  # the loaded estimator depends only on the folder
    loaded = uqseg.load(folder)
    assert loaded.n_classes_ == seg.n_classes_
    want = {t.name: onnx.numpy_helper.to_array(t)
            for t in make_unet_like(dims=2, seed=3).graph.initializer}
    got = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(loaded.model).graph.initializer}
    assert want.keys() == got.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_external_data_model_predicts(tmp_path, X2):
    seg = OnnxSegmenter(str(_external_model(tmp_path))).fit()
    want = OnnxSegmenter(_save(tmp_path, make_unet_like(dims=2, seed=3))).fit().transform(X2)
    np.testing.assert_array_equal(seg.transform(X2), want)


def _save(folder, proto) -> str:
    path = folder / "plain.onnx"
    onnx.save(proto, str(path))
    return str(path)


@pytest.fixture
def saved(tiny_2d, tmp_path):
    return uqseg.save(OnnxSegmenter(tiny_2d).fit(), tmp_path / "saved")


def _edit_manifest(folder, edit):
    path = folder / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("rel", ["arrays.npz", "models/0/tiny_2d.onnx"])
def test_tampered_file_is_named(saved, rel):
    path = saved / rel
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{rel!r}.*does not match the sha256"):
        uqseg.load(saved)


def test_missing_file_is_named(saved):
    (saved / "arrays.npz").unlink()
    with pytest.raises(FileNotFoundError, match="'arrays.npz' listed in manifest.json is missing"):
        uqseg.load(saved)


def test_newer_and_unknown_format(saved):
    _edit_manifest(saved, lambda m: m.update(format_version=persistence.FORMAT_VERSION + 1))
    with pytest.raises(ValueError, match="newer than this uqseg.*upgrade uqseg"):
        uqseg.load(saved)
    _edit_manifest(saved, lambda m: m.update(format_version="1"))
    with pytest.raises(ValueError, match="invalid format_version '1'"):
        uqseg.load(saved)
    _edit_manifest(saved, lambda m: m.update(format="joblib"))
    with pytest.raises(ValueError, match="format 'joblib', expected 'uqseg-estimator'"):
        uqseg.load(saved)
    (saved / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        uqseg.load(saved)


@pytest.mark.parametrize("cls", ["uqseg_evil_module.Thing", "subprocess.Popen",
                                 "sklearn.preprocessing.StandardScaler", "uqseg.persistence.Path"])
def test_class_outside_allowlist_is_never_imported(saved, cls):
    _edit_manifest(saved, lambda m: m["root"].update({"class": cls}))
    with pytest.raises(ValueError, match="allowlist|not an estimator class|does not exist"):
        uqseg.load(saved)
    assert "uqseg_evil_module" not in sys.modules


def test_file_list_outside_folder(saved, tmp_path):
    (tmp_path / "outside.bin").write_bytes(b"x")
    _edit_manifest(saved, lambda m: m["files"].update({"../outside.bin": "0" * 64}))
    with pytest.raises(ValueError, match="'../outside.bin', which is outside the saved folder"):
        uqseg.load(saved)


def test_model_node_must_be_listed(saved):
    def edit(m):
        m["root"]["params"]["model"]["file"] = "../saved/manifest.json"
    _edit_manifest(saved, edit)
    with pytest.raises(ValueError, match="not in its file list"):
        uqseg.load(saved)


def test_skops_types_are_checked(tmp_path):
    folder = uqseg.save(make_pipeline(FunctionTransformer(os.getcwd)), tmp_path / "f")
    with pytest.raises(ValueError, match="outside the allowlist.*getcwd"):
        uqseg.load(folder)


def test_save_errors(tiny_2d, tmp_path, saved):
    seg = OnnxSegmenter(tiny_2d).fit()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        uqseg.save(seg, saved)
    assert uqseg.save(seg, saved, overwrite=True) == saved
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ValueError, match="not one"):
        uqseg.save(seg, other, overwrite=True)
    with pytest.raises(TypeError, match="path must be a folder path.*int"):
        uqseg.save(seg, 3)
    with pytest.raises(TypeError, match="copy_models must be True or False"):
        uqseg.save(seg, tmp_path / "x", copy_models="yes")
    with pytest.raises(TypeError, match=r"estimator\['f'\].*builtin_function_or_method"):
        uqseg.save({"f": len}, tmp_path / "y")
    with pytest.raises(TypeError, match="object arrays"):
        uqseg.save({"a": np.array([None])}, tmp_path / "z")
    with pytest.raises(TypeError, match="neither a uqseg nor a scikit-learn"):
        uqseg.save(StandIn(), tmp_path / "w")  # not on the allowlist without the fixture
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "saved"]  # no leftovers
    with pytest.raises(FileNotFoundError, match="not a folder"):
        uqseg.load(tmp_path / "nothing")
    with pytest.raises(ValueError, match="manifest.json is missing"):
        uqseg.load(other)


# ---------------------------------------------------------------------------- real estimators
@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((6, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 3, (6, 16, 16))
    return X, y


def _segmenters(obj, seen=None):
    """Every OnnxSegmenter reachable from obj (params, fitted attributes, lists, dicts)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, OnnxSegmenter):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _segmenters(v, seen)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _segmenters(v, seen)]
    if isinstance(obj, BaseEstimator):
        return _segmenters(vars(obj), seen)
    return []


def _round_trip(est, tmp_path):
    folder = uqseg.save(est, tmp_path / "rt")
    loaded = uqseg.load(folder)
    assert type(loaded) is type(est)
    segs = _segmenters(loaded)
    assert segs and len(segs) == len(_segmenters(est))
    for seg in segs:  # every ONNX path points into the saved folder
        assert Path(seg.model).is_relative_to(folder.resolve())
    return loaded


def test_ensemble_round_trip(tiny_members, tmp_path, data):
    X, _ = data
    ens = EnsembleSegmenter([tiny_members[0], OnnxSegmenter(tiny_members[1]), tiny_members[2]],
                            tta="flips", weights=[1.0, 2.0, 1.0]).fit()
    loaded = _round_trip(ens, tmp_path)
    assert len(list((tmp_path / "rt" / "models").iterdir())) == 3
    np.testing.assert_array_equal(loaded.predict_proba(X), ens.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict_members(X), ens.predict_members(X))
    np.testing.assert_array_equal(loaded.uncertainty(X, kind="mutual_information"),
                                  ens.uncertainty(X, kind="mutual_information"))


def test_mc_ensemble_round_trip(tiny_mc, tmp_path, data):
    X, _ = data
    ens = EnsembleSegmenter([tiny_mc], mc_samples=4, seed=3).fit()
    loaded = _round_trip(ens, tmp_path)
    np.testing.assert_array_equal(loaded.predict_proba(X), ens.predict_proba(X))


def test_calibrator_round_trips(tiny_2d, tiny_members, tmp_path, data):
    from uqseg import TemperatureCalibrator

    X, y = data
    cal = TemperatureCalibrator(OnnxSegmenter(tiny_2d).fit(), mode="classwise").fit(X, y)
    loaded = _round_trip(cal, tmp_path / "a")
    np.testing.assert_array_equal(loaded.temperature_, cal.temperature_)
    np.testing.assert_array_equal(loaded.predict_proba(X), cal.predict_proba(X))
    pipe = make_pipeline(EnsembleSegmenter(tiny_members), TemperatureCalibrator()).fit(X, y)
    loaded = _round_trip(pipe, tmp_path / "b")
    np.testing.assert_array_equal(loaded.predict_proba(X), pipe.predict_proba(X))
    np.testing.assert_array_equal(loaded.predict(X), pipe.predict(X))


@pytest.mark.parametrize("name", ["SpectralOODDetector", "UncertaintyOODDetector",
                                  "MahalanobisOODDetector", "KNNOODDetector"])
def test_ood_round_trip(name, tiny_2d, tmp_path, data):
    from uqseg import ood

    X, _ = data
    det = getattr(ood, name)(OnnxSegmenter(tiny_2d).fit()).fit(X)
    loaded = _round_trip(det, tmp_path)
    X_test = X[::-1] * 1.5
    np.testing.assert_array_equal(loaded.score_samples(X_test), det.score_samples(X_test))
    np.testing.assert_array_equal(loaded.predict(X_test), det.predict(X_test))
    assert loaded.offset_ == det.offset_


@pytest.mark.parametrize("regressor", [None, "ridge"])
def test_quality_round_trip(regressor, tiny_members, tmp_path, data):
    from sklearn.linear_model import Ridge

    from uqseg import QualityRegressor

    X, _ = data
    ens = EnsembleSegmenter(tiny_members).fit()
    y = ens.predict(X)
    y[:, :5] = 0  # imperfect: a spread of Dice to regress
    qr = QualityRegressor(ens, regressor=Ridge() if regressor else None).fit(X, y)
    loaded = _round_trip(qr, tmp_path)
    if qr.estimator_ is qr.estimator:  # a shared object is restored as one object
        assert loaded.estimator_ is loaded.estimator
    np.testing.assert_array_equal(loaded.predict(X), qr.predict(X))
    np.testing.assert_array_equal(loaded.flag(X, min_dice=0.5), qr.flag(X, min_dice=0.5))
