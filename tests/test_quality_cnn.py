"""QualityCNN: a pretrained ONNX quality network as its own estimator."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
from onnx_models import make_quality_net
from scipy.special import expit, xlogy
from sklearn.base import BaseEstimator, clone
from sklearn.exceptions import NotFittedError

import uqseg
from uqseg import OnnxSegmenter
from uqseg.metrics import dice_score, quality_report
from uqseg.quality import QualityRegressor
from uqseg.quality_cnn import QualityCNN


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


def _net(path, in_channels, n_out, rank=4, seed=0):
    model, w = make_quality_net(in_channels, n_out, rank=rank, seed=seed)
    onnx.save(model, str(path))
    return str(path), w


def _data(n=6, seed=0):
    rng = np.random.default_rng(seed)
    X = (3 * rng.standard_normal((n, 3, 16, 16))).astype(np.float32)
    y = np.where(rng.random((n, 16, 16)) < 0.2, rng.integers(0, 3, (n, 16, 16)),
                 X.argmax(axis=1))
    return X, y


def test_predictions_match_closed_form_and_quality_regressor(tmp_path):
    X, y = _data()
    path, w = _net(tmp_path / "q.onnx", 3 + 3 + 1, 2)
    qc = QualityCNN(LogitSegmenter(), path).fit(X, y)
    assert qc.n_classes_ == 3 and qc.uncertainty_kind_ == "entropy"
    proba = _softmax(X.astype(np.float64))
    ent = -xlogy(proba, proba).sum(axis=1) / np.log(3)
    maps = np.concatenate([X, proba, ent[:, None]], axis=1)
    want = expit(maps.mean(axis=(2, 3)) @ w)
    np.testing.assert_allclose(qc.predict(X), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(qc.predict(list(X)), want, rtol=1e-4, atol=1e-5)
    truth = np.nan_to_num(dice_score(proba.argmax(axis=1), y, n_classes=3), nan=1.0)
    assert qc.fit_report_ == pytest.approx(quality_report(want, truth), rel=1e-4)
    # the same network through the older QualityRegressor(regressor=<path>) route
    qr = QualityRegressor(LogitSegmenter(), regressor=path).fit(X, y)
    np.testing.assert_array_equal(qc.predict(X), qr.predict(X))
    assert qc.fit_report_ == qr.fit_report_
    np.testing.assert_array_equal(qc.flag(X, min_dice=0.6), (want < 0.6).any(axis=1))
    np.testing.assert_array_equal(qc.flag(X, min_dice=0.6, reduce="mean"),
                                  want.mean(axis=1) < 0.6)
    iou = QualityCNN(LogitSegmenter(), path, target="iou").fit(X, y)
    np.testing.assert_array_equal(iou.flag(X, min_dice=0.7),
                                  (2 * want / (1 + want) < 0.7).any(axis=1))


def test_sklearn_rules_and_pickle(tmp_path):
    X, y = _data(n=4)
    path, _ = _net(tmp_path / "q.onnx", 7, 2)
    qc = QualityCNN(LogitSegmenter(), path)
    with pytest.raises(NotFittedError):
        qc.predict(X)
    qc.fit(X, y)
    assert clone(qc).get_params()["model"] == path
    again = pickle.loads(pickle.dumps(qc))  # the engine session is dropped and rebuilt
    np.testing.assert_array_equal(again.predict(X), qc.predict(X))


def test_interface_errors(tmp_path):
    X, y = _data(n=4)
    with pytest.raises(ValueError, match=r"output shape \(N, K - 1\) = \(1, 2\), got \(1, 3\)"):
        QualityCNN(LogitSegmenter(), _net(tmp_path / "o.onnx", 7, 3)[0]).fit(X, y)
    with pytest.raises(ValueError, match="takes 5 input channels, expected 7"):
        QualityCNN(LogitSegmenter(), _net(tmp_path / "i.onnx", 5, 2)[0]).fit(X, y)
    with pytest.raises(ValueError, match="rank-5 input"):
        QualityCNN(LogitSegmenter(), _net(tmp_path / "r.onnx", 7, 2, rank=5)[0]).fit(X, y)
    path = _net(tmp_path / "q.onnx", 7, 2)[0]
    with pytest.raises(TypeError, match="model must be a path"):
        QualityCNN(LogitSegmenter(), None).fit(X, y)
    with pytest.raises(ValueError, match="target must be one of"):
        QualityCNN(LogitSegmenter(), path, target="hd95").fit(X, y)
    with pytest.raises(ValueError, match="needs an ensemble"):
        QualityCNN(LogitSegmenter(), path, uncertainty="variance").fit(X, y)
    with pytest.raises(ValueError, match=r"y holds labels in \[5, 5\]"):
        QualityCNN(LogitSegmenter(), path).fit(X, np.full((4, 16, 16), 5))
    qc = QualityCNN(LogitSegmenter(), path).fit(X, y)
    with pytest.raises(ValueError, match="min_dice must be a number"):
        qc.flag(X, min_dice=2)


def test_save_load_and_assess(tiny_2d, tmp_path):
    rng = np.random.default_rng(2)
    X = rng.random((4, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 3, (4, 16, 16))
    path, _ = _net(tmp_path / "q.onnx", 1 + 3 + 1, 2)
    seg = OnnxSegmenter(tiny_2d).fit()
    qc = QualityCNN(seg, path).fit(X, y)
    folder = uqseg.save(qc, tmp_path / "saved")
    loaded = uqseg.load(folder)
    assert type(loaded) is QualityCNN and loaded.fit_report_ == qc.fit_report_
    np.testing.assert_array_equal(loaded.predict(X), qc.predict(X))
    out = uqseg.assess(X, seg, quality=qc)  # one pass gives the same qualities
    np.testing.assert_allclose(out["quality"], qc.predict(X), atol=1e-6)
