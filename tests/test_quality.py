"""QualityRegressor and make_quality_set: features, targets, regressors, ONNX regressor, errors."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from scipy import ndimage, stats
from scipy.special import expit, xlogy
from sklearn.base import BaseEstimator, clone
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LinearRegression, Ridge
from sklearn.multioutput import MultiOutputRegressor

from uqseg import OnnxSegmenter
from uqseg.metrics import dice_score, iou_score, segment_uncertainty
from uqseg.quality import QualityRegressor, make_quality_set, maps_input
from uqseg.uncertainty import mutual_information


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

    def predict(self, X):
        return self.predict_proba(X).argmax(axis=1)


class MemberSegmenter(LogitSegmenter):
    """An 'ensemble' of two members: logits and logits / 3 (duck-typed predict_members)."""

    def predict_members(self, X):
        X = np.asarray(X, dtype=np.float64)
        return np.stack([_softmax(X), _softmax(X / 3)]).astype(np.float32)

    def predict_proba(self, X):
        return self.predict_members(X).mean(axis=0)


class MultiOutput(BaseEstimator):
    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags


class Recorder(MultiOutput):
    """Remembers what fit received; predicts zeros."""

    def fit(self, X, y):
        self.X_seen_, self.y_seen_ = np.array(X), np.array(y)
        return self

    def predict(self, X):
        return np.zeros((len(X), self.y_seen_.shape[1]))


def _logit_images(n=10, size=16, seed=0):
    rng = np.random.default_rng(seed)
    return (3 * rng.standard_normal((n, 3, size, size))).astype(np.float32)


def _labels(X, seed=1, flip=0.2):
    rng = np.random.default_rng(seed)
    y = X.argmax(axis=1)
    noise = rng.random(y.shape) < flip
    return np.where(noise, rng.integers(0, 3, y.shape), y)


# --------------------------------------------------------------------------- features
def test_features_match_hand_computations():
    X = _logit_images()
    y = _labels(X)
    qr = QualityRegressor(LogitSegmenter(), regressor=Ridge()).fit(X, y)
    F = qr.features(X)
    names = qr.feature_names_
    assert F.shape == (10, len(names)) and len(set(names)) == len(names)
    proba = _softmax(X.astype(np.float64))
    pred = proba.argmax(axis=1)
    col = {n: F[:, i] for i, n in enumerate(names)}
    seg_h = np.nan_to_num(segment_uncertainty(proba), nan=0.0)
    bnd_h = np.nan_to_num(segment_uncertainty(proba, region="boundary"), nan=0.0)
    ent = -xlogy(proba, proba).sum(axis=1)
    for c in (1, 2):
        np.testing.assert_allclose(col[f"volume_c{c}"], (pred == c).mean(axis=(1, 2)))
        np.testing.assert_allclose(col[f"seg_binary_entropy_c{c}"], seg_h[:, c - 1], rtol=1e-5)
        np.testing.assert_allclose(col[f"boundary_binary_entropy_c{c}"], bnd_h[:, c - 1],
                                   rtol=1e-5)
        for i in range(len(X)):
            s = pred[i] == c
            assert col[f"seg_entropy_c{c}"][i] == pytest.approx(ent[i][s].mean(), rel=1e-5)
            assert col[f"mean_proba_c{c}"][i] == pytest.approx(proba[i, c][s].mean(), rel=1e-5)
            sd = 2 * proba[i, c][s].sum() / (proba[i, c].sum() + s.sum())
            assert col[f"self_dice_c{c}"][i] == pytest.approx(sd, rel=1e-5)
            assert col[f"log_components_c{c}"][i] == pytest.approx(np.log1p(ndimage.label(s)[1]))
            img = X[i].astype(np.float64).mean(axis=0)[s]
            assert col[f"mean_intensity_c{c}"][i] == pytest.approx(img.mean(), rel=1e-5)
            assert col[f"std_intensity_c{c}"][i] == pytest.approx(img.std(), rel=1e-4, abs=1e-6)
    np.testing.assert_allclose(col["mean_entropy"], ent.mean(axis=(1, 2)), rtol=1e-5)
    hist = F[:, [i for i, n in enumerate(names) if "_hist_" in n]]
    assert hist.shape[1] == 8
    np.testing.assert_allclose(hist.sum(axis=1), 1.0)


def test_features_of_an_empty_class_are_zero():
    X = _logit_images(n=3)
    X[:, 2] = -20.0  # class 2 never predicted
    y = _labels(X)
    qr = QualityRegressor(LogitSegmenter(), regressor=Ridge()).fit(X, y)
    col = dict(zip(qr.feature_names_, qr.features(X).T, strict=True))
    for name in ("volume_c2", "seg_entropy_c2", "boundary_binary_entropy_c2", "mean_proba_c2"):
        np.testing.assert_array_equal(col[name], 0.0)


def test_ensemble_uses_mutual_information_from_one_members_pass():
    X = _logit_images(n=4)
    y = _labels(X)
    seg = MemberSegmenter()
    qr = QualityRegressor(seg, regressor=Ridge()).fit(X, y)
    assert qr.uncertainty_kind_ == "mutual_information"
    col = dict(zip(qr.feature_names_, qr.features(X).T, strict=True))
    members = seg.predict_members(X)
    mi = mutual_information(members)
    np.testing.assert_allclose(col["mean_mutual_information"], mi.mean(axis=(1, 2)), rtol=1e-5)
    pred = members.mean(axis=0).argmax(axis=1)
    s = pred[0] == 1
    assert col["seg_mutual_information_c1"][0] == pytest.approx(mi[0][s].mean(), rel=1e-5)


def test_onnx_segmenter_features_and_3d(tiny_2d, tiny_3d):
    rng = np.random.default_rng(0)
    for path, shape in ((tiny_2d, (6, 1, 8, 8)), (tiny_3d, (4, 1, 4, 8, 8))):
        X = rng.random(shape).astype(np.float32)
        y = rng.integers(0, 3, (shape[0], *shape[2:]))
        qr = QualityRegressor(path).fit(X, y)
        proba = OnnxSegmenter(path).fit().predict_proba(X)
        col = dict(zip(qr.feature_names_, qr.features(X).T, strict=True))
        pred = proba.argmax(axis=1)
        np.testing.assert_allclose(col["volume_c1"], (pred == 1).reshape(len(X), -1).mean(1))
        q = qr.predict(X)
        assert q.shape == (shape[0], 2) and q.min() >= 0 and q.max() <= 1


# --------------------------------------------------------------------------- targets
@pytest.mark.parametrize("target, fn", [("dice", dice_score), ("iou", iou_score)])
def test_targets_equal_metrics(target, fn):
    X = _logit_images(n=8)
    X[0, 2] = -20.0
    y = _labels(X)
    y[0][y[0] == 2] = 0  # class 2 absent from prediction and truth: NaN -> empty_score
    qr = QualityRegressor(LogitSegmenter(), regressor=Recorder(), target=target,
                          target_transform="identity", empty_score=0.7, atlas=False).fit(X, y)
    ref = fn(X.argmax(axis=1), y, n_classes=3)
    assert np.isnan(ref[0, 1])
    np.testing.assert_allclose(qr.regressor_.y_seen_, np.nan_to_num(ref, nan=0.7))
    np.testing.assert_allclose(qr.regressor_.X_seen_, qr.features(X))


def test_logit_targets_and_inverse():
    X = _logit_images(n=8)
    y = _labels(X)
    qr = QualityRegressor(LogitSegmenter(), regressor=Recorder()).fit(X, y)
    t = np.clip(dice_score(X.argmax(axis=1), y, n_classes=3), 1e-3, 1 - 1e-3)
    np.testing.assert_allclose(qr.regressor_.y_seen_, np.log(t / (1 - t)))
    # Recorder predicts 0 in logit space -> 0.5
    np.testing.assert_allclose(qr.predict(X), expit(0.0))


def _shifted_discs(n, rng, size=32):
    """Truth: a disc; prediction: the disc shifted by s, with confidence falling as s grows."""
    yy, xx = np.mgrid[:size, :size]
    X, y, shifts = [], [], rng.uniform(0, 10, n)
    for s in shifts:
        truth = (yy - 16) ** 2 + (xx - 16) ** 2 < 64
        pred = (yy - 16) ** 2 + (xx - 16 - s) ** 2 < 64
        logit = np.where(pred, 1, -1) * (6.0 - 0.5 * s)
        X.append(np.stack([np.zeros_like(logit), logit, np.full(logit.shape, -30.0)]))
        y.append(truth.astype(int))
    return np.array(X, np.float32), np.array(y), shifts


def test_regressor_recovers_a_monotone_relation():
    rng = np.random.default_rng(0)
    X, y, _ = _shifted_discs(60, rng)
    X_te, y_te, shifts = _shifted_discs(30, rng)
    qr = QualityRegressor(LogitSegmenter(), regressor=LinearRegression(),
                          target_transform="identity").fit(X, y)
    true = dice_score(X_te.argmax(axis=1), y_te, n_classes=3)[:, 0]
    pred = qr.predict(X_te)[:, 0]
    assert stats.spearmanr(pred, true)[0] > 0.95
    assert stats.spearmanr(pred, shifts)[0] < -0.95
    assert np.abs(pred - true).mean() < 0.05
    # class 2 is never predicted nor true: target = empty_score = 1
    np.testing.assert_allclose(qr.predict(X_te)[:, 1], 1.0, atol=1e-6)


def test_default_regressor_and_sklearn_regressors():
    X = _logit_images(n=12)
    y = _labels(X)
    qr = QualityRegressor(LogitSegmenter()).fit(X, y)
    q = qr.predict(X)
    assert q.shape == (12, 2) and 0 <= q.min() and q.max() <= 1
    assert qr.input_kind_ == "features" and set(qr.fit_report_) >= {"mae", "pearson_r"}
    # the default: trees + ridge averaged, one per output class
    assert isinstance(qr.regressor_, MultiOutputRegressor)
    assert [type(e).__name__ for e in qr.regressor_.estimators_[0].estimators_] == [
        "ExtraTreesRegressor", "Pipeline"]
    ridge = QualityRegressor(LogitSegmenter(), regressor=Ridge(alpha=3.0)).fit(X, y)
    assert isinstance(ridge.regressor_, Ridge) and ridge.regressor_.alpha == 3.0
    hgb = QualityRegressor(LogitSegmenter(),
                           regressor=HistGradientBoostingRegressor(max_iter=5)).fit(X, y)
    assert isinstance(hgb.regressor_, MultiOutputRegressor)
    assert hgb.predict(X).shape == (12, 2)


# --------------------------------------------------------------------------- flag
class Preset(MultiOutput):
    def __init__(self, values=None):
        self.values = values

    def fit(self, X, y):
        return self

    def predict(self, X):
        return np.asarray(self.values, dtype=float)


@pytest.mark.parametrize("target", ["dice", "iou"])
def test_flag_semantics(target):
    X = _logit_images(n=3)
    y = _labels(X)
    values = [[0.9, 0.85], [0.95, 0.7], [0.75, 0.78]]
    qr = QualityRegressor(LogitSegmenter(), regressor=Preset(values), target=target,
                          target_transform="identity").fit(X, y)
    np.testing.assert_allclose(qr.predict(X), values)
    v = np.array(values)
    dice = v if target == "dice" else 2 * v / (1 + v)
    np.testing.assert_array_equal(qr.flag(X, min_dice=0.8), (dice < 0.8).any(axis=1))
    np.testing.assert_array_equal(qr.flag(X, min_dice=0.8, reduce="mean"),
                                  dice.mean(axis=1) < 0.8)
    if target == "dice":
        np.testing.assert_array_equal(qr.flag(X), [False, True, True])
        np.testing.assert_array_equal(qr.flag(X, reduce="mean"), [False, False, True])
    assert not qr.flag(X, min_dice=0.0).any() and qr.flag(X, min_dice=1.0).all()


# --------------------------------------------------------------------------- ONNX regressor
def _onnx_regressor(path, in_channels, n_out, rank=4, seed=0):
    """GlobalAveragePool -> Flatten -> MatMul -> Sigmoid; returns the weight matrix too."""
    w = np.random.default_rng(seed).standard_normal((in_channels, n_out)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["maps"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["quality"])]
    sp = [f"s{i}" for i in range(rank - 2)]
    graph = helper.make_graph(
        nodes, "quality", [helper.make_tensor_value_info("maps", TensorProto.FLOAT,
                                                         ["N", in_channels, *sp])],
        [helper.make_tensor_value_info("quality", TensorProto.FLOAT, ["N", n_out])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path), w


def test_onnx_regressor_path(tmp_path):
    X = _logit_images(n=5)
    y = _labels(X)
    path, w = _onnx_regressor(tmp_path / "q.onnx", 3 + 3 + 1, 2)
    qr = QualityRegressor(LogitSegmenter(), regressor=path).fit(X, y)
    assert qr.input_kind_ == "maps" and qr.regressor_ == path
    proba = _softmax(X.astype(np.float64))
    ent = -xlogy(proba, proba).sum(axis=1) / np.log(3)
    maps = np.concatenate([X, proba, ent[:, None]], axis=1)
    want = expit(maps.mean(axis=(2, 3)) @ w)
    np.testing.assert_allclose(qr.predict(X), want, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(maps_input(X, proba, ent * np.log(3), "entropy"), maps, rtol=1e-5,
                               atol=1e-6)
    clone(qr)
    again = pickle.loads(pickle.dumps(qr))  # the session is dropped and rebuilt
    np.testing.assert_allclose(again.predict(X), qr.predict(X))


def test_onnx_regressor_wrong_shapes(tmp_path):
    X = _logit_images(n=4)
    y = _labels(X)
    path, _ = _onnx_regressor(tmp_path / "wrong_out.onnx", 7, 3)
    with pytest.raises(ValueError, match=r"output shape \(N, K - 1\) = \(1, 2\), got \(1, 3\)"):
        QualityRegressor(LogitSegmenter(), regressor=path).fit(X, y)
    path, _ = _onnx_regressor(tmp_path / "wrong_in.onnx", 5, 2)
    with pytest.raises(ValueError, match="takes 5 input channels, expected 7"):
        QualityRegressor(LogitSegmenter(), regressor=path).fit(X, y)
    path, _ = _onnx_regressor(tmp_path / "wrong_rank.onnx", 7, 2, rank=5)
    with pytest.raises(ValueError, match="rank-5 input"):
        QualityRegressor(LogitSegmenter(), regressor=path).fit(X, y)
    with pytest.raises(ValueError, match="regressor_input='features'"):
        QualityRegressor(LogitSegmenter(), regressor=path, regressor_input="features").fit(X, y)


def test_maps_regressor_object_receives_stacked_maps():
    X = _logit_images(n=4)
    y = _labels(X)
    qr = QualityRegressor(LogitSegmenter(), regressor=Recorder(), regressor_input="maps").fit(X, y)
    assert qr.regressor_.X_seen_.shape == (4, 7, 16, 16)
    np.testing.assert_allclose(qr.regressor_.y_seen_,
                               np.nan_to_num(dice_score(X.argmax(1), y, n_classes=3), nan=1.0))


# --------------------------------------------------------------------------- estimator rules
def test_clone_pickle_not_fitted():
    X = _logit_images(n=6)
    y = _labels(X)
    qr = QualityRegressor(LogitSegmenter(), regressor=Ridge(), n_bins=4)
    with pytest.raises(NotFittedError):
        qr.predict(X)
    with pytest.raises(NotFittedError):
        qr.flag(X)
    c = clone(qr)
    assert c.get_params()["n_bins"] == 4 and not hasattr(c, "regressor_")
    qr.fit(X, y)
    again = pickle.loads(pickle.dumps(qr))
    np.testing.assert_allclose(again.predict(X), qr.predict(X))
    assert qr.set_params(n_bins=6).n_bins == 6


def test_errors():
    X = _logit_images(n=4)
    y = _labels(X)
    seg = LogitSegmenter()
    with pytest.raises(ValueError, match=r"y has shape \(4, 8, 8\), expected \(4, 16, 16\)"):
        QualityRegressor(seg).fit(X, y[:, :8, :8])
    with pytest.raises(ValueError, match=r"labels in \[0, 5\].*3 classes"):
        QualityRegressor(seg).fit(X, np.where(y == 2, 5, y))
    with pytest.raises(ValueError, match="target must be one of"):
        QualityRegressor(seg, target="jaccard").fit(X, y)
    with pytest.raises(ValueError, match="needs an ensemble"):
        QualityRegressor(seg, uncertainty="mutual_information").fit(X, y)
    with pytest.raises(ValueError, match="uncertainty must be"):
        QualityRegressor(seg, uncertainty="std").fit(X, y)
    with pytest.raises(ValueError, match="n_bins must be a positive integer"):
        QualityRegressor(seg, n_bins=0).fit(X, y)
    with pytest.raises(ValueError, match="empty_score"):
        QualityRegressor(seg, empty_score=2).fit(X, y)
    with pytest.raises(TypeError, match="object with fit and predict"):
        QualityRegressor(seg, regressor=object()).fit(X, y)
    with pytest.raises(TypeError, match="segmenter with predict_proba"):
        QualityRegressor(object()).fit(X, y)
    with pytest.raises(TypeError, match="integer class labels"):
        QualityRegressor(seg).fit(X, y + 0.5)
    qr = QualityRegressor(seg, regressor=Ridge()).fit(X, y)
    with pytest.raises(ValueError, match="min_dice"):
        qr.flag(X, min_dice=1.5)
    with pytest.raises(ValueError, match="reduce must be"):
        qr.flag(X, reduce="all")


# --------------------------------------------------------------------------- make_quality_set
def test_make_quality_set_shapes_and_info():
    rng = np.random.default_rng(0)
    X = rng.random((3, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 3, (3, 16, 16))
    Xw, yw, info = make_quality_set(X, y, corruptions=["blur", "noise"], severities=[0.5, 1.0])
    assert Xw.shape == (15, 1, 16, 16) and yw.shape == (15, 16, 16) and Xw.dtype == np.float32
    np.testing.assert_array_equal(info["source"], np.tile(np.arange(3), 5))
    assert list(info["corruption"][::3]) == ["none", "blur", "blur", "noise", "noise"]
    np.testing.assert_array_equal(info["severity"][::3], [0, 0.5, 1.0, 0.5, 1.0])
    np.testing.assert_array_equal(yw[3:6], y)
    assert not np.allclose(Xw[3:6], Xw[:3])
    Xa, _, _ = make_quality_set(X, y, corruptions=["blur", "noise"], severities=[0.5, 1.0])
    np.testing.assert_array_equal(Xa, Xw)  # seeded
    with pytest.raises(ValueError, match="unknown"):
        make_quality_set(X, y, corruptions=["smear"])
    with pytest.raises(ValueError, match="severities"):
        make_quality_set(X, y, severities=[0.0])
    with pytest.raises(ValueError, match="shape"):
        make_quality_set(X, y[:2])


def test_make_quality_set_rotates_labels_with_the_image():
    y = np.zeros((2, 32, 32), int)
    y[:, 4:14, 6:26] = 1  # an off-centre bar: a rotation moves it
    y[1, 20:28, 10:14] = 2
    X = (y / 2.0)[:, None].astype(np.float32)
    Xw, yw, info = make_quality_set(X, y, corruptions=["rotate"], severities=[0.5], seed=3)
    for i in range(2):
        # foreground of the rotated image (intensities are renormalised per image)
        agree = ((Xw[2 + i, 0] > 0.25) == (yw[2 + i] > 0)).mean()
        assert agree > 0.97
        assert (yw[2 + i] != y[i]).mean() > 0.05  # the labels did move


def test_with_ensemble_segmenter(tiny_members):
    ensemble = pytest.importorskip("uqseg.ensemble")
    rng = np.random.default_rng(0)
    X = rng.random((5, 1, 8, 8)).astype(np.float32)
    y = rng.integers(0, 3, (5, 8, 8))
    ens = ensemble.EnsembleSegmenter(tiny_members).fit()
    qr = QualityRegressor(ens, regressor=Ridge()).fit(X, y)
    assert qr.uncertainty_kind_ == "mutual_information"
    col = dict(zip(qr.feature_names_, qr.features(X).T, strict=True))
    mi = ens.uncertainty(X, "mutual_information")
    np.testing.assert_allclose(col["mean_mutual_information"], mi.mean(axis=(1, 2)), rtol=1e-4,
                               atol=1e-7)
    assert qr.predict(X).shape == (5, 2)


# --------------------------------------------------------------------------- typicality
def _signature_by_hand(feats):
    """Spectral signature of (N, C, 32, 32) maps pooled 2 x 2 to 16 x 16 (an SVD per image)."""
    n, c = feats.shape[:2]
    pooled = feats.astype(np.float64).reshape(n, c, 16, 2, 16, 2).mean(axis=(3, 5))
    out = []
    for f in pooled:
        s = np.linalg.svd(f.reshape(c, -1), compute_uv=False)
        s = np.concatenate([s, np.zeros(c - len(s))])
        v = np.log(s + 1e-6)
        out.append(v / np.linalg.norm(v))
    return np.array(out)


def _distances_by_hand(sig, ref, k=5):
    rows = []
    for s in sig:
        d = sorted(float(np.linalg.norm(s - r)) for r in ref if np.linalg.norm(s - r) >= 1e-4)
        rows.append([d[0], np.mean(d[:k])])
    return np.array(rows)


def test_typicality_distances_leave_out_the_image_itself():
    from uqseg.quality import typicality_distances

    rng = np.random.default_rng(0)
    ref = rng.standard_normal((9, 4))
    q = np.vstack([ref[:3], rng.standard_normal((4, 4))])
    np.testing.assert_allclose(typicality_distances(q, ref), _distances_by_hand(q, ref))
    # a far-away image is far from its nearest reference
    far = typicality_distances(ref[:1] + 100.0, ref)
    assert far[0, 0] > 90


def test_typicality_features_single_segmenter(tiny_2d):
    rng = np.random.default_rng(0)
    X = rng.random((8, 1, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, (8, 32, 32))
    ref = rng.random((6, 1, 32, 32)).astype(np.float32)
    base = QualityRegressor(tiny_2d, typicality=False, atlas=False).fit(X, y)
    qr = QualityRegressor(tiny_2d, typicality=True, reference=ref, atlas=False).fit(X, y)
    assert not base.typicality_ and qr.typicality_
    assert qr.feature_names_[-2:] == ["typicality_nn1", "typicality_nn5"]
    seg = OnnxSegmenter(tiny_2d).fit()
    layer = qr.typicality_layer_
    assert layer in seg.feature_layers_
    R = _signature_by_hand(seg.run(ref, layers=[layer])[layer])
    np.testing.assert_allclose(qr.reference_signatures_, R, rtol=1e-6, atol=1e-9)
    Xq = np.concatenate([X[:3], ref[:2]])  # two reference images: leave-one-out distances
    S = _signature_by_hand(seg.run(Xq, layers=[layer])[layer])
    F = qr.features(Xq)
    np.testing.assert_allclose(F[:, -2:], _distances_by_hand(S, R), rtol=1e-5, atol=1e-8)
    # the other columns come from the same single pass and equal those without typicality
    np.testing.assert_allclose(F[:, :-2], base.features(Xq), rtol=1e-5, atol=1e-6)
    assert qr.predict(Xq).shape == (5, 2)
    # a list of images gives the same features
    np.testing.assert_allclose(qr.features(list(Xq)), F, rtol=1e-5, atol=1e-7)
    clone(qr)
    np.testing.assert_allclose(pickle.loads(pickle.dumps(qr)).features(Xq), F)


def test_typicality_ensemble_first_member_and_leave_one_out(tiny_members):
    ensemble = pytest.importorskip("uqseg.ensemble")
    rng = np.random.default_rng(1)
    X = rng.random((7, 1, 32, 32)).astype(np.float32)
    y = rng.integers(0, 3, (7, 32, 32))
    ens = ensemble.EnsembleSegmenter(tiny_members).fit()
    qr = QualityRegressor(ens, regressor=Ridge(), typicality=True, atlas=False).fit(X, y)
    first = OnnxSegmenter(tiny_members[0]).fit()
    S = _signature_by_hand(first.run(X, layers=[qr.typicality_layer_])[qr.typicality_layer_])
    # reference=None: the fitting images (Gram eigenvalues vs SVD: ~1e-5 apart in the log)
    np.testing.assert_allclose(qr.reference_signatures_, S, atol=1e-4)
    np.testing.assert_allclose(qr.features(X)[:, -2:], _distances_by_hand(S, S), atol=1e-4)
    # the fused ensemble gives the first member's features from its own pass: the member
    # alone is not run again, and the features do not change
    want = qr.features(X)
    qr.estimator_.clear_cache()
    qr.estimator_.members_[0].run = lambda *a, **k: 1 / 0
    assert qr.estimator_.fused_
    np.testing.assert_allclose(qr.features(X), want, atol=1e-6)


def test_typicality_errors(tiny_2d, tmp_path):
    X = _logit_images(4)
    y = np.zeros((4, 16, 16), int)
    with pytest.raises(ValueError, match="typicality"):
        QualityRegressor(LogitSegmenter(), typicality="yes").fit(X, y)
    with pytest.raises(TypeError, match="run\\(X, layers\\)"):
        QualityRegressor(LogitSegmenter(), typicality=True).fit(X, y)
    # "auto" turns it off where it cannot apply: a segmenter without features, a maps regressor
    assert not QualityRegressor(LogitSegmenter()).fit(X, y).typicality_
    Xo = np.random.default_rng(0).random((4, 1, 16, 16)).astype(np.float32)
    with pytest.raises(ValueError, match="feature regressor"):
        QualityRegressor(tiny_2d, regressor=Recorder(), regressor_input="maps",
                         typicality=True).fit(Xo, y)
    auto_maps = QualityRegressor(tiny_2d, regressor=Recorder(), regressor_input="maps").fit(Xo, y)
    assert not auto_maps.typicality_
    auto = QualityRegressor(tiny_2d).fit(Xo, y)  # an ONNX model with feature layers: on
    assert auto.typicality_ and auto.feature_names_[-2:] == ["typicality_nn1", "typicality_nn5"]


# --------------------------------------------------------------------------- atlas agreement
def _square(size=32, box=(8, 24, 10, 22), inner=(12, 20, 13, 19)):
    lab = np.zeros((size, size), np.int64)
    lab[box[0]:box[1], box[2]:box[3]] = 1
    lab[inner[0]:inner[1], inner[2]:inner[3]] = 2
    return lab


def test_atlas_maps_pool_and_centre():
    from uqseg.quality import ATLAS_GRID, atlas_maps

    lab = np.zeros((64, 64), np.int64)
    lab[0:16, 0:16] = 1  # a corner square: pooled to 8 x 8 cells, then moved to the centre
    m = atlas_maps(lab[None], 3)
    assert m.shape == (1, 2, ATLAS_GRID, ATLAS_GRID) and m.dtype == np.float32
    np.testing.assert_allclose(m[0, 0].sum(), 64.0, rtol=1e-5)  # 8 x 8 full cells, kept
    assert m[0, 1].sum() == 0
    cy, cx = ndimage.center_of_mass(m[0, 0])
    assert abs(cy - 15.5) < 1e-3 and abs(cx - 15.5) < 1e-3
    # any image size gives the grid; a list works too
    assert atlas_maps([lab, lab[:48, :40]], 3).shape == (2, 2, ATLAS_GRID, ATLAS_GRID)


def test_atlas_agreement_is_pose_invariant_and_sees_missing_tissue():
    from uqseg.quality import atlas_agreement, atlas_maps

    ref = atlas_maps(np.stack([_square(), _square(box=(4, 28, 6, 26))]), 3)
    same = atlas_agreement(ref[:1], ref)
    np.testing.assert_allclose(same[0], 1.0, atol=1e-6)  # itself: Dice 1 per class and jointly
    rotated = atlas_maps(np.rot90(_square())[None].copy(), 3)
    assert atlas_agreement(rotated, ref).min() > 0.97  # found again after a 90-degree turn
    shifted = atlas_maps(np.roll(_square(), (5, -4), axis=(0, 1))[None], 3)
    assert atlas_agreement(shifted, ref).min() > 0.97  # centroid alignment
    swapped = _square()
    swapped[swapped == 2] = 1  # class 2 predicted as class 1: confident and consistent
    got = atlas_agreement(atlas_maps(swapped[None], 3), ref)[0]
    assert got[1] == 0.0 and got[0] < 0.9 and got[2] < 0.5
    # hand check of the unrotated soft Dice with the second reference only
    A = ref[1].reshape(2, -1)
    P = atlas_maps(swapped[None], 3)[0].reshape(2, -1)
    dice0 = 2 * (P[0] * A[0]).sum() / (P[0].sum() + A[0].sum())
    excl = np.array([[True, False]])
    assert atlas_agreement(atlas_maps(swapped[None], 3), ref, excl)[0, 0] >= dice0 - 1e-6
    assert np.isneginf(atlas_agreement(ref[:1], ref, np.array([[True, True]]))).all()


def test_atlas_features_cross_fitted_at_fit_and_full_at_predict(tiny_2d):
    from uqseg.quality import _atlas_fit, atlas_agreement, atlas_maps

    rng = np.random.default_rng(3)
    X = rng.random((10, 1, 32, 32)).astype(np.float32)
    y = np.stack([_square(box=(4 + i, 26, 6, 24 + i % 3)) for i in range(5)] * 2)  # 5 maps x2
    assert not QualityRegressor(tiny_2d, regressor=Ridge()).fit(X, y).atlas_  # auto: no groups
    assert QualityRegressor(tiny_2d, regressor=Ridge()).fit(X, y, groups=np.arange(10)).atlas_
    qr = QualityRegressor(tiny_2d, regressor=Recorder(), typicality=False, atlas=True).fit(X, y)
    assert qr.atlas_ and qr.feature_names_[-3:] == ["atlas_dice_c1", "atlas_dice_c2",
                                                    "atlas_dice_joint"]
    assert qr.atlas_maps_.shape == (5, 2, 32, 32)  # the distinct maps only
    np.testing.assert_allclose(qr.atlas_maps_, atlas_maps(y[:5], 3), atol=1e-6)
    pred = OnnxSegmenter(tiny_2d).fit().predict(X)
    P = atlas_maps(pred, 3)
    # fit: each image against the 4 other blocks of distinct maps (5 maps -> 5 blocks of 1)
    block = np.arange(10) % 5
    want_fit = atlas_agreement(P, qr.atlas_maps_, block[:, None] == np.arange(5)[None, :])
    np.testing.assert_allclose(qr.regressor_.X_seen_[:, -3:], want_fit, atol=1e-6)
    keys = [str(i % 5) for i in range(10)]
    np.testing.assert_allclose(_atlas_fit(P, atlas_maps(y, 3), keys)[0], want_fit, atol=1e-6)
    # predict: the mean over blocks of the agreement without that block, as at fit time
    np.testing.assert_array_equal(qr.atlas_blocks_, np.arange(5))
    want = np.mean([atlas_agreement(P, qr.atlas_maps_, np.tile(np.arange(5) == b, (10, 1)))
                    for b in range(5)], axis=0)
    np.testing.assert_allclose(qr.features(X)[:, -3:], want, atol=1e-6)
    # groups: images 0-4 and 5-9 are two sources whose labels differ (like rotated copies);
    # with groups, an image never sees a map of its own group
    y2 = np.concatenate([y[:5], np.rot90(y[:5], axes=(1, 2))])
    g = np.r_[np.arange(5), np.arange(5)]
    qg = QualityRegressor(tiny_2d, regressor=Recorder(), typicality=False, atlas=True)
    qg.fit(X, y2, groups=g)
    assert qg.atlas_maps_.shape[0] == 10 and list(qg.atlas_blocks_) == list(range(5)) * 2
    excl = g[:, None] == qg.atlas_blocks_[None, :]
    np.testing.assert_allclose(qg.regressor_.X_seen_[:, -3:],
                               atlas_agreement(P, qg.atlas_maps_, excl), atol=1e-6)
    with pytest.raises(ValueError, match="groups must have one entry per image"):
        qg.fit(X, y2, groups=g[:4])
    np.testing.assert_allclose(pickle.loads(pickle.dumps(qr)).features(X), qr.features(X))


def test_atlas_auto_and_errors(tiny_2d, tiny_3d):
    rng = np.random.default_rng(4)
    X3 = rng.random((4, 1, 8, 8, 8)).astype(np.float32)
    y3 = rng.integers(0, 3, (4, 8, 8, 8))
    assert not QualityRegressor(tiny_3d, regressor=Ridge()).fit(X3, y3, groups=np.arange(4)).atlas_
    with pytest.raises(ValueError, match="atlas=True needs 2-D images"):
        QualityRegressor(tiny_3d, regressor=Ridge(), atlas=True).fit(X3, y3)
    X = rng.random((4, 1, 32, 32)).astype(np.float32)
    one = np.stack([_square()] * 4)  # a single distinct label map: nothing to cross-fit
    assert not QualityRegressor(tiny_2d, regressor=Ridge()).fit(X, one, groups=np.zeros(4)).atlas_
    with pytest.raises(ValueError, match="at least 2 distinct label maps"):
        QualityRegressor(tiny_2d, regressor=Ridge(), atlas=True).fit(X, one)
    two = np.stack([_square(), _square(box=(4, 28, 6, 26))] * 2)
    assert not QualityRegressor(tiny_2d, regressor=Ridge()).fit(X, two, groups=[7] * 4).atlas_
    with pytest.raises(ValueError, match="at least 2 groups"):
        QualityRegressor(tiny_2d, regressor=Ridge(), atlas=True).fit(X, two, groups=[7] * 4)
    with pytest.raises(ValueError, match="atlas must be 'auto', True or False"):
        QualityRegressor(tiny_2d, atlas="yes").fit(X, one)


def test_atlas_agreement_blocks_is_the_mean_of_leave_one_block_out_bests():
    from uqseg.quality import atlas_agreement, atlas_maps
    from uqseg.quality_atlas import ATLAS_ANGLES

    rng = np.random.default_rng(4)
    labels = rng.integers(0, 3, size=(9, 40, 36))
    labels[2] = 0  # an empty prediction
    ref = atlas_maps(labels[3:], 3)
    blocks = np.array([0, 0, 1, 2, 2, 1])
    got = atlas_agreement(atlas_maps(labels[:3], 3), ref, blocks=blocks)
    # by definition: for each block, the agreement with the references outside it
    want = np.mean([atlas_agreement(atlas_maps(labels[:3], 3), ref,
                                    exclude=np.tile(blocks == b, (3, 1)))
                    for b in np.unique(blocks)], axis=0)
    np.testing.assert_allclose(got, want, rtol=0, atol=0)
    assert len(ATLAS_ANGLES) > 1 and got.shape == (3, 3)
