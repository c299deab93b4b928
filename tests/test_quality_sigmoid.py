"""QualityRegressor and QualityFeatures on sigmoid (binary and multi-label) segmenters: Dice per
channel from indicator targets, per-channel features against numpy references, target-kind
errors, persistence, the image estimator contract, and predicted against true Dice for a
small trained multi-label network."""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import pytest
from onnx_models import make_unet_like
from sklearn.linear_model import Ridge

import uqseg
from uqseg import EnsembleSegmenter, OnnxSegmenter, QualityRegressor, datasets
from uqseg.metrics import multilabel_report
from uqseg.metrics.uncertainty import binary_entropy
from uqseg.quality_features import QualityFeatures, feature_names, quality_features
from uqseg.utils.estimator_checks import check_image_estimator


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("qsig")
    paths = {}
    for name, k, seed in (("ml0", 3, 1), ("ml1", 3, 2), ("bin", 1, 3), ("soft", 3, 4)):
        paths[name] = str(d / f"{name}.onnx")
        onnx.save(make_unet_like(n_classes=k, seed=seed), paths[name])
    return paths


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 1, 16, 16)).astype(np.float32)
    X[:, :, 4:12, 4:12] += 2.0
    y = np.zeros((12, 3, 16, 16), bool)
    y[:, 0, 4:12, 4:12] = True
    y[:, 1, 6:10, 6:10] = True
    y[:, 2, 2:8, 2:14] = True  # overlaps channel 0: multi-label
    return X, y


def test_features_per_channel_against_numpy():
    rng = np.random.default_rng(1)
    p = rng.random((3, 2, 8, 8)).astype(np.float32)
    h = binary_entropy(p)  # per-channel map
    X = rng.standard_normal((3, 1, 8, 8)).astype(np.float32)
    F = quality_features(X, p, h, "entropy", n_bins=4, sigmoid=True)
    names = feature_names(2, "entropy", 4, sigmoid=True)
    assert F.shape == (3, len(names)) and names[0] == "volume_ch0"
    col = dict(zip(names, F.T, strict=True))
    for c in range(2):
        m = p[:, c] >= 0.5
        np.testing.assert_allclose(col[f"volume_ch{c}"], m.mean(axis=(1, 2)))
        np.testing.assert_allclose(col[f"mean_proba_ch{c}"],
                                   [p[i, c][m[i]].mean() for i in range(3)], rtol=1e-6)
        np.testing.assert_allclose(col[f"seg_entropy_ch{c}"],  # the channel's own map
                                   [h[i, c][m[i]].mean() for i in range(3)], rtol=1e-5)
    fg = (p >= 0.5).any(axis=1)
    np.testing.assert_allclose(col["foreground_fraction"], fg.mean(axis=(1, 2)))
    np.testing.assert_allclose(col["mean_entropy"], h.mean(axis=(1, 2, 3)), rtol=1e-5)
    # the histogram reads the channel-mean map on the binary scale log 2
    hist = np.array([[col[f"entropy_hist_{b}"][i] for b in range(4)] for i in range(3)])
    np.testing.assert_allclose(hist.sum(axis=1), 1.0)


def test_dice_targets_and_predictions_per_channel(nets, data):
    X, y = data
    seg = OnnxSegmenter(nets["ml0"], activation="sigmoid").fit()
    qr = QualityRegressor(seg, regressor=Ridge(), target_transform="identity").fit(X, y)
    assert qr.n_classes_ == 3 and qr.feature_names_[0] == "volume_ch0"
    assert qr.predict(X).shape == (12, 3)
    # the targets: multilabel_report's per-channel Dice of the masks p >= 0.5
    F = qr.features(X)
    pred = seg.predict(X)
    want = np.array([[multilabel_report(seg.predict_proba(X[i:i + 1]), y[i:i + 1])[
        f"channel {c}"]["dice"] for c in range(3)] for i in range(12)])
    inter = (pred & y).sum(axis=(2, 3))
    tot = pred.sum(axis=(2, 3)) + y.sum(axis=(2, 3))
    np.testing.assert_allclose(np.where(tot > 0, 2 * inter / np.maximum(tot, 1), 1.0),
                               np.nan_to_num(want, nan=1.0))
    # Ridge on identity targets: the in-sample fit reproduces Ridge's own prediction
    np.testing.assert_allclose(qr.predict(X), np.clip(qr.regressor_.predict(F), 0, 1))
    assert qr.flag(X, min_dice=1.0).all()


def test_binary_segmenter_takes_label_maps_and_indicators(nets, data):
    X, y = data
    seg = OnnxSegmenter(nets["bin"]).fit()
    assert seg.activation_ == "sigmoid"
    a = QualityRegressor(seg, regressor=Ridge()).fit(X, y[:, 0].astype(np.int64))
    b = QualityRegressor(seg, regressor=Ridge()).fit(X, y[:, :1])
    np.testing.assert_allclose(a.predict(X), b.predict(X))
    assert a.predict(X).shape == (12, 1)
    # lists of per-image targets
    c = QualityRegressor(seg, regressor=Ridge()).fit(list(X), list(y[:, :1]))
    np.testing.assert_allclose(c.predict(X), a.predict(X), rtol=1e-6)


def test_target_kind_errors(nets, data):
    X, y = data
    seg = OnnxSegmenter(nets["ml0"], activation="sigmoid")
    with pytest.raises(ValueError, match="3 independent sigmoid channels: y must be indicator"):
        QualityRegressor(seg).fit(X, y.argmax(axis=1))
    with pytest.raises(ValueError, match="softmax probabilities over exclusive classes: y must "
                                         "be class labels"):
        QualityRegressor(OnnxSegmenter(nets["soft"])).fit(X, y)
    with pytest.raises(ValueError, match="indicator targets for 2 channels but the segmenter "
                                         "outputs 3"):
        QualityRegressor(seg, regressor=Ridge()).fit(X, y[:, :2])
    with pytest.raises(ValueError, match="holds labels in \\[0, 2\\]"):
        QualityRegressor(seg).fit(X, y.astype(int) * 2)
    with pytest.raises(ValueError, match="regressor_input='features'"):
        QualityRegressor(seg, regressor_input="maps").fit(X, y)
    with pytest.raises(ValueError, match="atlas=True"):
        QualityRegressor(seg, atlas=True).fit(X, y)
    from uqseg.quality_cnn import QualityCNN

    with pytest.raises(ValueError, match="QualityCNN needs a softmax"):
        QualityCNN(seg, nets["soft"]).fit(X, y)


def test_ensemble_features_persistence_and_estimator_checks(nets, data, tmp_path):
    X, y = data
    ens = EnsembleSegmenter([OnnxSegmenter(nets[n], activation="sigmoid")
                             for n in ("ml0", "ml1")])
    qr = QualityRegressor(ens, regressor=Ridge()).fit(X, y)
    assert qr.uncertainty_kind_ == "mutual_information"
    uqseg.save(qr, tmp_path / "qr")
    back = uqseg.load(tmp_path / "qr")
    np.testing.assert_allclose(back.predict(X), qr.predict(X))
    qf = QualityFeatures(ens).fit(X)
    uqseg.save(qf, tmp_path / "qf")
    np.testing.assert_allclose(uqseg.load(tmp_path / "qf").transform(X), qf.transform(X))
    out = uqseg.assess(X, qr.estimator_, quality=qr)  # one shared pass, same predictions
    np.testing.assert_allclose(out["quality"], qr.predict(X), rtol=1e-6)
    seg = OnnxSegmenter(nets["ml0"], activation="sigmoid")
    check_image_estimator(QualityRegressor(seg, regressor=Ridge()), X[:8], y[:8])


# ------------------------------------------------------------------ a trained network
torch_mark = pytest.mark.torch


def _indicators(y):
    """Two overlapping labels of the brain tissue maps: brain (GM + WM) and white matter."""
    return np.stack([y >= 1, y == 2], axis=1)


@pytest.fixture(scope="module")
def trained_sigmoid(tmp_path_factory):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)
    X, y = datasets.load_brain_tissue("train")
    X, y = X[::4, :, ::2, ::2].copy(), y[::4, ::2, ::2].copy()  # 66 images, 64 x 64
    T = _indicators(y).astype(np.float32)

    def block(i, o):
        return nn.Sequential(nn.Conv2d(i, o, 3, padding=1), nn.ReLU())

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.e1, self.b, self.pool = block(1, 8), block(8, 16), nn.MaxPool2d(2)
            self.up, self.d = nn.ConvTranspose2d(16, 8, 2, stride=2), block(16, 8)
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x):
            e = self.e1(x)
            return self.head(self.d(torch.cat([self.up(self.b(self.pool(e))), e], 1)))

    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    xt, tt = torch.from_numpy(X), torch.from_numpy(T)
    for _ in range(60):  # a few seconds: a rough net, whose Dice spreads under corruption
        idx = torch.randint(0, len(xt), (16,))
        loss = nn.functional.binary_cross_entropy_with_logits(net(xt[idx]), tt[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    path = str(tmp_path_factory.mktemp("trained") / "sigmoid.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (xt[:1],), path, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "N"},
                                                                 "logits": {0: "N"}},
                          dynamo=False)
    return path


@torch_mark
def test_predicted_dice_follows_true_dice_on_a_trained_sigmoid_net(trained_sigmoid):
    from uqseg.datasets import make_quality_set

    seg = OnnxSegmenter(trained_sigmoid, activation="sigmoid").fit()
    Xv, yv = datasets.load_brain_tissue("val")
    Xs, ys = datasets.load_brain_tissue("test")
    Xw, yw, info = make_quality_set(Xv[::6, :, ::2, ::2], yv[::6, ::2, ::2],
                                    severities=(0.5, 1.0))
    Xq, yq, _ = make_quality_set(Xs[::6, :, ::2, ::2], ys[::6, ::2, ::2],
                                 severities=(0.5, 1.0), seed=1)
    qr = QualityRegressor(seg).fit(Xw, _indicators(yw), groups=info["source"])
    pred = qr.predict(Xq)
    m, t = seg.predict(Xq), _indicators(yq)
    true = 2 * (m & t).sum(axis=(2, 3)) / np.maximum(m.sum(axis=(2, 3)) + t.sum(axis=(2, 3)), 1)
    r = [np.corrcoef(pred[:, c], true[:, c])[0, 1] for c in range(2)]
    # measured: r = 0.977 (brain), 0.894 (white matter); MAE 0.025, 0.083
    assert r[0] > 0.9 and r[1] > 0.8
    assert np.abs(pred - true).mean() < 0.1


def test_per_channel_targets_dice_and_iou_from_the_definition():
    from uqseg.quality_regressors import quality_targets

    rng = np.random.default_rng(3)
    m = rng.random((4, 2, 8, 8)) < 0.3
    t = rng.random((4, 2, 8, 8)) < 0.3
    m[0, 1] = t[0, 1] = False  # both empty: the empty score
    for target in ("dice", "iou"):
        got = quality_targets(m, t, 2, target, 0.7)
        for i in range(4):
            for c in range(2):
                a, b = m[i, c], t[i, c]
                inter, union = (a & b).sum(), (a | b).sum()
                want = 0.7 if union == 0 else (
                    2 * inter / (a.sum() + b.sum()) if target == "dice" else inter / union)
                assert got[i, c] == pytest.approx(want)
