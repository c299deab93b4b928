"""TemperatureCalibrator on sigmoid (binary and multi-label) outputs: temperatures against
scipy fits of the binary NLL, labels unchanged, ECE/NLL on an over-confident network,
persistence and the image estimator contract."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx_models import make_unet_like
from scipy.optimize import minimize_scalar
from scipy.special import expit
from sklearn.pipeline import make_pipeline

import uqseg
from uqseg import EnsembleSegmenter, OnnxSegmenter, TemperatureCalibrator
from uqseg.metrics import multilabel_report
from uqseg.utils.estimator_checks import check_image_estimator


def bern_nll(z, y, t):
    """Mean binary NLL of sigmoid(z / t), float64, from the definition."""
    u = np.asarray(z, np.float64) / t
    return float(np.mean(np.logaddexp(0, u) - y * u))


def ref_temperature(z, y):
    """The NLL-optimal temperature by scipy's bounded scalar search over log T."""
    res = minimize_scalar(lambda s: bern_nll(z, y, np.exp(s)), bounds=(np.log(1e-2), np.log(1e2)),
                          method="bounded", options={"xatol": 1e-8})
    return float(np.exp(res.x))


def synth(n=6, scales=(3.0, 0.5, 1.5), size=24, seed=0):
    """Logits whose channel c is ``scales[c]`` times too sharp (too flat below 1) for the
    indicators drawn from the true probabilities ``sigmoid(z / scales[c])``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, len(scales), size, size)).astype(np.float32) * 2
    y = rng.random(z.shape) < expit(z)
    s = np.asarray(scales, np.float32).reshape(1, -1, 1, 1)
    return z * s, y


def test_classwise_temperatures_match_scipy_per_channel():
    z, y = synth()
    cal = TemperatureCalibrator(mode="classwise", activation="sigmoid").fit(z, y)
    assert cal.activation_ == "sigmoid" and cal.n_classes_ == 3
    want = [ref_temperature(z[:, c], y[:, c]) for c in range(3)]
    np.testing.assert_allclose(cal.temperature_, want, rtol=1e-4)
    np.testing.assert_allclose(cal.temperature_, [3.0, 0.5, 1.5], rtol=0.1)
    # outputs in the sigmoid conventions, from the definition
    t = np.asarray(want, np.float32).reshape(1, -1, 1, 1)
    np.testing.assert_allclose(cal.transform(z), z / t, rtol=2e-4)
    np.testing.assert_allclose(cal.predict_proba(z), expit(z / t), atol=2e-5)
    pred = cal.predict(z)
    assert pred.dtype == np.bool_ and (pred == (z > 0)).all()  # masks never change
    nll_after = np.mean([bern_nll(z[:, c], y[:, c], want[c]) for c in range(3)])
    assert cal.nll_after_ == pytest.approx(nll_after, rel=1e-5)
    assert cal.nll_before_ == pytest.approx(bern_nll(z, y, 1.0), rel=1e-5)
    assert cal.score(z, y) == pytest.approx(-nll_after, rel=1e-5)


def test_global_temperature_is_the_pooled_binary_fit():
    z, y = synth(scales=(2.0, 2.0))
    cal = TemperatureCalibrator(activation="sigmoid").fit(z, y)
    assert cal.temperature_ == pytest.approx(ref_temperature(z, y), rel=1e-4)
    assert cal.temperature_ == pytest.approx(2.0, rel=0.1)
    # the fit-data ECE is the pooled binary ECE of the metrics module
    before = multilabel_report(expit(z), y, n_bins=15)["pooled"]["ece"]
    after = multilabel_report(cal.predict_proba(z), y, n_bins=15)["pooled"]["ece"]
    assert cal.ece_before_ == pytest.approx(before, abs=1e-3)
    assert cal.ece_after_ == pytest.approx(after, abs=1e-3)
    assert cal.ece_after_ < 0.5 * cal.ece_before_
    assert cal.temperature_map(z).shape == (6, 24, 24)


def test_one_channel_binary_targets_auto_and_probabilities():
    z, y = synth(scales=(2.5,))
    yb = y[:, 0].astype(np.int64)  # binary (N, *spatial) targets for one channel
    cal = TemperatureCalibrator().fit(z, yb)  # one channel: sigmoid by itself
    assert cal.activation_ == "sigmoid"
    assert cal.temperature_ == pytest.approx(ref_temperature(z, y), rel=1e-4)
    assert cal.predict(z).shape == z.shape
    # probabilities in: their logits are scaled (the clip at eps changes nothing here)
    proba = TemperatureCalibrator(input_kind="proba").fit(expit(z.astype(np.float64)), yb)
    assert proba.temperature_ == pytest.approx(cal.temperature_, rel=1e-3)
    with pytest.raises(ValueError, match="looks like probabilities"):
        TemperatureCalibrator().fit(expit(z), yb)


def test_ignore_index_and_roi_fit_on_the_kept_entries():
    z, y = synth(seed=3)
    yi = y.astype(np.int64)
    rng = np.random.default_rng(4)
    hole = rng.random(y.shape) < 0.3
    yi[hole] = 255
    cal = TemperatureCalibrator(mode="classwise", activation="sigmoid",
                                ignore_index=255).fit(z, yi)
    want = [ref_temperature(z[:, c][~hole[:, c]], y[:, c][~hole[:, c]]) for c in range(3)]
    np.testing.assert_allclose(cal.temperature_, want, rtol=1e-4)
    # ROI: the box of any channel's foreground, grown by the margin, for every channel
    yr = np.zeros_like(y)
    yr[:, 1, 8:12, 10:14] = True
    roi = np.zeros(y.shape[:1] + y.shape[2:], bool)
    roi[:, 6:14, 8:16] = True
    cal = TemperatureCalibrator(activation="sigmoid", roi="foreground", margin=2).fit(z, yr)
    zz = np.moveaxis(z, 1, -1)[roi]
    yy = np.moveaxis(yr, 1, -1)[roi]
    assert cal.temperature_ == pytest.approx(ref_temperature(zz, yy), rel=1e-4)


def test_sampled_and_streamed_fits_stay_close():
    z, y = synth(n=8, size=32, seed=5)
    full = TemperatureCalibrator(mode="classwise", activation="sigmoid").fit(z, y)
    small = TemperatureCalibrator(mode="classwise", activation="sigmoid",
                                  max_voxels=8000).fit(z, y)
    assert small.n_voxels_sampled_ <= 8000 < small.n_voxels_fit_ == z.size
    np.testing.assert_allclose(small.temperature_, full.temperature_, rtol=0.1)
    part = TemperatureCalibrator(mode="classwise", activation="sigmoid")
    for s in range(0, 8, 3):
        part.partial_fit(z[s:s + 3], y[s:s + 3])
    assert part.n_voxels_fit_ == z.size
    np.testing.assert_allclose(part.temperature_, full.temperature_, rtol=1e-3)  # warm starts


def test_target_kind_mismatch_and_local_mode_errors():
    z, y = synth()
    with pytest.raises(ValueError, match="3 independent sigmoid channels: y must be indicator"):
        TemperatureCalibrator(activation="sigmoid").fit(z, y.argmax(axis=1))
    with pytest.raises(ValueError, match="softmax logits over 3 exclusive classes: y must be "
                                         "class labels.*activation='sigmoid'"):
        TemperatureCalibrator().fit(z, y)
    with pytest.raises(ValueError, match="holds labels in \\[0, 2\\]"):
        TemperatureCalibrator(activation="sigmoid").fit(z, y.astype(int) * 2)
    with pytest.raises(ValueError, match="activation must be"):
        TemperatureCalibrator(activation="relu").fit(z, y)
    cal = TemperatureCalibrator(activation="sigmoid").fit(z, y)
    with pytest.raises(ValueError, match="fitted with 3"):
        cal.predict(z[:, :2])


def margin_dependent(n, seed):
    """Logits whose over-confidence grows with the margin, more in channel 1: the true
    probability is ``sigmoid(z / s)`` with ``s = 1 + |z| / 2`` (channel 0) or ``1 + |z|``."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 2, 24, 24)).astype(np.float32) * 3
    s = 1 + np.abs(z) * np.array([0.5, 1.0], np.float32).reshape(1, 2, 1, 1)
    return z, rng.random(z.shape) < expit(z / s)


def test_local_mode_maps_one_temperature_per_channel():
    z, y = margin_dependent(6, 10)
    zt, yt = margin_dependent(6, 11)
    loc = TemperatureCalibrator(mode="local", activation="sigmoid", alpha=1e-4).fit(z, y)
    assert loc.feature_names_[-1] == "channel[1]" and "class[1]" in loc.feature_names_
    tmap = loc.temperature_map(zt)
    assert tmap.shape == zt.shape and (tmap > 0).all()
    # the fit's NLL is the binary NLL of sigmoid(z / T(x)) from the map (all entries kept)
    u = z.astype(np.float64) / loc.temperature_map(z)
    assert loc.nll_after_ == pytest.approx(float(np.mean(np.logaddexp(0, u) - y * u)), rel=1e-4)
    np.testing.assert_allclose(loc.predict_proba(zt), expit(zt / tmap), atol=1e-5)
    np.testing.assert_allclose(loc.transform(zt), zt / tmap, rtol=1e-4)
    assert (loc.predict(zt) == (zt > 0)).all()  # masks never change
    # over-confidence grows with the margin: the map follows it, and beats one T per channel
    assert np.corrcoef(np.abs(zt).ravel(), tmap.ravel())[0, 1] > 0.5
    cw = TemperatureCalibrator(mode="classwise", activation="sigmoid").fit(z, y)
    assert loc.score(zt, yt) > cw.score(zt, yt) + 0.005
    ece = [multilabel_report(c.predict_proba(zt), yt)["pooled"]["ece"] for c in (cw, loc)]
    assert ece[1] < ece[0]


def test_local_sigmoid_with_a_segmenter_saves_and_streams(sig_net, tmp_path):
    path, X, y = sig_net
    seg = OnnxSegmenter(path, activation="sigmoid")
    cal = TemperatureCalibrator(seg, mode="local").fit(X[:8], y[:8])
    assert "intensity[0]" in cal.feature_names_
    uqseg.save(cal, tmp_path / "loc")
    back = uqseg.load(tmp_path / "loc")
    np.testing.assert_array_equal(back.predict_proba(X[8:]), cal.predict_proba(X[8:]))
    part = TemperatureCalibrator(seg, mode="local")
    part.partial_fit(X[:4], y[:4]).partial_fit(X[4:8], y[4:8])
    np.testing.assert_allclose(part.temperature_map(X[8:]), cal.temperature_map(X[8:]),
                               rtol=1e-2)
    check_image_estimator(TemperatureCalibrator(seg, mode="local"), X[:6], y[:6])


# ------------------------------------------------------------------ a sigmoid network
def scaled(model: onnx.ModelProto, factor: float) -> onnx.ModelProto:
    """The same network with its logits multiplied by ``factor`` (over-confident for > 1)."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        node.output[:] = ["pre" if o == "logits" else o for o in node.output]
    m.graph.initializer.append(numpy_helper.from_array(np.float32(factor), "factor"))
    m.graph.node.append(helper.make_node("Mul", ["pre", "factor"], ["logits"]))
    onnx.checker.check_model(m)
    return m


@pytest.fixture(scope="module")
def sig_net(tmp_path_factory):
    """A 3-label sigmoid net whose logits are 4x too sharp, with targets drawn from the
    probabilities of the unscaled net (so T = 4 calibrates it exactly)."""
    d = tmp_path_factory.mktemp("sigcal")
    base = make_unet_like(n_classes=3, seed=7)
    onnx.save(base, d / "base.onnx")
    path = str(d / "sharp.onnx")
    onnx.save(scaled(base, 4.0), path)
    rng = np.random.default_rng(8)
    X = rng.standard_normal((24, 1, 16, 16)).astype(np.float32) * 2
    p = OnnxSegmenter(str(d / "base.onnx"), activation="sigmoid").fit().predict_proba(X)
    y = rng.random(p.shape) < p
    return path, X, y


def test_over_confident_sigmoid_network_is_calibrated(sig_net):
    path, X, y = sig_net
    seg = OnnxSegmenter(path, activation="sigmoid").fit()
    Xv, yv, Xt, yt = X[:12], y[:12], X[12:], y[12:]
    cal = TemperatureCalibrator(seg, mode="classwise").fit(Xv, yv)
    np.testing.assert_allclose(cal.temperature_, 4.0, rtol=0.15)
    raw = multilabel_report(seg.predict_proba(Xt), yt)["pooled"]
    new = multilabel_report(cal.predict_proba(Xt), yt)["pooled"]
    # measured: ECE 0.160 -> 0.011, NLL 0.799 -> 0.675 (the targets are noisy: NLL stays high)
    assert new["ece"] < 0.3 * raw["ece"] and new["nll"] < 0.9 * raw["nll"]
    assert (cal.predict(Xt) == seg.predict(Xt)).all()


def test_sigmoid_calibrator_saves_loads_and_passes_the_estimator_checks(sig_net, tmp_path):
    path, X, y = sig_net
    seg = OnnxSegmenter(path, activation="sigmoid")
    cal = TemperatureCalibrator(seg, mode="classwise").fit(X[:8], y[:8])
    uqseg.save(cal, tmp_path / "cal")
    back = uqseg.load(tmp_path / "cal")
    assert back.activation_ == "sigmoid"
    np.testing.assert_array_equal(back.temperature_, cal.temperature_)
    np.testing.assert_array_equal(back.predict_proba(X[8:]), cal.predict_proba(X[8:]))
    # a folder whose activation_ disagrees with its segmenter's outputs is refused
    import json

    man = tmp_path / "cal" / "manifest.json"
    doc = json.loads(man.read_text())
    assert doc["root"]["fitted"]["activation_"] == "sigmoid"
    doc["root"]["fitted"]["activation_"] = "softmax"
    man.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="activation_: does not match"):
        uqseg.load(tmp_path / "cal")
    check_image_estimator(TemperatureCalibrator(seg, mode="classwise"), X[:6], y[:6])


def test_sigmoid_scores_estimator_checks():
    z, y = synth(n=4, size=16)
    int_scores = "integer scores are refused on purpose"
    check_image_estimator(TemperatureCalibrator(activation="sigmoid"), z, y,
                          expected_failed_checks={"check_dtype_int": int_scores})


def test_ensemble_pipeline_and_kind_mismatch_with_a_segmenter(sig_net, tmp_path):
    path, X, y = sig_net
    other = str(tmp_path / "other.onnx")
    onnx.save(scaled(make_unet_like(n_classes=3, seed=9), 4.0), other)
    ens = EnsembleSegmenter([OnnxSegmenter(m, activation="sigmoid") for m in (path, other)])
    pipe = make_pipeline(ens, TemperatureCalibrator(activation="sigmoid")).fit(X[:8], y[:8])
    proba = pipe.predict_proba(X[8:])
    assert proba.shape == y[8:].shape and (pipe.predict(X[8:]) == ens.fit().predict(X[8:])).all()
    seg = OnnxSegmenter(path, activation="sigmoid")
    with pytest.raises(ValueError, match="independent sigmoid channels: y must be indicator"):
        TemperatureCalibrator(seg).fit(X[:4], y[:4].argmax(axis=1))
    with pytest.raises(ValueError, match="activation='softmax' but the segmenter's outputs are "
                                         "sigmoid"):
        TemperatureCalibrator(seg, activation="softmax").fit(X[:4], y[:4])
    soft = OnnxSegmenter(path, activation="softmax")
    with pytest.raises(ValueError, match="exclusive classes: y must be class labels"):
        TemperatureCalibrator(soft).fit(X[:4], y[:4])


def test_ece_objective_finds_the_grid_minimum_of_the_pooled_binary_ece():
    z, y = synth(scales=(2.5, 1.5), seed=7)
    cal = TemperatureCalibrator(activation="sigmoid", objective="ece").fit(z, y)
    grid = np.exp(np.linspace(np.log(0.5), np.log(8), 161))
    eces = [multilabel_report(expit(z / t), y, n_bins=15)["pooled"]["ece"] for t in grid]
    assert cal.ece_after_ <= min(eces) + 1e-3
    after = multilabel_report(cal.predict_proba(z), y, n_bins=15)["pooled"]["ece"]
    assert after == pytest.approx(cal.ece_after_, abs=1e-3)


def test_3d_scores_and_lists_of_differently_sized_images():
    rng = np.random.default_rng(12)
    z = rng.normal(size=(3, 2, 6, 8, 8)).astype(np.float32) * 3
    y = rng.random(z.shape) < expit(z / 3)
    cal = TemperatureCalibrator(mode="classwise", activation="sigmoid").fit(z, y)
    np.testing.assert_allclose(cal.temperature_, [ref_temperature(z[:, c], y[:, c])
                                                  for c in range(2)], rtol=1e-4)
    # a list of images of two sizes: the same entries, the same temperatures
    zs = [z[0], z[1, :, :4], z[2, :, 2:]]
    ys = [y[0], y[1, :, :4], y[2, :, 2:]]
    lst = TemperatureCalibrator(mode="classwise", activation="sigmoid").fit(zs, ys)
    flat = np.concatenate([v.reshape(2, -1) for v in zs], axis=1)
    flat_y = np.concatenate([v.reshape(2, -1) for v in ys], axis=1)
    np.testing.assert_allclose(lst.temperature_, [ref_temperature(flat[c], flat_y[c])
                                                  for c in range(2)], rtol=1e-4)
    out = lst.predict_proba(zs)
    assert [o.shape for o in out] == [v.shape for v in zs]
