"""uqseg.load on hostile folders: each one is a real saved folder whose manifest (and, where an
attacker would, arrays.npz with its recorded hash) was edited.

Reads outside the folder are detected with an audit hook (``sys.addaudithook``): every
Python-level ``open`` (builtins, io, os.open, pathlib, zipfile, numpy, onnx, skops) raises the
"open" audit event with its path, so a test records what a load opens and asserts that nothing
under the "outside" folders (the original models, planted files) is among it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import FunctionTransformer
from sklearn.utils import check_array

import uqseg
from uqseg import (
    ConformalRiskController,
    EnsembleSegmenter,
    OnnxSegmenter,
    QualityRegressor,
    SpectralOODDetector,
    TemperatureCalibrator,
    _restore,
    persistence,
)

_OPENED: list[str] | None = None


def _audit(event, args):
    if _OPENED is not None and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(os.path.realpath(os.fsdecode(args[0])))


sys.addaudithook(_audit)


class opened:
    """Context manager: the real paths opened inside it."""

    def __enter__(self):
        global _OPENED
        _OPENED = []
        return _OPENED

    def __exit__(self, *exc):
        global _OPENED
        _OPENED = None


def _inside(path: str, root: Path) -> bool:
    return os.path.commonpath([path, os.path.realpath(root)]) == os.path.realpath(root)


# ---------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(5)
    return (rng.standard_normal((6, 1, 16, 16)).astype(np.float32),
            rng.integers(0, 3, (6, 16, 16)))


@pytest.fixture(scope="module")
def logits():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((4, 3, 8, 8)).astype(np.float32) * 3
    return z, rng.integers(0, 3, (4, 8, 8))


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_2d, tiny_members, data, logits):
    """One real fitted estimator of each kind, saved once; tests edit copies."""
    X, y = data
    z, yz = logits
    ens = EnsembleSegmenter(tiny_members[:2]).fit()
    yq = ens.predict(X)
    yq[:, :5] = 0
    ests = {
        "cal": TemperatureCalibrator().fit(z, yz),
        "calcw": TemperatureCalibrator(mode="classwise").fit(z, yz),
        "pipe": make_pipeline(EnsembleSegmenter(tiny_members[:2]), TemperatureCalibrator())
        .fit(X, y),
        "seg": OnnxSegmenter(tiny_2d).fit(),
        "ood": SpectralOODDetector(OnnxSegmenter(tiny_2d).fit()).fit(X),
        "qr": QualityRegressor(ens, regressor=Ridge()).fit(X, yq),
        "crc": ConformalRiskController(OnnxSegmenter(tiny_2d).fit(), alpha=0.3,
                                       n_bins=50).fit(X, y),
    }
    root = tmp_path_factory.mktemp("originals")
    return {k: (v, uqseg.save(v, root / k)) for k, v in ests.items()}


@pytest.fixture
def folder(originals, tmp_path, request):
    """A fresh copy of the saved folder named by the test's ``kind`` parameter."""
    import shutil

    kind = request.param
    dst = tmp_path / "saved" / kind
    shutil.copytree(originals[kind][1], dst)
    return dst


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _write(folder: Path, manifest: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit(folder: Path, edit) -> None:
    m = _manifest(folder)
    edit(m)
    _write(folder, m)


def _node(m: dict, path: str):
    """The manifest node at a dotted path of params/fitted names and [i] list indices."""
    node = m["root"]
    for part in path.split("."):
        name, *idx = part.replace("]", "").split("[")
        if name:
            if node.get("__uqseg__") == "estimator":
                node = node["params"][name] if name in node["params"] else node["fitted"][name]
            else:
                node = node[name]
        for i in idx:
            node = node["items"][int(i)] if isinstance(node, dict) else node[int(i)]
    return node


def _set(folder: Path, path: str, value) -> None:
    """Replace the value at ``path`` (``steps[1][1].temperature_``) in the manifest."""
    m = _manifest(folder)
    parent_path, _, leaf = path.rpartition(".")
    parent = _node(m, parent_path) if parent_path else m["root"]
    slot = parent["params"] if leaf in parent["params"] else parent["fitted"]
    slot[leaf] = value
    _write(folder, m)


def _set_array(folder: Path, path: str, arr: np.ndarray) -> None:
    """Replace an array in arrays.npz and its recorded hash, as an attacker can."""
    key = _node(_manifest(folder), path)["key"]
    with np.load(folder / "arrays.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays[key] = arr
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (folder / "arrays.npz").write_bytes(buf.getvalue())
    _edit(folder, lambda m: m["files"].update(
        {"arrays.npz": hashlib.sha256(buf.getvalue()).hexdigest()}))


def _get_array(folder: Path, path: str) -> np.ndarray:
    key = _node(_manifest(folder), path)["key"]
    with np.load(folder / "arrays.npz") as f:
        return f[key]


def _refused(folder: Path, key: str, exc=(ValueError, TypeError), **kwargs):
    """Load fails with ``exc`` and a message starting with the key path; a parameter checked
    by the estimator's own validation is named by the estimator's path and its name."""
    with pytest.raises(exc) as info:
        uqseg.load(folder, **kwargs)
    msg = str(info.value)
    parent, _, leaf = key.rpartition(".")
    assert msg.startswith(key) or (msg.startswith(f"{parent}: ") and leaf in msg), msg
    return msg


NAN = {"__uqseg__": "float", "value": "nan"}
INF = {"__uqseg__": "float", "value": "inf"}


# ---------------------------------------------------------------------------- classes
NOT_ALLOWED = ["subprocess.Popen", "os.system", "joblib.Memory", "joblib.memory.Memory",
               "sklearn.preprocessing.StandardScaler", "sklearn.pipeline.FeatureUnion",
               "uqseg.ood._BaseOODDetector", "uqseg.segmenter.OnnxSegmenterX",
               "uqsegx.segmenter.OnnxSegmenter", "http.server.HTTPServer",
               "xml.dom.minidom.Document", "uqseg.persistence.Path", "", 3, None]


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
@pytest.mark.parametrize("cls", NOT_ALLOWED)
def test_class_outside_exact_allowlist_is_refused(folder, cls):
    _edit(folder, lambda m: m["root"].update({"class": cls}))
    _refused(folder, "estimator: the manifest names class", ValueError)


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
def test_refused_class_module_is_never_imported(folder):
    """In a fresh interpreter (no test has imported them): real, importable modules named in
    a manifest stay unimported after the refusal."""
    code = f"""
import json, sys
import uqseg
path = {str(folder)!r}
mods = ("http.server", "xml.dom.minidom")
assert not any(m in sys.modules for m in mods), [m for m in mods if m in sys.modules]
for cls in ("http.server.HTTPServer", "xml.dom.minidom.Document"):
    m = json.load(open(path + "/manifest.json"))
    m["root"]["class"] = cls
    json.dump(m, open(path + "/manifest.json", "w"))
    try:
        uqseg.load(path)
    except ValueError as exc:
        assert "not on the allowlist" in str(exc), exc
    else:
        raise SystemExit("loaded " + cls)
print(sorted(m for m in mods if m in sys.modules))
"""
    env = {**os.environ, "PYTHONPATH": str(Path(uqseg.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_public_estimator_has_restore_checks():
    for name in uqseg.__all__:
        obj = getattr(uqseg, name)
        if isinstance(obj, type):
            assert f"{obj.__module__}.{obj.__qualname__}" in _restore.CHECKS, name


def test_skops_allowlist_is_exact(tmp_path):
    # check_array lives under "sklearn": a prefix allowlist let it through
    folder = uqseg.save({"f": make_pipeline(FunctionTransformer(check_array))}, tmp_path / "f")
    _refused(folder, "estimator['f']", ValueError)
    with pytest.raises(ValueError, match=r"sklearn\.utils\.validation\.check_array"):
        uqseg.load(folder)


# ---------------------------------------------------------------------------- side effects
@pytest.mark.parametrize("folder", ["pipe"], indirect=True)
def test_pipeline_memory_is_refused_and_planted_pickle_never_read(folder, tmp_path, monkeypatch,
                                                                  data):
    cache = tmp_path / "attacker_cache"
    (cache / "joblib").mkdir(parents=True)
    planted = cache / "joblib" / "output.pkl"
    planted.write_bytes(pickle.dumps({"planted": True}))
    _set(folder, "memory", str(cache))

    def refuse(*args, **kwargs):
        raise AssertionError("unpickled")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    with opened() as seen:
        msg = _refused(folder, "estimator.memory", ValueError)
    assert "must be None" in msg
    assert not [p for p in seen if _inside(p, cache)]
    # a Pipeline with a cache cannot be saved either (so no genuine folder holds one)
    pipe = Pipeline([("cal", TemperatureCalibrator())], memory=str(cache))
    with pytest.raises(ValueError, match=r"estimator\.memory"):
        uqseg.save(pipe, tmp_path / "m")


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
@pytest.mark.parametrize("threads", [10**6, 0, -5, "all", 2.0])
def test_thread_counts_are_bounded(folder, threads):
    _set(folder, "threads", threads)
    _refused(folder, "estimator.threads")


def test_skops_n_jobs_and_memory_are_refused(tmp_path):
    folder = uqseg.save({"r": LinearRegression(n_jobs=10**5)}, tmp_path / "r")
    _refused(folder, "estimator['r'].n_jobs", ValueError)
    ok = uqseg.save({"r": LinearRegression(n_jobs=-1)}, tmp_path / "ok")
    assert uqseg.load(ok)["r"].n_jobs == -1


# ---------------------------------------------------------------------------- outside files
@pytest.fixture
def outside(tmp_path, tiny_2d):
    """A folder outside the saved one holding a real model and a secret."""
    out = tmp_path / "outside"
    out.mkdir()
    (out / "model.onnx").write_bytes(Path(tiny_2d).read_bytes())
    (out / "secret.txt").write_text("secret")
    return out


def _ref(path: Path, sha: str | None = None) -> dict:
    sha = sha or hashlib.sha256(path.read_bytes()).hexdigest()
    return {"__uqseg__": "model", "ref": str(path), "sha256": sha, "type": "str"}


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
@pytest.mark.parametrize("value", ["model", "secret", "path-node", "missing"])
def test_plain_paths_are_never_opened(folder, outside, tiny_2d, value):
    target = {"model": outside / "model.onnx", "secret": outside / "secret.txt",
              "missing": outside / "nothing.onnx"}.get(value, outside / "model.onnx")
    node = {"__uqseg__": "path", "value": str(target)} if value == "path-node" else str(target)
    _set(folder, "model", node)
    with opened() as seen:
        msg = _refused(folder, "estimator.model", TypeError)
    assert "a path is only read from the folder's model list" in msg
    assert not [p for p in seen if _inside(p, outside) or _inside(p, Path(tiny_2d).parent)]


@pytest.mark.parametrize("folder", ["pipe"], indirect=True)
def test_plain_path_member_is_refused(folder, outside):
    _set(folder, "steps[0][1].members", [str(outside / "model.onnx")])
    _refused(folder, "estimator.steps[0][1].members[0]", TypeError)


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
def test_reference_outside_refused_by_default_and_reveals_nothing(folder, outside):
    model = outside / "model.onnx"
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    size = model.stat().st_size
    msgs = []
    for target, sha in ((model, None), (outside / "nothing.onnx", digest),
                        (model, "0" * 64)):
        _set(folder, "model", _ref(target, sha or digest))
        with opened() as seen:
            msgs.append(_refused(folder, "estimator.model", ValueError))
        assert not [p for p in seen if _inside(p, outside)]
    for msg in msgs:
        text = msg.replace(str(outside), "<outside>")
        assert "trusted_paths" in text
        assert all(digest[i:i + 8] not in text for i in range(0, 64, 4))
        assert str(size) not in text
    # an existing and a missing file give the same message, hashes right or wrong
    assert msgs[0] == msgs[2] == msgs[1].replace("nothing.onnx", "model.onnx")


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
def test_reference_accepted_only_under_trusted_paths(folder, outside, tmp_path, data):
    X, _ = data
    model = outside / "model.onnx"
    _set(folder, "model", _ref(model))
    loaded = uqseg.load(folder, trusted_paths=[outside])
    assert loaded.model == str(model.resolve())
    np.testing.assert_array_equal(loaded.predict(X), OnnxSegmenter(str(model)).fit().predict(X))
    other = tmp_path / "other"
    other.mkdir()
    _refused(folder, "estimator.model", ValueError, trusted_paths=[other])
    # ".." and links out of a trusted folder do not count as under it
    _set(folder, "model", _ref(other / ".." / "outside" / "model.onnx"))
    _refused(folder, "estimator.model", ValueError, trusted_paths=[other])
    (other / "link.onnx").symlink_to(model)
    _set(folder, "model", _ref(other / "link.onnx", hashlib.sha256(
        model.read_bytes()).hexdigest()))
    _refused(folder, "estimator.model", ValueError, trusted_paths=[other])
    # still sha256-checked under a trusted path, and the message holds no hash
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    _set(folder, "model", _ref(model, "f" * 64))
    msg = _refused(folder, "estimator.model", ValueError, trusted_paths=[outside])
    assert "changed since it was saved" in msg and digest[:8] not in msg and "ffff" not in msg
    with pytest.raises(TypeError, match="trusted_paths must be None or a list"):
        uqseg.load(folder, trusted_paths=str(outside))


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
def test_listed_file_linking_outside_is_refused(folder, outside):
    rel = next(r for r in _manifest(folder)["files"] if r.endswith(".onnx"))
    (folder / rel).unlink()
    (folder / rel).symlink_to(outside / "model.onnx")
    with opened() as seen, pytest.raises(ValueError, match="outside the saved folder"):
        uqseg.load(folder)
    assert not [p for p in seen if _inside(p, outside)]


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
def test_unlisted_external_data_is_refused(folder):
    import onnx

    rel = next(r for r in _manifest(folder)["files"] if r.endswith(".onnx"))
    proto = onnx.load(str(folder / rel))
    onnx.save(proto, str(folder / rel), save_as_external_data=True, location="w.bin",
              size_threshold=0)
    sha = hashlib.sha256((folder / rel).read_bytes()).hexdigest()
    _edit(folder, lambda m: m["files"].update({rel: sha}))
    _refused(folder, "estimator.model", ValueError)


# ---------------------------------------------------------------------------- fitted state
CAL_EDITS = [
    ("temperature_", -1.0), ("temperature_", 0.0), ("temperature_", NAN), ("temperature_", INF),
    ("temperature_", "1.5"), ("temperature_", [1.0, 2.0]), ("temperature_", 1e9),
    ("temperature_", True), ("n_classes_", 2.5), ("n_classes_", 4), ("n_classes_", -3),
    ("n_voxels_fit_", 7), ("n_voxels_sampled_", "x"), ("nll_after_", NAN), ("ece_before_", 2.0),
    ("n_iter_", None), ("estimator_", "/etc/passwd"), ("sample_", None),
]


@pytest.mark.parametrize("folder", ["cal"], indirect=True)
@pytest.mark.parametrize(("key", "value"), CAL_EDITS)
def test_calibrator_state_is_checked(folder, key, value):
    _set(folder, key, value)
    _refused(folder, f"estimator.{key}")


@pytest.mark.parametrize("folder", ["calcw"], indirect=True)
@pytest.mark.parametrize(("name", "make"), [
    ("temperature_", lambda a: -a), ("temperature_", lambda a: a[:2]),
    ("temperature_", lambda a: a.astype(str)), ("temperature_", lambda a: a * np.nan),
    ("sample_['scores']", lambda a: a[:, :-1]), ("sample_['labels']", lambda a: a + 7),
    ("sample_['strata']", lambda a: (a + 9) % a.max()), ("sample_['keys']", lambda a: a + 2),
    ("sample_['counts']", lambda a: a * 0),
])
def test_calibrator_arrays_are_checked(folder, name, make):
    m = _manifest(folder)
    node = m["root"]["fitted"][name.split("[")[0]]
    if "[" in name:  # a dict entry of sample_
        want = name.split("'")[1]
        node = next(v for k, v in node["items"] if k == want)
    with np.load(folder / "arrays.npz") as f:
        arr = f[node["key"]]
    path = "temperature_" if "[" not in name else None
    if path:
        _set_array(folder, path, make(arr))
    else:
        with np.load(folder / "arrays.npz") as f:
            arrays = {k: f[k] for k in f.files}
        arrays[node["key"]] = make(arr)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        (folder / "arrays.npz").write_bytes(buf.getvalue())
        _edit(folder, lambda m: m["files"].update(
            {"arrays.npz": hashlib.sha256(buf.getvalue()).hexdigest()}))
    _refused(folder, "estimator." + ("sample_" if "[" in name else name))


@pytest.mark.parametrize("folder", ["pipe"], indirect=True)
@pytest.mark.parametrize(("key", "value"), [
    ("steps[1][1].temperature_", -1.0), ("steps[1][1].temperature_", 0.0),
    ("steps[1][1].n_classes_", 5), ("steps[0][1].n_samples_", 7),
    ("steps[0][1].fused_", False), ("steps[0][1].n_classes_", 4),
    ("steps[0][1].members_", ["/etc/passwd"]), ("steps[0][1].spatial_divisor_", 3),
    ("steps[0][1].members_[0].input_name_", "other"),
    ("steps[0][1].members_[0].n_classes_", 7), ("steps[0][1].members_[0].device_", "gpu"),
    ("steps[0][1].cache_size", -1), ("steps[0][1].weights", [1.0, -1.0]),
    ("steps[0][1].tta", "rotations"), ("steps[1][1].mode", "local-ish"),
    ("steps[1][1].eps", NAN),
])
def test_pipeline_state_is_checked(folder, key, value):
    _set(folder, key, value)
    _refused(folder, f"estimator.{key}")


@pytest.mark.parametrize("folder", ["crc"], indirect=True)
@pytest.mark.parametrize(("key", "value"), [
    ("alpha", 0.5), ("alpha", 1.5), ("risk", "dice"), ("n_bins", 40), ("classes", [7]),
    ("n_classes_", 4), ("target_kind_", "indicator"), ("method_", "ltt"), ("n_images_", 9),
    ("set_error_", "no sets"), ("estimator_", None), ("estimator", "/etc/passwd"),
])
def test_conformal_state_is_checked(folder, key, value):
    """Every learned attribute is recomputed from the saved statistics (a changed alpha or
    risk no longer matches the thresholds); bad parameters and state are refused."""
    _set(folder, key, value)
    _refused(folder, f"estimator.{key}" if key.endswith("_") or key == "estimator"
             else "estimator")


@pytest.mark.parametrize("folder", ["crc"], indirect=True)
@pytest.mark.parametrize(("path", "make"), [
    ("threshold_index_", lambda a: a + 1), ("lambda_", lambda a: a * 0),
    ("empirical_risk_", lambda a: a + 0.01),
])
def test_conformal_thresholds_must_follow_from_the_statistics(folder, path, make):
    _set_array(folder, path, make(_get_array(folder, path)))
    _refused(folder, f"estimator.{path}")


@pytest.mark.parametrize("folder", ["crc"], indirect=True)
@pytest.mark.parametrize(("entry", "make"), [
    ("true", lambda a: a * 2 + 1), ("all", lambda a: -a), ("n_voxels", lambda a: a[:-1]),
    ("set_all", lambda a: a[:, :, :-1]), ("true", lambda a: a.astype(np.float64)),
])
def test_conformal_statistics_are_checked(folder, entry, make):
    m = _manifest(folder)
    node = next(v for k, v in m["root"]["fitted"]["stats_"]["items"] if k == entry)
    with np.load(folder / "arrays.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays[node["key"]] = make(arrays[node["key"]])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (folder / "arrays.npz").write_bytes(buf.getvalue())
    _edit(folder, lambda m: m["files"].update(
        {"arrays.npz": hashlib.sha256(buf.getvalue()).hexdigest()}))
    _refused(folder, "estimator.stats_")


@pytest.mark.parametrize("folder", ["crc"], indirect=True)
def test_conformal_round_trip(folder, originals, data):
    back = uqseg.load(folder)
    np.testing.assert_array_equal(back.predict(data[0]), originals["crc"][0].predict(data[0]))


@pytest.mark.parametrize("folder", ["pipe"], indirect=True)
def test_ensemble_arrays_are_checked(folder):
    w = _get_array(folder, "steps[0][1].weights_")
    _set_array(folder, "steps[0][1].weights_", w[::-1] * 2)
    _refused(folder, "estimator.steps[0][1].weights_")


@pytest.mark.parametrize("folder", ["ood"], indirect=True)
@pytest.mark.parametrize(("key", "value"), [
    ("offset_", 1e6), ("offset_", NAN), ("threshold_", "x"), ("n_train_", 60),
    ("layers_", ["dec2"]), ("layers_", []), ("descriptors_[0].layers_", ["dec2"]),
    ("descriptors_[0].layers_", []),
    ("descriptors_[1].layers_", ["bottleneck"]), ("descriptors_", []),
    ("estimator_", None), ("contamination", 0.9), ("n_folds", 1), ("combine", "sum"),
    ("descriptors", [1]), ("descriptors", "spectrum"),
])
def test_ood_state_is_checked(folder, key, value):
    _set(folder, key, value)
    _refused(folder, f"estimator.{key}")


@pytest.mark.parametrize("folder", ["ood"], indirect=True)
@pytest.mark.parametrize(("key", "make"), [
    ("descriptors_[0].features_", lambda a: a[:, :-3]),
    ("descriptors_[0].features_", lambda a: np.full_like(a, np.inf)),
    ("descriptors_[0].features_", lambda a: a.astype(np.int64)),
    ("descriptors_[0].features_", lambda a: a[0]),
    ("descriptors_[1].features_", lambda a: a[:-1]),
    ("descriptors_[1].features_", lambda a: a * 1.5),
    ("train_scores_", lambda a: -a), ("dist_stats_", lambda a: a * 2),
    ("descriptors_[1].components_", lambda a: a[:-1]),
    ("descriptors_[1].components_", lambda a: a * 1.01),
    ("descriptors_[1].scale_", lambda a: a * 0), ("descriptors_[1].mean_", lambda a: a + 1),
])
def test_ood_arrays_are_checked(folder, key, make):
    _set_array(folder, key, make(_get_array(folder, key)))
    _refused(folder, "estimator.")


@pytest.mark.parametrize("folder", ["ood"], indirect=True)
@pytest.mark.parametrize("name", ["uqseg.ood._descriptors.Spectrum", "uqseg.ood.Descriptor",
                                  "uqseg.ood._descriptors._Descriptor", "uqseg.ood.SpectrumX",
                                  "sklearn.preprocessing.StandardScaler", "os.system"])
def test_descriptor_classes_are_allowlisted(folder, name):
    _edit(folder, lambda m: _node(m, "descriptors_[0]").update({"class": name}))
    msg = _refused(folder, "estimator.descriptors_[0]", ValueError)
    assert "not on the allowlist" in msg


@pytest.mark.parametrize("folder", ["ood"], indirect=True)
def test_descriptors_must_be_descriptors(folder):
    """An allowlisted class that is not a descriptor (the detector's own network) is refused
    in the descriptor list and among the fitted descriptors; so is a Layout in a Spectrum's
    place."""
    def network_as_descriptor(m):
        node = json.loads(json.dumps(m["root"]["params"]["estimator"]))
        node["id"] = 99
        m["root"]["params"]["descriptors"] = [node]

    _edit(folder, network_as_descriptor)
    _refused(folder, "estimator.descriptors[0]", TypeError)
    _edit(folder, lambda m: m["root"]["params"].update(descriptors=None))
    _edit(folder, lambda m: _node(m, "descriptors_").reverse())
    assert "not a fitted copy" in _refused(folder, "estimator.descriptors_[0]", ValueError)
    _edit(folder, lambda m: _node(m, "descriptors_").reverse())

    def param_is_the_fitted_one(m):  # the fitted copy made the parameter itself
        m["root"]["params"]["descriptors"] = [_node(m, "descriptors_[0]"),
                                              _node(m, "descriptors_[1]")]
        m["root"]["fitted"]["descriptors_"] = [
            {"__uqseg__": "ref", "id": n["id"]} for n in m["root"]["params"]["descriptors"]]

    _edit(folder, param_is_the_fitted_one)
    assert "itself" in _refused(folder, "estimator.descriptors_[0]", ValueError)


@pytest.mark.parametrize("folder", ["qr"], indirect=True)
@pytest.mark.parametrize(("key", "value"), [
    ("n_classes_", 4), ("feature_names_", ["a"]), ("regressor_", "/tmp/x.onnx"),
    ("input_kind_", "pickle"), ("uncertainty_kind_", "entropy"), ("typicality_", "yes"),
    ("atlas_", True), ("fit_report_", {"__uqseg__": "dict", "items": []}),
    ("typicality_layer_", "bottleneck"), ("empty_score", 2.0), ("reference", "/etc/passwd"),
])
def test_quality_state_is_checked(folder, key, value):
    _set(folder, key, value)
    _refused(folder, f"estimator.{key}")


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
@pytest.mark.parametrize("key", ["_runners", "__class__", "_fused_stats", "Model_", "x y_"])
def test_private_or_odd_fitted_names_are_refused(folder, key):
    _edit(folder, lambda m: m["root"]["fitted"].update({key: 1}))
    _refused(folder, "estimator.", ValueError)


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
def test_unknown_parameter_and_attribute_are_refused(folder):
    _edit(folder, lambda m: m["root"]["params"].update({"cache_dir": "/tmp"}))
    _refused(folder, "estimator.cache_dir", ValueError)
    _edit(folder, lambda m: (m["root"]["params"].pop("cache_dir"),
                             m["root"]["fitted"].update({"extra_": 1})))
    _refused(folder, "estimator.extra_", ValueError)


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
def test_cycles_and_bad_refs_are_refused(folder):
    _edit(folder, lambda m: m["root"]["fitted"].update(
        {"n_classes_": {"__uqseg__": "ref", "id": m["root"]["id"]}}))
    _refused(folder, "estimator.n_classes_", ValueError)
    for bad in ({"__uqseg__": "ref", "id": "0"}, {"__uqseg__": "ref"},
                {"__uqseg__": "ndarray", "key": "nope"}, {"__uqseg__": "ndarray"},
                {"__uqseg__": "dtype", "value": "O"}, {"__uqseg__": "float", "value": "1e999"},
                {"__uqseg__": "generator", "state": {"__uqseg__": "dict", "items": []}},
                {"__uqseg__": "dict", "items": [[1]]}, {"__uqseg__": "tuple"},
                {"__uqseg__": "evil"}, {"no": "tag"}):
        _edit(folder, lambda m, bad=bad: m["root"]["fitted"].update({"n_classes_": bad}))
        _refused(folder, "estimator.n_classes_", ValueError)


# ---------------------------------------------------------------------------- JSON
@pytest.mark.parametrize("folder", ["seg"], indirect=True)
@pytest.mark.parametrize("depth", [150, 100_000])
def test_deep_nesting_is_a_clean_error(folder, depth):
    text = (folder / "manifest.json").read_text()
    deep = "[" * depth + "]" * depth
    (folder / "manifest.json").write_text(text.replace('"fitted": {', f'"deep_": {deep}, '
                                                       '"fitted": {', 1))
    with pytest.raises(ValueError, match="nests deeper than"):
        uqseg.load(folder)


@pytest.mark.parametrize("folder", ["seg"], indirect=True)
def test_nan_literal_is_refused(folder):
    text = (folder / "manifest.json").read_text().replace('"overlap": 0.5', '"overlap": NaN')
    (folder / "manifest.json").write_text(text)
    with pytest.raises(ValueError, match="non-standard JSON literal NaN"):
        uqseg.load(folder)


# ---------------------------------------------------------------------------- properties
def _paths(node, prefix=()):
    """Every (container, key) slot of a manifest tree, for random edits."""
    out = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((node, k))
            out += _paths(v)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((node, i))
            out += _paths(v)
    return out


def _values(outside: Path, sha: str):
    leaf = st.one_of(
        st.none(), st.booleans(), st.integers(-10**6, 10**6), st.sampled_from([2**70, -1, 0]),
        st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=8),
        st.sampled_from([str(outside / "model.onnx"), str(outside / "secret.txt"),
                         "../outside/model.onnx", "models/0/tiny_2d.onnx", "passthrough"]),
        st.sampled_from([
            NAN, INF, {"__uqseg__": "path", "value": str(outside / "model.onnx")},
            {"__uqseg__": "model", "ref": str(outside / "model.onnx"), "sha256": sha},
            {"__uqseg__": "model", "file": "../outside/model.onnx"},
            {"__uqseg__": "ref", "id": 0}, {"__uqseg__": "ref", "id": 99},
            {"__uqseg__": "estimator", "class": "subprocess.Popen", "id": 50, "params": {},
             "fitted": {}},
            {"__uqseg__": "ndarray", "key": "a0"}, {"__uqseg__": "npscalar", "key": "a0"},
            {"__uqseg__": "tuple", "items": [1, 2]}, {"__uqseg__": "dtype", "value": "f8"},
            json.loads("[" * 80 + "]" * 80),
        ]))
    return st.recursive(leaf, lambda c: st.lists(c, max_size=3) | st.dictionaries(
        st.sampled_from(["__uqseg__", "items", "key", "value", "x"]), c, max_size=3),
        max_leaves=6)


def _property(originals, kind, tmp_path, outside, draw_edit, X, check):
    import shutil

    est, src = originals[kind]
    sha = hashlib.sha256((outside / "model.onnx").read_bytes()).hexdigest()
    folder = tmp_path / "f"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(src, folder)
    m = _manifest(folder)
    slots = _paths(m["root"])
    i, action, value = draw_edit(len(slots), _values(outside, sha))
    container, key = slots[i % len(slots)]
    if action == "delete" and isinstance(container, dict):
        del container[key]
    elif action == "add" and isinstance(container, dict):
        container[f"{key}_x_"] = value
    else:
        container[key] = value
    _write(folder, m)
    with opened() as seen:
        try:
            loaded = uqseg.load(folder)
        except (ValueError, TypeError) as exc:
            assert str(exc).startswith(("estimator", "manifest.json")), str(exc)
            loaded = None
    event("refused" if loaded is None else "loaded")
    assert not [p for p in seen if _inside(p, outside)], seen
    if loaded is not None:  # a legitimate estimator: works now, not later
        check(loaded, est, X)


def _same_shape_proba(loaded, est, X):
    if not hasattr(loaded, "predict_proba"):  # e.g. a Pipeline whose last step became
        return  # "passthrough": a different, valid pipeline without that method
    try:
        got, want = loaded.predict_proba(X), est.predict_proba(X)
    except NotFittedError:  # the edit emptied the fitted state: a valid unfitted estimator
        return
    except ValueError as exc:  # the one parameter that redefines the accepted input
        assert "input_kind" in str(exc) and loaded.get_params().get(
            "input_kind", "?") != est.get_params().get("input_kind", "?"), exc
        return
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.isfinite(got).all() and np.allclose(got.sum(axis=1), 1, atol=1e-4)
    assert loaded.predict(X).shape == est.predict(X).shape


_EDIT = st.tuples(st.integers(0, 10**6), st.sampled_from(["set", "set", "delete", "add"]))


@settings(max_examples=100, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_property_calibrator_manifest_edits(originals, tmp_path, outside, logits, data):
    def draw(n, values):
        i, action = data.draw(_EDIT)
        return i, action, data.draw(values)

    _property(originals, "calcw", tmp_path, outside, draw, logits[0], _same_shape_proba)


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_property_pipeline_manifest_edits(originals, tmp_path, outside, data):
    X = np.random.default_rng(2).standard_normal((2, 1, 16, 16)).astype(np.float32)

    def draw(n, values):
        i, action = data.draw(_EDIT)
        return i, action, data.draw(values)

    _property(originals, "pipe", tmp_path, outside, draw, X, _same_shape_proba)


def test_unedited_folders_load_identically(originals, data, logits):
    X, _ = data
    for kind, (est, folder) in originals.items():
        with opened() as seen:
            loaded = uqseg.load(folder)
        assert all(not p.endswith(".onnx") or _inside(p, folder) for p in seen), kind
        inp = logits[0] if kind.startswith("cal") else X
        method = {"ood": "score_samples", "qr": "predict", "seg": "transform",
                  "crc": "predict"}.get(
            kind, "predict_proba")
        np.testing.assert_array_equal(getattr(loaded, method)(inp), getattr(est, method)(inp))
    assert persistence.MAX_DEPTH >= 50
