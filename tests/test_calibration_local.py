"""TemperatureCalibrator(mode="local"): features against an independent numpy reference, the
NLL gradient against finite differences, recovery of a known temperature map, labels never
changed, streaming, segmenters/ensembles/Pipelines, errors, and save/load of the fitted map."""

from __future__ import annotations

import hashlib
import io
import json
import shutil

import numpy as np
import pytest
from scipy import ndimage
from scipy.optimize import approx_fprime
from scipy.special import log_softmax, logsumexp, softmax
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline

import uqseg
from uqseg import EnsembleSegmenter, OnnxSegmenter, TemperatureCalibrator, _local, metrics
from uqseg.calibration import LOG_T_BOUNDS


def synth(seed, n=4, k=3, shape=(32, 32), scale=3.0):
    """Smooth random logits (so there are regions and boundaries) and labels drawn from them."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k, *shape))
    z = ndimage.gaussian_filter(z, (0, 0) + (2.0,) * len(shape)) * scale * 4
    z[:, 0] += 0.5
    cum = softmax(z, axis=1).cumsum(axis=1)[:, :-1]
    y = (cum < rng.random((n, 1, *shape))).sum(axis=1)
    return z.astype(np.float32), y


def shown_by_class(z, temps):
    """Logits as a network would show them if its temperature were ``temps[c]`` on the voxels
    it predicts as ``c``: ``z * T`` (labels drawn from ``softmax(z)``)."""
    t = np.asarray(temps, np.float32)[z.argmax(axis=1)]
    return (z * t[:, None]).astype(np.float32), t


# ---------------------------------------------------------------------- features
def ref_block(a, f, how):
    """Block reduce ``(H, W)`` by ``f`` (edge padding), via reshape."""
    h, w = a.shape
    a = np.pad(a, ((0, -h % f), (0, -w % f)), mode="edge")
    b = a.reshape(a.shape[0] // f, f, a.shape[1] // f, f)
    return b.any(axis=(1, 3)) if how == "any" else b.mean(axis=(1, 3))


def ref_features(z, scales, image=None):
    """Features of 2-D logits ``(n, K, H, W)``, one image at a time, written from the
    definitions in uqseg._local's docstring."""
    n, k, h, w = z.shape
    rows = {}
    zs = np.sort(z.astype(np.float64), axis=1)
    lm = np.log(zs[:, -1] - zs[:, -2] + _local.MARGIN_EPS)
    # entropy of the softmax of the logits averaged over 2 x 2 blocks
    zc = np.stack([[ref_block(z[i, c].astype(np.float64), 2, "mean") for c in range(k)]
                   for i in range(n)])
    p = softmax(zc, axis=1)
    le = np.log(np.maximum(-(p * log_softmax(zc, axis=1)).sum(axis=1), 0)
                + _local.ENTROPY_EPS)  # (n, H/2, W/2)
    lab = z.argmax(axis=1)
    rows["log_margin"] = lm
    rows["log_entropy"] = np.stack([np.kron(e, np.ones((2, 2)))[:h, :w] for e in le])
    for s in scales:
        f = _local.scale_factor(s)
        for name in ("log_margin", "log_entropy"):
            out = []
            for i in range(n):
                if name == "log_margin":
                    c = ref_block(lm[i], f, "mean")
                else:
                    c = ref_block(le[i], f // 2, "mean") if f > 2 else le[i]
                c = ndimage.gaussian_filter(c, s / f, truncate=3.0)
                out.append(np.kron(c, np.ones((f, f)))[:h, :w])
            rows[f"{name}@{s:g}"] = np.stack(out)
    f = _local.DIST_COARSE
    dist = []
    for i in range(n):
        li = lab[i]
        edge = np.zeros_like(li, bool)
        edge[1:] |= li[1:] != li[:-1]
        edge[:-1] |= li[1:] != li[:-1]
        edge[:, 1:] |= li[:, 1:] != li[:, :-1]
        edge[:, :-1] |= li[:, 1:] != li[:, :-1]
        e = ref_block(edge, f, "any")
        d = ndimage.distance_transform_edt(~e) if e.any() else np.full(e.shape, np.inf)
        d = np.minimum(d * f, _local.DIST_CAP)
        dist.append(np.kron(np.log1p(d), np.ones((f, f)))[:h, :w])
    rows["log_boundary_distance"] = np.stack(dist)
    if image is not None:
        for c in range(image.shape[1]):
            x = image[:, c].astype(np.float64)
            mu = x.mean(axis=(1, 2), keepdims=True)
            sd = x.std(axis=(1, 2), keepdims=True)
            rows[f"intensity[{c}]"] = (x - mu) / sd
    for c in range(1, k):
        rows[f"class[{c}]"] = (lab == c).astype(float)
    names = _local.feature_names(k, scales, 0 if image is None else image.shape[1])
    return np.stack([rows[nm] for nm in names])


@pytest.mark.parametrize("shape", [(32, 32), (29, 35)])
def test_features_match_the_reference(shape):
    z, _ = synth(0, n=3, shape=shape)
    img = np.random.default_rng(1).normal(size=(3, 2, *shape)).astype(np.float32) * 5 + 3
    got = _local.local_features(z, (2.0, 6.0), img)
    want = ref_features(z, (2.0, 6.0), img)
    assert got.dtype == np.float32 and got.shape == want.shape == (7 + 2 + 2, 3, *shape)
    np.testing.assert_allclose(got, want, atol=2e-4, rtol=1e-4)


def test_feature_semantics_against_exact_versions():
    """The coarse-grid shortcuts stay close to the full-resolution definitions."""
    z, _ = synth(2, n=2, shape=(64, 64))
    f = _local.local_features(z, (2.0, 6.0))
    names = _local.feature_names(3, (2.0, 6.0))
    lm = f[names.index("log_margin")]
    for s in (2.0, 6.0):
        exact = ndimage.gaussian_filter(lm, (0, s, s))
        assert np.corrcoef(exact.ravel(), f[names.index(f"log_margin@{s:g}")].ravel())[0, 1] \
            > 0.95
    lab = z.argmax(axis=1)
    d_got = np.expm1(f[names.index("log_boundary_distance")])
    for i in range(2):
        edge = ndimage.morphological_gradient(lab[i], size=(3, 3)) > 0
        d = np.minimum(ndimage.distance_transform_edt(~edge), _local.DIST_CAP)
        near = d < _local.DIST_CAP - 8
        # resolved to a DIST_COARSE block: off by at most its diagonal (and the cross shape)
        assert np.abs(d_got[i] - d)[near].max() <= _local.DIST_COARSE * np.sqrt(2) + 1.5


def test_one_label_everywhere_and_3d():
    z = np.zeros((1, 3, 8, 8, 8), np.float32)
    z[:, 1] = 2.0
    f = _local.local_features(z, (2.0,))
    names = _local.feature_names(3, (2.0,))
    assert np.isfinite(f).all()
    np.testing.assert_allclose(f[names.index("log_boundary_distance")], np.log1p(_local.DIST_CAP))
    np.testing.assert_array_equal(f[names.index("class[1]")], 1.0)


def test_fused_log_temperature_equals_the_feature_stack():
    z, _ = synth(3, n=2, shape=(24, 20))
    img = np.random.default_rng(4).normal(size=(2, 1, 24, 20)).astype(np.float32)
    f = _local.local_features(z, (2.0, 6.0), img)
    coef = np.random.default_rng(5).normal(size=f.shape[0])
    got = _local.log_temperature(z, (2.0, 6.0), img, coef, -0.3)
    np.testing.assert_allclose(got, -0.3 + np.tensordot(coef, f.astype(np.float64), 1),
                               atol=1e-5)


# ---------------------------------------------------------------------- objective
def ref_local_nll(theta, z, f, y, w, alpha, top_weight=0.0, center=None):
    lt = np.clip(theta[0] + theta[1:] @ f, *LOG_T_BOUNDS)
    lp = log_softmax(z / np.exp(lt), axis=0)
    cols = np.arange(y.size)
    loss = -lp[y, cols]
    # top-label log-loss: -log c where the argmax is right, -log(1 - c) where it is wrong,
    # log(1 - c) as the logsumexp of the other classes' log-probabilities
    top = z.argmax(axis=0)
    rest = lp.copy()
    rest[top, cols] = -np.inf
    loss += top_weight * np.where(top == y, -lp[top, cols], -logsumexp(rest, axis=0))
    pen = theta[1:] @ theta[1:] + (0 if center is None else (theta[0] - center) ** 2)
    return float(w @ loss / w.sum() + alpha * pen)


@pytest.mark.parametrize("top_weight, center", [(0.0, None), (1.0, None), (2.5, 0.3)])
def test_nll_and_gradient_match_reference_and_finite_differences(top_weight, center):
    rng = np.random.default_rng(6)
    n, k, nf = 500, 4, 5
    z = rng.normal(size=(k, n)) * 4
    z[:, :20] *= 60  # confidently wrong voxels: 1 - c underflows unless computed with care
    f = rng.normal(size=(nf, n))
    y = rng.integers(0, k, n)
    w = rng.uniform(0.5, 3, n)
    fun = _local.local_objective(z, f, y, w, 0.05, LOG_T_BOUNDS, top_weight, center)

    def ref(t):
        return ref_local_nll(t, z, f, y, w, 0.05, top_weight, center)

    for theta in (np.zeros(nf + 1), rng.normal(size=nf + 1) * 0.3):
        val, grad = fun(theta)
        assert np.isfinite(val) and np.isfinite(grad).all()
        assert val == pytest.approx(ref(theta), rel=1e-10)
        num = approx_fprime(theta, ref, 1e-7)
        np.testing.assert_allclose(grad, num, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------------- fitting
def test_recovers_a_temperature_that_varies_with_the_predicted_class():
    z, y = synth(7, n=8, shape=(48, 48))
    temps = (0.5, 3.0, 1.5)
    shown, t_true = shown_by_class(z, temps)
    cal = TemperatureCalibrator(mode="local", alpha=0.0).fit(shown, y)
    tmap = cal.temperature_map(shown)
    lab = shown.argmax(axis=1)
    for c, t in enumerate(temps):
        assert np.median(tmap[lab == c]) == pytest.approx(t, rel=0.15)
    # and beats one global temperature on held-out data from the same network
    z2, y2 = synth(8, n=6, shape=(48, 48))
    shown2, _ = shown_by_class(z2, temps)
    glob = TemperatureCalibrator().fit(shown, y)
    nll_local = metrics.negative_log_likelihood(cal.predict_proba(shown2), y2)
    nll_glob = metrics.negative_log_likelihood(glob.predict_proba(shown2), y2)
    nll_true = metrics.negative_log_likelihood(softmax(z2, axis=1).astype(np.float32), y2)
    assert nll_local < nll_glob - 0.02
    assert nll_local < nll_true + 0.01
    assert cal.nll_after_ < cal.nll_before_ and cal.ece_after_ < cal.ece_before_


def _ensemble_like(seed):
    """Log mean probability of three noisy over-confident members; labels ~ softmax(z)."""
    z, y = synth(seed, n=6, shape=(48, 48))
    rng = np.random.default_rng(seed)
    members = [softmax(3 * z + rng.normal(size=z.shape).astype(np.float32) * 3, axis=1)
               for _ in range(3)]
    return np.log(np.mean(members, axis=0)).astype(np.float32), y


def test_top_label_term_calibrates_an_ensembles_confidence():
    """On a mean of members the NLL-optimal map leaves the top-label confidence
    miscalibrated (no better than one temperature); the top-label term fixes it, for a
    slightly higher NLL, and nll_after_ stays the plain NLL of the calibrated output."""
    s, y = _ensemble_like(20)
    s2, y2 = _ensemble_like(30)
    fits = {tw: TemperatureCalibrator(mode="local", top_label_weight=tw).fit(s, y)
            for tw in (0.0, 1.0)}
    ece = {tw: metrics.expected_calibration_error(c.predict_proba(s2), y2)
           for tw, c in fits.items()}
    glob = TemperatureCalibrator().fit(s, y)
    assert ece[1.0] < 0.85 * ece[0.0]
    assert ece[1.0] < 0.85 * metrics.expected_calibration_error(glob.predict_proba(s2), y2)
    assert fits[1.0].ece_after_ < 0.85 * fits[0.0].ece_after_
    assert fits[0.0].nll_after_ < fits[1.0].nll_after_ < glob.nll_after_
    for c in fits.values():  # every fit voxel is in the sample: the estimate is exact
        assert c.nll_after_ == pytest.approx(
            metrics.negative_log_likelihood(c.predict_proba(s), y), rel=1e-4)


def test_labels_never_change_even_with_extreme_maps():
    z, y = synth(9, n=3)
    cal = TemperatureCalibrator(mode="local").fit(z * 4, y)
    cal.coef_ = np.random.default_rng(0).normal(size=cal.coef_.size) * 5  # T spans 0.01..100
    tmap = cal.temperature_map(z * 4)
    assert tmap.min() < 0.05 and tmap.max() > 20
    raw = (z * 4).argmax(axis=1)
    np.testing.assert_array_equal(cal.predict(z * 4), raw)
    proba = cal.predict_proba(z * 4)
    assert np.isfinite(proba).all()
    np.testing.assert_array_equal(proba.argmax(axis=1), raw)
    # the map divides every class logit of a voxel by the same temperature
    np.testing.assert_allclose(
        proba, softmax((z * 4) / tmap[:, None].astype(np.float64), axis=1), atol=1e-5)


def test_strong_penalty_gives_the_global_temperature():
    z, y = synth(10, n=3)
    glob = TemperatureCalibrator().fit(z * 2.5, y)
    cal = TemperatureCalibrator(mode="local", alpha=1e6).fit(z * 2.5, y)
    assert cal.temperature_ == pytest.approx(glob.temperature_, rel=1e-9)
    np.testing.assert_allclose(cal.coef_, 0, atol=1e-5)
    assert np.exp(cal.intercept_) == pytest.approx(glob.temperature_, rel=1e-3)
    np.testing.assert_allclose(cal.predict_proba(z * 2.5), glob.predict_proba(z * 2.5),
                               atol=1e-4)


def test_partial_fit_over_batches_equals_fit():
    z, y = synth(11, n=4)
    full = TemperatureCalibrator(mode="local").fit(z * 2, y)
    inc = TemperatureCalibrator(mode="local")
    inc.partial_fit(z[:2] * 2, y[:2]).partial_fit(z[2:] * 2, y[2:])
    assert inc.n_voxels_fit_ == full.n_voxels_fit_ == y.size
    # the same voxels with the same features (ordered by their scores; keys differ per call)
    oi, of = np.lexsort(inc.sample_["scores"]), np.lexsort(full.sample_["scores"])
    np.testing.assert_array_equal(inc.sample_["features"][:, oi], full.sample_["features"][:, of])
    np.testing.assert_allclose(inc.temperature_map(z * 2), full.temperature_map(z * 2),
                               rtol=1e-3)


def test_subsampled_fit_keeps_features_with_their_voxels():
    z, y = synth(12, n=4)
    cal = TemperatureCalibrator(mode="local", max_voxels=1500).fit(z * 2, y)
    smp = cal.sample_
    assert smp["features"].shape == (len(cal.feature_names_), cal.n_voxels_sampled_)
    assert cal.n_voxels_sampled_ <= 1500
    # every sampled voxel's (scores, features) pair is one of the data's
    feats = _local.local_features(z * 2, (2.0, 6.0)).reshape(len(cal.feature_names_), -1)
    scores = (z * 2).transpose(1, 0, 2, 3).reshape(3, -1)
    key = {tuple(v) for v in np.vstack([scores, feats]).T.round(4)}
    got = np.vstack([smp["scores"], smp["features"]]).T.round(4)
    assert all(tuple(v) in key for v in got)


def test_roi_and_ignore_index_drop_voxels_but_not_their_context():
    z, y = synth(13, n=2)
    y_ign = y.copy()
    y_ign[:, :10] = 255
    cal = TemperatureCalibrator(mode="local", ignore_index=255).fit(z * 2, y_ign)
    assert cal.n_voxels_fit_ == int((y_ign != 255).sum())
    feats = _local.local_features(z * 2, (2.0, 6.0))[:, :, 10:]  # whole-image features
    want = np.sort(feats.reshape(feats.shape[0], -1), axis=1)
    np.testing.assert_allclose(np.sort(cal.sample_["features"], axis=1), want)
    roi = TemperatureCalibrator(mode="local", roi="foreground", margin=1).fit(z * 2, y)
    assert roi.n_voxels_fit_ == int(metrics.foreground_roi(y, margin=1).sum())


# ---------------------------------------------------------------------- composition
@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(14).normal(size=(6, 1, 24, 24)).astype(np.float32)


def labels_for(logits, seed=0):
    rng = np.random.default_rng(seed)
    cum = softmax(logits.astype(np.float64) / 2, axis=1).cumsum(axis=1)[:, :-1]
    return (cum < rng.random((logits.shape[0], 1, *logits.shape[2:]))).sum(axis=1)


def test_segmenter_uses_the_image_and_matches_a_manual_map(tiny_2d, images):
    seg = OnnxSegmenter(tiny_2d).fit()
    logits = seg.transform(images)
    y = labels_for(logits)
    cal = TemperatureCalibrator(seg, mode="local", batch_size=4).fit(images, y)
    assert "intensity[0]" in cal.feature_names_
    f = _local.local_features(logits, (2.0, 6.0), images)
    lt = np.clip(cal.intercept_ + np.tensordot(cal.coef_, f.astype(np.float64), 1),
                 *LOG_T_BOUNDS)
    np.testing.assert_allclose(cal.temperature_map(images), np.exp(lt), rtol=1e-4)
    np.testing.assert_allclose(cal.predict_proba(images),
                               softmax(logits / np.exp(lt)[:, None], axis=1), atol=1e-5)
    np.testing.assert_array_equal(cal.predict(images), logits.argmax(axis=1))
    no_img = TemperatureCalibrator(seg, mode="local", use_image=False).fit(images, y)
    assert not any(n.startswith("intensity") for n in no_img.feature_names_)
    # lists of images take the same path, one image at a time
    maps = cal.temperature_map(list(images))
    np.testing.assert_allclose(np.stack(maps), cal.temperature_map(images), rtol=1e-6)


def test_pipeline_and_ensemble(tiny_members, images):
    ens = EnsembleSegmenter(tiny_members).fit()
    logp = ens.transform(images)
    y = labels_for(logp)
    on_logits = TemperatureCalibrator(mode="local").fit(logp, y)
    pipe = make_pipeline(EnsembleSegmenter(tiny_members),
                         TemperatureCalibrator(mode="local")).fit(images, y)
    np.testing.assert_allclose(pipe[-1].coef_, on_logits.coef_, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(pipe.predict_proba(images), on_logits.predict_proba(logp),
                               atol=1e-5)
    np.testing.assert_array_equal(pipe.predict(images), logp.argmax(axis=1))
    direct = TemperatureCalibrator(ens, mode="local").fit(images, y)
    assert "intensity[0]" in direct.feature_names_
    np.testing.assert_array_equal(direct.predict(images), logp.argmax(axis=1))


def test_3d_segmenter(tiny_3d):
    X = np.random.default_rng(15).normal(size=(2, 1, 12, 12, 12)).astype(np.float32)
    seg = OnnxSegmenter(tiny_3d).fit()
    y = labels_for(seg.transform(X))
    cal = TemperatureCalibrator(seg, mode="local").fit(X, y)
    assert cal.temperature_map(X).shape == (2, 12, 12, 12)
    np.testing.assert_array_equal(cal.predict_proba(X).argmax(axis=1), seg.predict(X))


class ShiftedGrid:
    """Duck-typed segmenter whose output grid is smaller than its input's."""

    def __init__(self):
        self.fitted_ = True

    def transform(self, X):
        X = np.asarray(X)
        return np.concatenate([X, -X, X * 0.5], axis=1)[..., 2:, 2:]


def test_errors(images):
    z, y = synth(16, n=2, shape=(16, 16))
    with pytest.raises(ValueError, match="objective='ece' fits one global"):
        TemperatureCalibrator(mode="local", objective="ece").fit(z, y)
    for bad in (-1.0, np.inf, "0.1", True):
        with pytest.raises(ValueError, match="alpha"):
            TemperatureCalibrator(mode="local", alpha=bad).fit(z, y)
        with pytest.raises(ValueError, match="top_label_weight"):
            TemperatureCalibrator(mode="local", top_label_weight=bad).fit(z, y)
    for bad in ((0.1,), (2.0, 2.0), 3.0, (1, 2, 3, 4, 5), (np.nan,)):
        with pytest.raises(ValueError, match="scales"):
            TemperatureCalibrator(mode="local", scales=bad).fit(z, y)
    with pytest.raises(TypeError, match="use_image"):
        TemperatureCalibrator(mode="local", use_image="yes").fit(z, y)
    with pytest.raises(ValueError, match="needs at least 100 voxels, got 32"):
        TemperatureCalibrator(mode="local").fit(z[:1, :, :4, :8], y[:1, :4, :8])
    with pytest.raises(ValueError, match="looks like probabilities"):
        TemperatureCalibrator(mode="local").fit(softmax(z, axis=1), y)
    cal = TemperatureCalibrator(mode="local").fit(z, y)
    with pytest.raises(ValueError, match="2 classes on axis 1 but the calibrator was fitted "
                                         "with 3"):
        cal.predict_proba(z[:, :2])
    with pytest.raises(ValueError, match="2 classes on axis 1"):
        cal.temperature_map(z[:, :2])
    with pytest.raises(ValueError, match="one temperature per class, not per voxel"):
        TemperatureCalibrator(mode="classwise").fit(z, y).temperature_map(z)
    y_bad = ShiftedGrid().transform(images).argmax(axis=1)
    with pytest.raises(ValueError, match="use_image=False"):
        TemperatureCalibrator(ShiftedGrid(), mode="local").fit(images, y_bad)
    cal = TemperatureCalibrator(ShiftedGrid(), mode="local", use_image=False).fit(images, y_bad)
    assert cal.temperature_map(images).shape == (6, 22, 22)


def test_switching_mode_after_fit():
    z, y = synth(18, n=2)
    glob = TemperatureCalibrator().fit(z, y)
    glob.set_params(mode="local")
    with pytest.raises(NotFittedError, match="no local map was fitted"):
        glob.predict_proba(z)
    with pytest.raises(ValueError, match="cannot switch mode to or from 'local'"):
        glob.partial_fit(z, y)
    loc = TemperatureCalibrator(mode="local").fit(z, y).set_params(mode="global")
    with pytest.raises(ValueError, match="collected with local features"):
        loc.partial_fit(z, y)
    # a local fit's temperature_ is the global fit: predicting in global mode uses it
    np.testing.assert_allclose(loc.predict_proba(z), TemperatureCalibrator().fit(z, y)
                               .predict_proba(z), atol=1e-6)


def test_global_temperature_map_and_clone():
    z, y = synth(17, n=2)
    glob = TemperatureCalibrator().fit(z * 2, y)
    np.testing.assert_array_equal(glob.temperature_map(z * 2),
                                  np.full(y.shape, glob.temperature_, np.float32))
    cal = TemperatureCalibrator(mode="local", scales=[3.0], alpha=0.01)
    assert clone(cal).get_params() == cal.get_params()
    cal.fit(z * 2, y)
    assert cal.feature_names_ == _local.feature_names(3, (3.0,))


# ---------------------------------------------------------------------- persistence
@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_2d, images):
    seg = OnnxSegmenter(tiny_2d).fit()
    y = labels_for(seg.transform(images))
    cal = TemperatureCalibrator(seg, mode="local").fit(images, y)
    return cal, uqseg.save(cal, tmp_path_factory.mktemp("local") / "cal"), y


def test_save_load_round_trip(saved, images):
    cal, folder, y = saved
    back = uqseg.load(folder)
    assert back.feature_names_ == cal.feature_names_
    np.testing.assert_array_equal(back.coef_, cal.coef_)
    np.testing.assert_array_equal(back.temperature_map(images), cal.temperature_map(images))
    np.testing.assert_array_equal(back.predict_proba(images), cal.predict_proba(images))
    back.partial_fit(images, y)  # the saved sample, features included, continues
    assert back.n_voxels_fit_ == 2 * cal.n_voxels_fit_


def _manifest(folder):
    return json.loads((folder / "manifest.json").read_text())


def _edit_fitted(folder, key, value):
    m = _manifest(folder)
    m["root"]["fitted"][key] = value
    (folder / "manifest.json").write_text(json.dumps(m))


def _edit_array(folder, node, make):
    """Replace the array of a manifest node in arrays.npz and its recorded hash, as an
    attacker can."""
    with np.load(folder / "arrays.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays[node["key"]] = make(arrays[node["key"]])
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    (folder / "arrays.npz").write_bytes(buf.getvalue())
    m = _manifest(folder)
    m["files"]["arrays.npz"] = hashlib.sha256(buf.getvalue()).hexdigest()
    (folder / "manifest.json").write_text(json.dumps(m))


NAN = {"__uqseg__": "float", "value": "nan"}


@pytest.mark.parametrize(("key", "value"), [
    ("intercept_", NAN), ("intercept_", {"__uqseg__": "float", "value": "inf"}),
    ("intercept_", "0.5"), ("feature_names_", ["log_margin"]),
    ("feature_names_", "log_margin"), ("coef_", [1.0, 2.0]), ("coef_", None),
])
def test_loaded_local_state_is_checked(saved, tmp_path, key, value):
    folder = tmp_path / "f"
    shutil.copytree(saved[1], folder)
    _edit_fitted(folder, key, value)
    with pytest.raises((ValueError, TypeError)) as info:
        uqseg.load(folder)
    assert str(info.value).startswith(f"estimator.{key}"), info.value


@pytest.mark.parametrize(("where", "make"), [
    ("coef_", lambda a: a * np.nan), ("coef_", lambda a: a[:-1]),
    ("coef_", lambda a: a.astype(str)),
    ("features", lambda a: a[:, :-1]), ("features", lambda a: a[:-1]),
    ("features", lambda a: np.where(a > 0, np.inf, a)),
])
def test_loaded_local_arrays_are_checked(saved, tmp_path, where, make):
    folder = tmp_path / "f"
    shutil.copytree(saved[1], folder)
    fitted = _manifest(folder)["root"]["fitted"]
    node = fitted["coef_"] if where == "coef_" else next(
        v for k, v in fitted["sample_"]["items"] if k == "features")
    _edit_array(folder, node, make)
    with pytest.raises((ValueError, TypeError)) as info:
        uqseg.load(folder)
    assert str(info.value).startswith(
        "estimator." + ("coef_" if where == "coef_" else "sample_")), info.value


def test_loaded_features_must_fit_the_parameters(saved, tmp_path):
    folder = tmp_path / "f"
    shutil.copytree(saved[1], folder)
    m = _manifest(folder)
    m["root"]["params"]["scales"] = [3.0, 6.0]  # names say 2 and 6
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"^estimator.feature_names_: do not match"):
        uqseg.load(folder)
    shutil.rmtree(folder)
    shutil.copytree(saved[1], folder)
    m = _manifest(folder)
    m["root"]["params"]["use_image"] = False  # the map reads the intensity
    (folder / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"^estimator.feature_names_: intensity"):
        uqseg.load(folder)
