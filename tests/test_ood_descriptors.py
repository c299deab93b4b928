"""SpectralOODDetector's descriptor objects (Spectrum, Layout): the same numbers as the
implementation before them, nested parameters, the deprecated keywords, and folders saved by
that implementation.

``tests/data/spectral_v1`` was written by the previous implementation (one class with sixteen
keywords, before descriptor objects): ``scores.npz`` holds its scores on the images below, and
``default``/``spectrum`` are ``uqseg.save`` folders of its fitted detectors.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.base import clone
from test_ood import blobs, xfit_kth

import uqseg
from uqseg.ood import Layout, SpectralOODDetector, Spectrum

V1 = Path(__file__).parent / "data" / "spectral_v1"


@pytest.fixture(scope="module")
def pins():
    with np.load(V1 / "scores.npz") as f:
        return {k: f[k] for k in f.files}


@pytest.fixture(scope="module")
def X_train():
    return blobs(24, seed=1)


@pytest.fixture(scope="module")
def X_test():
    return np.concatenate([blobs(4, seed=31), np.rot90(blobs(3, seed=32), axes=(2, 3))])


# the configurations pinned with the previous implementation, written with descriptors
CONFIGS = {
    "default": {},
    "spectrum": dict(descriptors=[Spectrum()]),
    "karimi": dict(layer="decoder_last", descriptors=[Spectrum(grid=8)], threshold="karimi"),
    "max_k2": dict(combine="max", descriptors=[Spectrum(n_neighbors=2), Layout(n_neighbors=2)]),
    "layout_opts": dict(layer="bottleneck", n_folds=3, descriptors=[
        Spectrum(grid=None, normalize=None, eps=1e-3),
        Layout(layer="bottleneck", grid=(2, 4), n_components=3)]),
    "cosine": dict(contamination=0.1, descriptors=[Spectrum(metric="cosine"), Layout()]),
}
OLD_KEYWORDS = {
    "spectrum": dict(descriptor="spectrum"),
    "karimi": dict(layer="decoder_last", grid=8, descriptor="spectrum", threshold="karimi"),
    "max_k2": dict(combine="max", n_neighbors=2, layout_neighbors=2),
    "layout_opts": dict(layer="bottleneck", layout_layer="bottleneck", layout_grid=(2, 4),
                        layout_components=3, grid=None, normalize=None, eps=1e-3, n_folds=3),
    "cosine": dict(metric="cosine", contamination=0.1),
}


# ---------------------------------------------------------------------- same numbers
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_scores_equal_the_previous_implementation(tiny_2d, X_train, X_test, pins, name):
    det = SpectralOODDetector(tiny_2d, **CONFIGS[name]).fit(X_train)
    got = {"score": det.score_samples(X_test), "train": det.train_scores_,
           "offset": np.array(det.offset_), "sig": det.signature(X_test)}
    for key, value in got.items():
        want = pins[f"{name}/{key}"]
        if name == "cosine" and key == "score":
            # the layout part is euclidean: numpy's k-th distance now, scikit-learn's before
            np.testing.assert_allclose(value, want, rtol=0, atol=1e-12)
        else:  # bit for bit
            np.testing.assert_array_equal(value, want, err_msg=f"{name}/{key}")


def test_partial_fit_equals_the_previous_implementation(tiny_2d, X_train, X_test, pins):
    det = SpectralOODDetector(tiny_2d, contamination=0.1)
    det.partial_fit(X_train[:10]).partial_fit(X_train[10:])
    np.testing.assert_array_equal(det.score_samples(X_test), pins["partial/score"])


def test_reference_zoo_default_equals_the_previous_implementation(pins):
    from uqseg import datasets

    X_tr, _ = datasets.load_brain_tissue("train")
    X_te, _ = datasets.load_brain_tissue("test")
    X = np.concatenate([X_te[:6], datasets.load_ood("ct")[:3],
                        datasets.load_ood("orientation")[:3]])
    det = SpectralOODDetector(datasets.reference_models()[0], layer="auto",
                              contamination=0.05).fit(X_tr[::4])  # DESIGN.md's call
    np.testing.assert_array_equal(det.score_samples(X), pins["zoo/default/score"])
    np.testing.assert_array_equal(det.train_scores_, pins["zoo/default/train"])
    assert det.offset_ == pins["zoo/default/offset"]


# ---------------------------------------------------------------------- deprecated keywords
@pytest.mark.parametrize("name", sorted(OLD_KEYWORDS))
def test_old_keywords_warn_and_mean_the_same(tiny_2d, X_train, X_test, name):
    old = SpectralOODDetector(tiny_2d, **OLD_KEYWORDS[name])
    assert clone(old).get_params() == old.get_params()  # still parameters (deprecated)
    with pytest.warns(FutureWarning, match=r"deprecated.*pass descriptors=\["):
        old.fit(X_train)
    new = SpectralOODDetector(tiny_2d, **CONFIGS[name]).fit(X_train)
    assert repr(old.descriptors_) == repr(new.descriptors_)
    np.testing.assert_array_equal(old.score_samples(X_test), new.score_samples(X_test))
    with pytest.warns(FutureWarning, match="deprecated"):
        old.partial_fit(X_test)


def test_old_keyword_errors(tiny_2d, X_train):
    with pytest.raises(TypeError, match="unexpected keyword argument 'gird'"):
        SpectralOODDetector(tiny_2d, gird=8)
    with pytest.raises(TypeError, match="positional"):
        SpectralOODDetector(tiny_2d, "auto")  # keyword-only after the network
    with warnings.catch_warnings(record=True) as w, pytest.raises(TypeError, match="not both"):
        warnings.simplefilter("always")
        SpectralOODDetector(tiny_2d, grid=8, descriptors=[Spectrum()]).fit(X_train)
    assert not w  # refused, no advice to do what was done
    with pytest.raises(ValueError, match="descriptor must be one of"):
        SpectralOODDetector(tiny_2d, descriptor="layout").fit(X_train)
    with pytest.warns(FutureWarning), pytest.raises(
            ValueError, match=r"descriptors\[1\] \(Layout\): grid must be"):
        SpectralOODDetector(tiny_2d, layout_grid=0).fit(X_train)


# ---------------------------------------------------------------------- parameters
def test_nested_params_clone_and_set_params(tiny_2d, X_train):
    sp, lay = Spectrum(grid=8), Layout()
    det = SpectralOODDetector(tiny_2d, descriptors=[sp, lay])
    p = det.get_params()
    assert p["descriptors__0"] is sp and p["descriptors__0__grid"] == 8
    assert p["descriptors__1__n_components"] == 64
    assert set(det.get_params(deep=False)) == {
        "estimator", "layer", "descriptors", "contamination", "threshold", "combine", "n_folds",
        "grid", "n_neighbors", "normalize", "metric", "eps", "descriptor", "layout_layer",
        "layout_grid", "layout_components", "layout_neighbors"}  # the last ten deprecated
    assert repr(det) == (f"SpectralOODDetector(descriptors=[Spectrum(grid=8), Layout()],\n"
                         f"                    estimator={tiny_2d!r})")
    c = clone(det)
    assert c.descriptors[0] is not sp and c.descriptors[0].get_params() == sp.get_params()
    det.set_params(descriptors__0__grid=4, descriptors__1__n_components=8, combine="max")
    assert sp.grid == 4 and lay.n_components == 8 and det.combine == "max"
    assert c.descriptors[0].grid == 8  # the clone's copies are its own
    det.set_params(descriptors__1=Layout(grid=2))
    assert det.descriptors[1].grid == 2 and lay.grid == 4  # replaced, not edited
    det.fit(X_train)
    assert not hasattr(sp, "layers_")  # fit works on copies
    assert det.descriptors_[0].grid == 4 and det.descriptors_[0] is not sp
    with pytest.raises(ValueError, match="Invalid parameter 'descriptors__2__grid'"):
        det.set_params(descriptors__2__grid=3)
    with pytest.raises(ValueError, match="Invalid parameter 'gird' for estimator Spectrum"):
        det.set_params(descriptors__0__gird=3)
    with pytest.raises(ValueError, match="set descriptors=\\[...\\] first"):
        SpectralOODDetector(tiny_2d).set_params(descriptors__0__grid=3)


@pytest.mark.parametrize("descriptors, exc, match", [
    ([], TypeError, "non-empty list"),
    (Spectrum(), TypeError, "non-empty list"),
    ([Spectrum(), "layout"], TypeError, "non-empty list"),
    ([Layout(layer=3)], TypeError, r"descriptors\[0\] \(Layout\): layer must be"),
    ([Spectrum(layer=[])], TypeError, r"descriptors\[0\] \(Spectrum\): layer must be"),
])
def test_descriptor_list_errors(tiny_2d, X_train, descriptors, exc, match):
    with pytest.raises(exc, match=match):
        SpectralOODDetector(tiny_2d, descriptors=descriptors).fit(X_train)


# ---------------------------------------------------------------------- combinations
def test_one_layout_is_its_whitened_distance(tiny_2d, X_train):
    det = SpectralOODDetector(tiny_2d, descriptors=[Layout(n_neighbors=2)]).fit(X_train)
    lay = det.descriptors_[0]
    assert lay.layers_ == ["decoder_last"]
    X = blobs(4, seed=60)
    f = det.estimator_.run(X, layers=["decoder_last"])["decoder_last"]
    L = f.reshape(4, 4, 4, 4, 4, 4).mean(axis=(3, 5)).reshape(4, -1)  # 4 channels, 4x4 cells
    P = ((L - lay.mean_) / lay.scale_) @ lay.components_.T
    T = ((lay.features_ - lay.mean_) / lay.scale_) @ lay.components_.T
    np.testing.assert_allclose(det.score_samples(X), -np.sort(cdist(P, T), axis=1)[:, 1],
                               rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(det.train_scores_, -xfit_kth(T, 2), atol=1e-9)


@pytest.mark.parametrize("combine", ["mean", "max"])
def test_two_spectra_combine_their_z_scores(tiny_2d, X_train, combine):
    """Two descriptors of the same kind on different layers: each one's distance as a z-score
    of its own cross-fitted training distances, reduced by ``combine``."""
    a, b = Spectrum(layer="bottleneck"), Spectrum(layer="decoder_last", grid=8)
    det = SpectralOODDetector(tiny_2d, descriptors=[a, b], combine=combine).fit(X_train)
    assert [d.layers_ for d in det.descriptors_] == [["bottleneck"], ["decoder_last"]]
    X = blobs(5, seed=61)
    z = []
    for d in (a, b):
        one = SpectralOODDetector(tiny_2d, descriptors=[d]).fit(X_train)
        dist_tr, dist = -one.train_scores_, -one.score_samples(X)
        z.append((dist - dist_tr.mean()) / dist_tr.std())
    want = -(np.mean(z, axis=0) if combine == "mean" else np.max(z, axis=0))
    np.testing.assert_allclose(det.score_samples(X), want, rtol=1e-6, atol=1e-9)


def test_spectrum_layer_overrides_only_when_the_detector_is_auto(tiny_2d, X_train):
    det = SpectralOODDetector(tiny_2d, descriptors=[Spectrum(layer="bottleneck"),
                                                    Layout()]).fit(X_train)
    assert [d.layers_ for d in det.descriptors_] == [["bottleneck"], ["decoder_last"]]
    det = SpectralOODDetector(tiny_2d, layer="bottleneck").fit(X_train)
    assert [d.layers_ for d in det.descriptors_] == [["bottleneck"], ["decoder_last"]]


# ---------------------------------------------------------------------- persistence
@pytest.mark.parametrize("name", ["default", "spectrum"])
def test_folders_of_the_previous_implementation_load(name, pins, X_test, tmp_path):
    det = uqseg.load(V1 / name)
    want = [Spectrum(grid=(8, 8))] if name == "spectrum" else [Spectrum(), Layout()]
    assert repr(det.descriptors) == repr(want)
    assert [type(d) for d in det.descriptors_] == [type(d) for d in want]
    np.testing.assert_array_equal(det.score_samples(X_test), pins[f"saved/{name}"])
    back = uqseg.load(uqseg.save(det, tmp_path / "again"))
    np.testing.assert_array_equal(back.score_samples(X_test), pins[f"saved/{name}"])
    params = json.loads((tmp_path / "again" / "manifest.json").read_text())["root"]["params"]
    assert params["grid"] == params["descriptor"] == "deprecated"  # not given


def test_explicit_descriptors_round_trip(tiny_2d, X_train, X_test, tmp_path):
    det = SpectralOODDetector(tiny_2d, layer="bottleneck", n_folds=3, descriptors=[
        Spectrum(grid=(4, 4), metric="cosine"),
        Layout(layer="decoder_last", grid=2, n_components=5)]).fit(X_train)
    back = uqseg.load(uqseg.save(det, tmp_path / "d"))
    assert repr(back.descriptors) == repr(det.descriptors) and back.layer == "bottleneck"
    np.testing.assert_array_equal(back.score_samples(X_test), det.score_samples(X_test))
    for a, b in zip(back.descriptors_, det.descriptors_, strict=True):
        np.testing.assert_array_equal(a.features_, b.features_)
        assert a.layers_ == b.layers_


def _old_copy(tmp_path, name="default") -> tuple[Path, dict]:
    dst = tmp_path / name
    shutil.copytree(V1 / name, dst)
    return dst, json.loads((dst / "manifest.json").read_text())


def _write(folder: Path, m: dict) -> None:
    (folder / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("edit, key, match", [
    (lambda r: r["params"].update(descriptor="layout"), "estimator.descriptor",
     "expected one of"),
    (lambda r: r["params"].update(descriptor=3), "estimator.descriptor", "expected one of"),
    (lambda r: r["params"].update(layout_grid=0), "estimator.descriptors[1]", "grid must be"),
    (lambda r: r["params"].update(metric="os.system"), "estimator.descriptors[0]",
     "metric"),
    (lambda r: r["fitted"].update(n_spectral_=13), "estimator.", "does not"),
    (lambda r: r["fitted"].update(layout_layer_="bottleneck"),
     "estimator.descriptors_[1].layers_", "the parameters and network give"),
    (lambda r: r["fitted"].pop("layout_mean_"), "estimator.layout_mean_", "missing"),
])
def test_tampered_folders_of_the_previous_format_are_refused(tmp_path, edit, key, match):
    folder, m = _old_copy(tmp_path)
    edit(m["root"])
    _write(folder, m)
    with pytest.raises((ValueError, TypeError), match=match) as info:
        uqseg.load(folder)
    assert str(info.value).startswith(key), str(info.value)


def test_detector_with_old_keywords_round_trips(tiny_2d, X_train, X_test, tmp_path):
    det = SpectralOODDetector(tiny_2d, layout_grid=2)
    with pytest.warns(FutureWarning, match="deprecated"):
        det.fit(X_train)
    back = uqseg.load(uqseg.save(det, tmp_path / "o"))  # loading warns of nothing
    assert back.layout_grid == 2 and back.descriptors is None
    assert repr(back.descriptors_) == "[Spectrum(), Layout(grid=2)]"
    np.testing.assert_array_equal(back.score_samples(X_test), det.score_samples(X_test))
