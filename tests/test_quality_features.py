"""QualityFeatures: the quality features as a scikit-learn transformer, and the split modules."""

from __future__ import annotations

import ast
import pickle
from pathlib import Path

import numpy as np
import pytest
from scipy.special import xlogy
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import Ridge
from sklearn.pipeline import make_pipeline

import uqseg
from uqseg.quality import QualityRegressor
from uqseg.quality_features import QualityFeatures, feature_names, quality_features


def _softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


class LogitSegmenter(BaseEstimator):
    """The image channels are the logits: the probabilities are known exactly."""

    def fit(self, X=None, y=None):
        self.n_classes_ = 3
        return self

    def predict_proba(self, X):
        return _softmax(np.asarray(X, dtype=np.float64)).astype(np.float32)


class MemberSegmenter(LogitSegmenter):
    """Two members: logits and logits / 3."""

    def predict_members(self, X):
        X = np.asarray(X, dtype=np.float64)
        return np.stack([_softmax(X), _softmax(X / 3)]).astype(np.float32)

    def predict_proba(self, X):
        return self.predict_members(X).mean(axis=0)


class Recorder(BaseEstimator):
    """Remembers what fit received; predicts zeros."""

    def fit(self, X, y):
        self.X_seen_, self.y_seen_ = np.array(X), np.array(y)
        return self

    def predict(self, X):
        return np.zeros((len(X), self.y_seen_.shape[1]))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


def _images(n=6, size=16, seed=0):
    return (3 * np.random.default_rng(seed).standard_normal((n, 3, size, size))).astype(
        np.float32)


def _dilate_cross(mask):
    """Face-neighbour dilation of 2-D masks (n, H, W), outside the image counts as empty."""
    pad = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    return (pad[:, 1:-1, 1:-1] | pad[:, :-2, 1:-1] | pad[:, 2:, 1:-1] | pad[:, 1:-1, :-2]
            | pad[:, 1:-1, 2:])


def test_names_match_columns_and_numpy_reference():
    X = _images()
    qf = QualityFeatures(LogitSegmenter(), n_bins=5).fit(X)
    F = qf.transform(X)
    names = qf.get_feature_names_out()
    assert names.dtype == object and list(names) == feature_names(3, "entropy", 5)
    assert F.shape == (6, len(names)) and len(set(names)) == len(names)
    assert qf.uncertainty_kind_ == "entropy" and qf.n_classes_ == 3
    col = dict(zip(names, F.T, strict=True))
    proba = _softmax(X.astype(np.float64))
    pred = proba.argmax(axis=1)
    ent = -xlogy(proba, proba).sum(axis=1)
    fg = pred > 0
    np.testing.assert_allclose(col["foreground_fraction"], fg.mean(axis=(1, 2)))
    np.testing.assert_allclose(col["mean_entropy"], ent.mean(axis=(1, 2)), rtol=1e-5)
    np.testing.assert_allclose(col["volume_c2"], (pred == 2).mean(axis=(1, 2)))
    # histogram of entropy / log 3 over the foreground and its one-voxel rim
    region = _dilate_cross(fg)
    hist = F[:, [list(names).index(f"entropy_hist_{b}") for b in range(5)]]
    for i in range(len(X)):
        vals = np.clip(ent[i][region[i]] / np.log(3), 0, 1)
        want = np.histogram(vals, bins=np.linspace(0, 1, 6))[0] / vals.size
        np.testing.assert_allclose(hist[i], want, atol=1e-6)


def test_equals_what_quality_regressor_fits_on():
    X = _images(n=8)
    y = np.random.default_rng(1).integers(0, 3, (8, 16, 16))
    qr = QualityRegressor(LogitSegmenter(), regressor=Recorder(), typicality=False,
                          atlas=False).fit(X, y)
    F = QualityFeatures(LogitSegmenter()).fit(X).transform(X)
    np.testing.assert_array_equal(qr.regressor_.X_seen_, F)
    np.testing.assert_array_equal(qr.features(X), F)
    assert qr.feature_names_ == feature_names(3, "entropy", 8)


def test_ensemble_kind_lists_and_precomputed_maps():
    X = _images(n=4)
    seg = MemberSegmenter()
    qf = QualityFeatures(seg).fit(X)
    assert qf.uncertainty_kind_ == "mutual_information"
    assert "mean_entropy" in qf.feature_names_  # a second column when the kind is not entropy
    F = qf.transform(X)
    members = seg.predict_members(X)
    p = members.mean(axis=0)
    mi = -xlogy(p, p).sum(1) - np.mean([-xlogy(m, m).sum(1) for m in members], axis=0)
    np.testing.assert_allclose(qf.transform_maps(X, p, mi), F, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(quality_features(X, p, mi, "mutual_information"), F, rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(qf.transform(list(X)), F)  # a list gives the same rows
    var = QualityFeatures(seg, uncertainty="variance", n_bins=3).fit(X)
    assert var.feature_names_[-3:] == ["variance_hist_0", "variance_hist_1", "variance_hist_2"]


def test_in_a_pipeline_and_sklearn_rules():
    X = _images(n=10)
    t = np.linspace(0.2, 0.9, 10)
    qf = QualityFeatures(LogitSegmenter())
    model = make_pipeline(qf, Ridge()).fit(X, t)
    ridge = Ridge().fit(QualityFeatures(LogitSegmenter()).fit(X).transform(X), t)
    np.testing.assert_allclose(model.predict(X[:3]), ridge.predict(
        QualityFeatures(LogitSegmenter()).fit(X).transform(X[:3])))
    assert model[0].feature_names_ == feature_names(3, "entropy", 8)
    with pytest.raises(NotFittedError):
        QualityFeatures(LogitSegmenter()).transform(X)
    fitted = QualityFeatures(LogitSegmenter()).fit(X)
    assert clone(fitted).get_params()["n_bins"] == 8
    np.testing.assert_array_equal(pickle.loads(pickle.dumps(fitted)).transform(X),
                                  fitted.transform(X))


def test_errors():
    X = _images(n=2)
    with pytest.raises(ValueError, match="uncertainty must be 'auto' or one of"):
        QualityFeatures(LogitSegmenter(), uncertainty="max").fit(X)
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        QualityFeatures(LogitSegmenter(), n_bins=0).fit(X)
    with pytest.raises(ValueError, match="needs an ensemble"):
        QualityFeatures(LogitSegmenter(), uncertainty="variance").fit(X)
    with pytest.raises(TypeError, match="predict_proba"):
        QualityFeatures(object()).fit(X)
    qf = QualityFeatures(LogitSegmenter()).fit(X)
    p = _softmax(X.astype(np.float64))
    with pytest.raises(ValueError, match=r"proba must have shape \(N, 3, \*spatial\)"):
        qf.transform_maps(X, p[:, :2], p[:, 0])
    with pytest.raises(ValueError, match="one map per image"):
        qf.transform_maps(X, p, p[:, :, 0])


def test_make_quality_set_lives_in_datasets():
    from uqseg.quality import make_quality_set

    assert uqseg.datasets.make_quality_set is make_quality_set
    assert make_quality_set.__module__ == "uqseg.datasets._quality_set"


def test_quality_modules_do_not_import_backends():
    # estimators run networks through the inference layer only
    root = Path(uqseg.__file__).parent
    for path in sorted(root.glob("quality*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [f"{node.module}.{a.name}" for a in node.names] \
                if isinstance(node, ast.ImportFrom) and node.module else []
            assert not any(n.startswith("uqseg.backends") for n in names), (path.name, names)


@pytest.mark.parametrize("shape", [(4, 10, 12), (3, 1, 8), (2, 5, 6, 7), (2, 1, 1), (3, 9, 9)])
def test_boundary_components_and_region_means_against_scipy(shape):
    from scipy import ndimage

    from uqseg.quality_features import _boundary, _components, _Region

    rng = np.random.default_rng(len(shape) * 10 + shape[1])
    mask = rng.random(shape) > 0.45
    mask[0] = False  # an empty image: means are 0, no components
    face = ndimage.generate_binary_structure(len(shape) - 1, 1)
    eroded = np.stack([ndimage.binary_erosion(m, face) for m in mask])
    np.testing.assert_array_equal(_boundary(mask), mask & ~eroded)
    np.testing.assert_array_equal(_components(mask),
                                  [ndimage.label(m, face)[1] for m in mask])
    values = rng.normal(size=shape).astype(np.float32)
    region = _Region(mask)
    def means(masks):
        return [float(v[m].mean(dtype=np.float64)) if m.any() else 0.0
                for v, m in zip(values, masks, strict=True)]

    want = means(mask)
    np.testing.assert_allclose(region.mean(values), want, rtol=1e-12)
    sub = _boundary(mask)
    np.testing.assert_allclose(region.mean_of(region.take(values), region.take(sub)), means(sub),
                               rtol=1e-12)


def test_argmax_labels_first_maximum_like_numpy():
    from uqseg.quality_features import _argmax_max, argmax_labels

    rng = np.random.default_rng(3)
    p = rng.integers(0, 3, size=(4, 5, 6, 7)).astype(np.float32)  # many ties
    lab, top = _argmax_max(p)
    np.testing.assert_array_equal(argmax_labels(p), p.argmax(axis=1))
    np.testing.assert_array_equal(lab, p.argmax(axis=1))
    np.testing.assert_array_equal(top, p.max(axis=1))
