"""TemperatureCalibrator: recovery of known temperatures, sampling, streaming, sklearn glue."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
from scipy.optimize import approx_fprime, minimize_scalar
from scipy.special import log_softmax
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline

from uqseg import metrics
from uqseg.calibration import TemperatureCalibrator, _nll_and_grad, _water_fill
from uqseg.segmenter import OnnxSegmenter


def softmax(z, axis=1):
    return np.exp(log_softmax(np.asarray(z, np.float64), axis=axis))


def synth(seed, n=4, k=3, shape=(48, 48), scale=2.0, temps=None):
    """True logits z, labels drawn from softmax(z), and the over-/under-confident logits
    ``z * T0`` (T0 scalar or one per class) a calibrator should undo."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k, *shape)) * scale
    z[:, 0] += 1.0  # a dominant "background" class, as in segmentation
    cum = softmax(z).cumsum(axis=1)[:, :-1]
    y = (cum < rng.random((n, 1, *shape))).sum(axis=1)
    t0 = np.ones(k) if temps is None else np.broadcast_to(np.asarray(temps, float), (k,))
    shown = (z * t0.reshape(1, k, *[1] * len(shape))).astype(np.float32)
    return z, shown, y


def ref_nll(logits, y, mask=None):
    lp = log_softmax(np.asarray(logits, np.float64), axis=1)
    nll = -np.take_along_axis(lp, y[:, None], axis=1)[:, 0]
    return float(nll.mean() if mask is None else nll[mask].mean())


def ref_temperature(logits, y, mask=None):
    """Independent global fit: bounded scalar search of the NLL over T."""
    res = minimize_scalar(lambda t: ref_nll(logits / t, y, mask), bounds=(0.05, 20),
                          method="bounded", options={"xatol": 1e-6})
    return res.x


# ---------------------------------------------------------------------- recovery
@pytest.mark.parametrize("shape", [(48, 48), (12, 16, 16)])
@pytest.mark.parametrize("t0", [0.5, 3.0])
def test_global_recovers_known_temperature(shape, t0):
    _, shown, y = synth(0, shape=shape, temps=t0)
    cal = TemperatureCalibrator().fit(shown, y)
    assert cal.temperature_ == pytest.approx(t0, rel=0.04)
    assert cal.temperature_ == pytest.approx(ref_temperature(shown, y), rel=1e-4)
    assert isinstance(cal.temperature_, float)
    assert cal.n_classes_ == 3 and cal.n_voxels_fit_ == y.size == cal.n_voxels_sampled_


def test_global_keeps_labels_and_lowers_ece_on_held_out_data():
    _, shown, y = synth(1, temps=4.0)
    _, shown_te, y_te = synth(2, temps=4.0)
    cal = TemperatureCalibrator().fit(shown, y)
    np.testing.assert_array_equal(cal.predict(shown_te), shown_te.argmax(axis=1))
    proba = cal.predict_proba(shown_te)
    np.testing.assert_array_equal(proba.argmax(axis=1), shown_te.argmax(axis=1))
    raw = softmax(shown_te).astype(np.float32)
    ece_before = metrics.expected_calibration_error(raw, y_te)
    ece_after = metrics.expected_calibration_error(proba, y_te)
    assert ece_after < 0.3 * ece_before
    assert metrics.negative_log_likelihood(proba, y_te) < metrics.negative_log_likelihood(raw,
                                                                                          y_te)


def test_ece_objective_finds_the_lowest_ece_temperature():
    _, shown, y = synth(3, temps=2.5)
    cal = TemperatureCalibrator(objective="ece").fit(shown, y)
    proba = cal.predict_proba(shown)
    np.testing.assert_array_equal(proba.argmax(axis=1), shown.argmax(axis=1))
    ece = metrics.expected_calibration_error(proba, y)
    # the sample estimate is the metric itself when nothing is subsampled
    assert cal.ece_after_ == pytest.approx(ece, abs=1e-6)
    assert cal.ece_before_ == pytest.approx(
        metrics.expected_calibration_error(softmax(shown).astype(np.float32), y), abs=1e-6)
    # an independent dense scan of T finds nothing better
    grid = np.exp(np.linspace(np.log(0.5), np.log(8), 400))
    scan = min(metrics.expected_calibration_error(softmax(shown / t).astype(np.float32), y)
               for t in grid)
    assert ece <= scan + 1e-4
    nll = TemperatureCalibrator().fit(shown, y)
    assert cal.ece_after_ <= nll.ece_after_ + 1e-9
    assert cal.nll_after_ >= nll.nll_after_ - 1e-9  # the NLL fit is the NLL optimum
    assert cal.temperature_ == pytest.approx(2.5, rel=0.1)


def test_classwise_recovers_per_class_temperatures():
    temps = [2.0, 0.7, 1.5]
    _, shown, y = synth(3, n=8, shape=(64, 64), temps=temps)
    cal = TemperatureCalibrator(mode="classwise").fit(shown, y)
    assert cal.temperature_.shape == (3,)
    np.testing.assert_allclose(cal.temperature_, temps, rtol=0.05)
    # vector scaling may change labels: here it must, since the classes are scaled unequally
    assert (cal.predict(shown) != shown.argmax(axis=1)).any()
    np.testing.assert_array_equal(cal.predict(shown), cal.predict_proba(shown).argmax(axis=1))
    assert cal.nll_after_ < cal.nll_before_


def test_classwise_with_equal_temperatures_matches_global():
    _, shown, y = synth(4, temps=2.0)
    glob = TemperatureCalibrator().fit(shown, y).temperature_
    cw = TemperatureCalibrator(mode="classwise").fit(shown, y).temperature_
    np.testing.assert_allclose(cw, glob, rtol=0.05)


# ---------------------------------------------------------------------- objective
@pytest.mark.parametrize("classwise", [False, True])
def test_gradient_matches_finite_differences(classwise):
    rng = np.random.default_rng(5)
    z = (rng.normal(size=(500, 4)) * 3).astype(np.float32)
    y = rng.integers(0, 4, 500).astype(np.int32)
    w = rng.random(500) + 0.5
    x0 = rng.normal(size=4 if classwise else 1) * 0.5
    f, g = _nll_and_grad(x0, z.T, y, w, classwise)  # the sample is class-major (K, n)
    num = approx_fprime(x0, lambda x: _nll_and_grad(x, z.T, y, w, classwise)[0], 1e-6)
    np.testing.assert_allclose(g, num, rtol=1e-4, atol=1e-6)
    # the loss itself: weighted mean of -log softmax(z / T)_y
    t = np.exp(x0)
    lp = log_softmax(z.astype(np.float64) / t, axis=1)
    assert f == pytest.approx(float(w @ -lp[np.arange(500), y] / w.sum()), rel=1e-10)


def test_water_fill_cap():
    assert _water_fill(np.array([5, 10]), 20) == np.inf
    counts = np.array([3, 100, 50, 0])
    cap = _water_fill(counts, 63)
    assert cap == 30 and np.minimum(counts, cap).sum() <= 63


# ---------------------------------------------------------------------- sampling, streaming
def test_sampled_fit_is_close_to_exact_and_within_budget():
    _, shown, y = synth(6, n=8, shape=(64, 64), temps=2.5)
    exact = TemperatureCalibrator().fit(shown, y)
    small = TemperatureCalibrator(max_voxels=4000, random_state=1).fit(shown, y)
    assert small.n_voxels_sampled_ <= 4000 < small.n_voxels_fit_ == y.size
    assert small.temperature_ == pytest.approx(exact.temperature_, rel=0.05)
    # the stratum weights make the sample's NLL an unbiased estimate of the full NLL
    assert small.nll_before_ == pytest.approx(ref_nll(shown, y), rel=0.05)
    counts = small.sample_["counts"]
    assert counts.sum() == y.size
    held = np.bincount(small.sample_["strata"], minlength=counts.size)
    assert np.all(held <= counts)
    rare = (counts > 0) & (counts < 50)
    np.testing.assert_array_equal(held[rare], counts[rare])  # rare strata are kept whole


def test_partial_fit_over_batches_equals_fit():
    _, shown, y = synth(7, n=6, temps=2.0)
    full = TemperatureCalibrator().fit(shown, y)
    inc = TemperatureCalibrator()
    for s in range(0, 6, 2):
        inc.partial_fit(shown[s:s + 2], y[s:s + 2])
    assert inc.n_voxels_fit_ == full.n_voxels_fit_
    assert inc.temperature_ == pytest.approx(full.temperature_, rel=1e-5)
    # with subsampling the keys differ per call, so only approximately
    inc_s = TemperatureCalibrator(max_voxels=3000)
    for s in range(0, 6, 2):
        inc_s.partial_fit(shown[s:s + 2], y[s:s + 2])
    assert inc_s.n_voxels_sampled_ <= 3000
    assert inc_s.temperature_ == pytest.approx(full.temperature_, rel=0.06)


def test_fit_streams_in_small_batches_with_the_same_result():
    _, shown, y = synth(8, n=5, temps=1.7)
    a = TemperatureCalibrator(batch_size=1).fit(shown, y).temperature_
    b = TemperatureCalibrator(batch_size=8).fit(shown, y).temperature_
    assert a == pytest.approx(b, rel=1e-6)


# ---------------------------------------------------------------------- options
def test_proba_input_gives_the_logit_temperature():
    _, shown, y = synth(9, temps=2.0)
    t_logits = TemperatureCalibrator().fit(shown, y).temperature_
    p = softmax(shown).astype(np.float32)
    cal = TemperatureCalibrator(input_kind="proba").fit(p, y)
    assert cal.temperature_ == pytest.approx(t_logits, rel=1e-3)
    # documented: probabilities are clipped at eps before the log, then scaled
    ref = softmax(np.log(np.maximum(p.astype(np.float64), 1e-7)) / cal.temperature_)
    np.testing.assert_allclose(cal.predict_proba(p), ref, atol=1e-5)


def test_roi_and_ignore_index_fit_only_the_selected_voxels():
    _, shown, y = synth(10, temps=2.0)
    y = y.copy()
    y[:, :10] = 0  # background strip outside the ROI
    y[:, 30:] = 0
    box = metrics.foreground_roi(y, margin=2)
    cal = TemperatureCalibrator(roi="foreground", margin=2).fit(shown, y)
    assert cal.n_voxels_fit_ == int(box.sum()) < y.size
    assert cal.temperature_ == pytest.approx(ref_temperature(shown, y, box), rel=1e-4)
    y_ign = np.where(np.arange(48)[None, None, :] < 20, 255, y)
    cal = TemperatureCalibrator(ignore_index=255).fit(shown, y_ign)
    keep = y_ign != 255
    assert cal.n_voxels_fit_ == int(keep.sum())
    assert cal.temperature_ == pytest.approx(
        ref_temperature(shown, np.where(keep, y_ign, 0), keep), rel=1e-4)
    assert cal.score(shown, y_ign) == pytest.approx(
        -ref_nll(shown / cal.temperature_, np.where(keep, y_ign, 0), keep), rel=1e-4)


def test_transform_score_and_lists():
    _, shown, y = synth(11, temps=2.0)
    cal = TemperatureCalibrator().fit(shown, y)
    np.testing.assert_allclose(softmax(cal.transform(shown)), cal.predict_proba(shown),
                               atol=1e-5)
    assert cal.score(shown, y) == pytest.approx(-ref_nll(shown / cal.temperature_, y),
                                                rel=1e-4)
    assert cal.score(shown, y) > -ref_nll(shown, y)
    # a list of differently sized score maps gives a list back
    parts = [shown[0], shown[1, :, :20, :30]]
    out = cal.predict_proba(parts)
    assert [o.shape for o in out] == [(3, 48, 48), (3, 20, 30)]
    np.testing.assert_allclose(out[1], cal.predict_proba(shown[1:2, :, :20, :30])[0])
    cal_l = TemperatureCalibrator().fit(parts, [y[0], y[1, :20, :30]])
    mask_1 = np.zeros(y.shape[1:], bool)
    mask_1[:20, :30] = True
    ref = ref_temperature(np.concatenate([shown[0].reshape(3, -1),
                                          shown[1][:, mask_1]], axis=1)[None],
                          np.concatenate([y[0].ravel(), y[1][mask_1]])[None])
    assert cal_l.temperature_ == pytest.approx(ref, rel=1e-4)


# ---------------------------------------------------------------------- segmenters
def _labels_for(logits, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    cum = softmax(logits * scale).cumsum(axis=1)[:, :-1]
    return (cum < rng.random((logits.shape[0], 1, *logits.shape[2:]))).sum(axis=1)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(12).normal(size=(5, 1, 16, 16)).astype(np.float32)


def test_segmenter_path_and_estimator_none_agree(tiny_2d, images):
    seg = OnnxSegmenter(tiny_2d).fit()
    logits = seg.transform(images)
    y = _labels_for(logits)
    on_logits = TemperatureCalibrator().fit(logits, y)
    for est in (seg, OnnxSegmenter(tiny_2d), tiny_2d):
        cal = TemperatureCalibrator(est, batch_size=2).fit(images, y)
        assert cal.temperature_ == pytest.approx(on_logits.temperature_, rel=1e-6)
        np.testing.assert_allclose(cal.predict_proba(images), on_logits.predict_proba(logits),
                                   atol=1e-6)
        np.testing.assert_array_equal(cal.predict(images), seg.predict(images))
    assert cal.temperature_ == pytest.approx(2.0, rel=0.3)  # labels drawn at half the logits
    assert isinstance(cal.estimator_, OnnxSegmenter) and cal.estimator == tiny_2d


def test_segmenter_3d(tiny_3d):
    X = np.random.default_rng(13).normal(size=(2, 1, 8, 8, 8)).astype(np.float32)
    seg = OnnxSegmenter(tiny_3d).fit()
    y = _labels_for(seg.transform(X), scale=2.0)
    cal = TemperatureCalibrator(seg).fit(X, y)
    assert cal.temperature_ == pytest.approx(ref_temperature(seg.transform(X), y), rel=1e-4)
    assert cal.predict_proba(X).shape == (2, 3, 8, 8, 8)


def test_pipeline_after_a_segmenter(tiny_2d, images):
    seg = OnnxSegmenter(tiny_2d).fit()
    logits = seg.transform(images)
    y = _labels_for(logits)
    pipe = make_pipeline(OnnxSegmenter(tiny_2d), TemperatureCalibrator()).fit(images, y)
    direct = TemperatureCalibrator(seg).fit(images, y)
    assert pipe[-1].temperature_ == pytest.approx(direct.temperature_, rel=1e-6)
    np.testing.assert_allclose(pipe.predict_proba(images), direct.predict_proba(images),
                               atol=1e-6)
    np.testing.assert_array_equal(pipe.predict(images), logits.argmax(axis=1))
    assert pipe.score(images, y) == pytest.approx(direct.score(images, y), rel=1e-6)


class LogMeanProba:
    """Duck-typed ensemble: transform gives the log of the mean member probability."""

    def __init__(self, members):
        self.members = members

    def fit(self, X=None, y=None):
        self.members_ = [OnnxSegmenter(m).fit() for m in self.members]
        return self

    def transform(self, X):
        p = np.mean([m.predict_proba(X) for m in self.members_], axis=0)
        return np.log(p)

    def get_params(self, deep=True):
        return {"members": self.members}


def test_duck_typed_ensemble_and_its_pipeline(tiny_members, images):
    ens = LogMeanProba(tiny_members).fit()
    logp = ens.transform(images)
    y = _labels_for(logp, scale=3.0)
    ref = TemperatureCalibrator().fit(logp, y)
    cal = TemperatureCalibrator(ens).fit(images, y)
    assert cal.estimator_ is ens  # a fitted segmenter is used as is
    assert cal.temperature_ == pytest.approx(ref.temperature_, rel=1e-6)
    pipe = make_pipeline(LogMeanProba(tiny_members), TemperatureCalibrator()).fit(images, y)
    np.testing.assert_allclose(pipe.predict_proba(images), ref.predict_proba(logp), atol=1e-6)


# ---------------------------------------------------------------------- sklearn glue
def test_clone_get_params_and_pickle(tiny_2d, images):
    cal = TemperatureCalibrator(tiny_2d, mode="classwise", max_voxels=1000)
    assert cal.get_params()["mode"] == "classwise"
    assert clone(cal).get_params() == cal.get_params()
    y = _labels_for(OnnxSegmenter(tiny_2d).fit().transform(images))
    cal.fit(images, y)
    assert not hasattr(clone(cal), "temperature_")
    back = pickle.loads(pickle.dumps(cal))
    np.testing.assert_array_equal(back.temperature_, cal.temperature_)
    np.testing.assert_allclose(back.predict_proba(images), cal.predict_proba(images))
    # the unpickled sample continues streaming
    back.partial_fit(images, y)
    assert back.n_voxels_fit_ == 2 * cal.n_voxels_fit_
    back.set_params(mode="global").partial_fit(images, y)  # warm start across modes
    assert np.ndim(back.temperature_) == 0
    cal.set_params(mode="global").fit(images, y)
    assert np.ndim(cal.temperature_) == 0


# ---------------------------------------------------------------------- errors
def test_errors():
    _, shown, y = synth(14, n=2, shape=(8, 8))
    with pytest.raises(NotFittedError):
        TemperatureCalibrator().predict_proba(shown)
    with pytest.raises(ValueError, match="mode must be 'global' or 'classwise'"):
        TemperatureCalibrator(mode="vector").fit(shown, y)
    with pytest.raises(ValueError, match="input_kind"):
        TemperatureCalibrator(input_kind="probs").fit(shown, y)
    with pytest.raises(ValueError, match="roi"):
        TemperatureCalibrator(roi="box").fit(shown, y)
    with pytest.raises(ValueError, match="objective must be 'nll' or 'ece'"):
        TemperatureCalibrator(objective="brier").fit(shown, y)
    with pytest.raises(ValueError, match="objective='ece' fits one global temperature"):
        TemperatureCalibrator(mode="classwise", objective="ece").fit(shown, y)
    with pytest.raises(ValueError, match="n_bins must be an integer >= 1"):
        TemperatureCalibrator(objective="ece", n_bins=0).fit(shown, y)
    with pytest.raises(ValueError, match="max_voxels must be an integer >= 1"):
        TemperatureCalibrator(max_voxels=0).fit(shown, y)
    with pytest.raises(TypeError, match="estimator must be None, a path"):
        TemperatureCalibrator(estimator=3).fit(shown, y)
    with pytest.raises(ValueError, match=r"labels in \[1, 3\] but the model has 3 classes"):
        TemperatureCalibrator().fit(shown, np.where(y == 0, 3, y))
    with pytest.raises(ValueError, match=r"y has shape \(2, 8, 7\), expected \(2, 8, 8\)"):
        TemperatureCalibrator().fit(shown, y[:, :, :7])
    with pytest.raises(ValueError, match="X has 2 images but y has 3"):
        TemperatureCalibrator().fit(shown, np.concatenate([y, y[:1]]))
    bad = shown.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        TemperatureCalibrator().fit(bad, y)
    p = softmax(shown).astype(np.float32)
    with pytest.raises(ValueError, match="pass input_kind='proba'"):
        TemperatureCalibrator().fit(p, y)
    with pytest.raises(ValueError, match="outside \\[0, 1\\]; pass input_kind='logits'"):
        TemperatureCalibrator(input_kind="proba").fit(shown, y)
    with pytest.raises(ValueError, match="no voxel to fit"):
        TemperatureCalibrator(ignore_index=0).fit(shown, np.zeros_like(y))
    cal = TemperatureCalibrator().fit(shown, y)
    with pytest.raises(ValueError, match="4 classes on axis 1 but the calibrator was fitted "
                                         "with 3"):
        cal.predict(np.concatenate([shown, shown[:, :1]], axis=1))
    with pytest.raises(ValueError, match="4 classes"):
        cal.partial_fit(np.concatenate([shown, shown[:, :1]], axis=1), y)


def test_ensemble_segmenter_in_a_pipeline(tiny_members, images):
    ensemble = pytest.importorskip("uqseg.ensemble")
    ens = ensemble.EnsembleSegmenter(tiny_members).fit()
    logp = ens.transform(images)
    y = _labels_for(logp, scale=3.0)
    ref = TemperatureCalibrator().fit(logp, y)
    pipe = make_pipeline(ensemble.EnsembleSegmenter(tiny_members),
                         TemperatureCalibrator()).fit(images, y)
    assert pipe[-1].temperature_ == pytest.approx(ref.temperature_, rel=1e-6)
    np.testing.assert_allclose(pipe.predict_proba(images), ref.predict_proba(logp), atol=1e-6)
    cal = TemperatureCalibrator(ensemble.EnsembleSegmenter(tiny_members)).fit(images, y)
    assert cal.temperature_ == pytest.approx(ref.temperature_, rel=1e-6)


def test_save_and_load_without_pickle(tmp_path, tiny_2d, images):
    persistence = pytest.importorskip("uqseg.persistence")
    y = _labels_for(OnnxSegmenter(tiny_2d).fit().transform(images))
    cal = TemperatureCalibrator(tiny_2d, mode="classwise").fit(images, y)
    persistence.save(cal, tmp_path / "cal")
    back = persistence.load(tmp_path / "cal")
    np.testing.assert_array_equal(back.temperature_, cal.temperature_)
    np.testing.assert_allclose(back.predict_proba(images), cal.predict_proba(images))
    back.partial_fit(images, y)  # the saved sample continues
    assert back.n_voxels_fit_ == 2 * cal.n_voxels_fit_
