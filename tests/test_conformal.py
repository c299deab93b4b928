"""ConformalRiskController: thresholds against closed forms and brute-force references."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
from scipy.stats import binom
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.pipeline import make_pipeline

import uqseg
from uqseg import ConformalRiskController, EnsembleSegmenter, OnnxSegmenter, TemperatureCalibrator
from uqseg.conformal import controlled_masks

NB = 20  # a coarse grid keeps the brute-force references small


# ---------------------------------------------------------------------- references
def centred(k, nb=NB):
    """Probabilities at bin centres: ``p >= j / nb`` is unambiguous in any precision."""
    return ((np.asarray(k) + 0.5) / nb).astype(np.float32)


def binary_proba(p1):
    p1 = np.asarray(p1, np.float32)
    return np.stack([1 - p1, p1], axis=1)


def ref_losses(p, truth, risk, nb=NB):
    """Per-image losses of the masks ``p >= j / nb`` (j = 0..nb) and the empty mask."""
    n = p.shape[0]
    p, truth = p.reshape(n, -1).astype(np.float64), truth.reshape(n, -1)
    rows = []
    for t in [j / nb for j in range(nb + 1)] + [np.inf]:
        m = p >= t
        tp = (m & truth).sum(1).astype(float)
        pos, g = m.sum(1).astype(float), truth.sum(1).astype(float)
        with np.errstate(divide="ignore", invalid="ignore"):
            if risk == "fnr":
                r = 1 - tp / g
            elif risk == "fdr":
                r = np.where(pos > 0, (pos - tp) / np.where(pos > 0, pos, 1), 0.0)
            elif risk == "dice":
                r = np.where(g + pos > 0, 1 - 2 * tp / np.where(g + pos > 0, g + pos, 1), 0.0)
            else:
                r = np.minimum(np.abs(pos - g) / g, 1)
        rows.append(r)
    losses = np.stack(rows, axis=1)
    keep = truth.sum(1) > 0 if risk in ("fnr", "volume") else np.ones(n, bool)
    return losses[keep]


def ref_hb(r, n, alpha):
    a = min(r, alpha)
    h = (a * math.log(a / alpha) if a > 0 else 0.0) + (1 - a) * math.log((1 - a) / (1 - alpha))
    return min(math.exp(-n * h), math.e * binom.cdf(math.ceil(n * r), n, alpha))


def ref_threshold(losses, alpha, delta, risk, nb=NB):
    """The grid index CRC or LTT must choose, written from the papers' definitions."""
    n, m = losses.shape
    rhat = losses.mean(0)
    if delta is None:
        if risk == "fdr":  # monotone envelope: worst loss over every smaller mask
            env = np.maximum.accumulate(losses[:, ::-1], axis=1)[:, ::-1].mean(0)
            ok = [j for j in range(m) if n / (n + 1) * env[j] + 1 / (n + 1) <= alpha]
            return min(ok)
        ok = [j for j in range(m) if n / (n + 1) * rhat[j] + 1 / (n + 1) <= alpha]
        return max(ok)  # the inf over lambda = 1 - threshold: the largest threshold
    p = [ref_hb(r, n, alpha) for r in rhat]
    if risk == "fnr":
        order, level = [list(range(m))], delta
    elif risk == "fdr":
        order, level = [list(range(m - 1, -1, -1))], delta
    else:
        s = nb // 2
        order, level = [list(range(s, -1, -1)), list(range(s + 1, m))], delta / 2
    valid = []
    for chain in order:
        for j in chain:
            if p[j] > level:
                break
            valid.append(j)
    if risk == "fnr":
        return max(valid)
    if risk == "fdr":
        return min(valid)
    best = min(rhat[j] for j in valid)
    return max(j for j in valid if rhat[j] == best)


def noisy_binary(seed, n=60, shape=(12, 12), fg=0.3, sep=0.35):
    """Labels and a noisy foreground probability at bin centres."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, *shape)) < fg).astype(np.int64)
    score = np.clip(0.5 + sep * (2 * y - 1) + 0.3 * rng.standard_normal(y.shape), 0, 0.999)
    return binary_proba(centred(np.floor(score * NB))), y


# ---------------------------------------------------------------------- closed forms
@pytest.mark.parametrize(("n", "alpha"), [(19, 0.3), (40, 0.1), (9, 0.5), (99, 0.05)])
def test_crc_fnr_closed_form(n, alpha):
    # every image: 10 foreground voxels at probabilities 0.05 .. 0.95, so FNR(j/10) = j/10
    p1 = np.tile(centred(np.arange(10), 10), (n, 1))[:, None, :]  # (n, 1, 10): 2-D (1 x 10)
    proba = binary_proba(p1)
    y = np.ones((n, 1, 10), np.int64)
    crc = ConformalRiskController(alpha=alpha, n_bins=10).fit(proba, y)
    j = math.floor((alpha * (n + 1) - 1) * 10 / n + 1e-9)  # n/(n+1) j/10 + 1/(n+1) <= alpha
    assert crc.threshold_index_.tolist() == [j]
    assert crc.lambda_[0] == pytest.approx(j / 10)
    assert crc.empirical_risk_[0] == pytest.approx(j / 10)
    assert crc.method_ == "crc" and crc.n_calibration_.tolist() == [n]


@pytest.mark.parametrize("n", [30, 90])
def test_ltt_fnr_closed_form(n):
    # 7 foreground voxels per image at 1/14, 3/14, ...: FNR(j/7) = j/7 (n*j/7 never an integer)
    p1 = np.tile(((np.arange(7) + 0.5) / 7).astype(np.float32), (n, 1))[:, None, :]
    alpha, delta = 0.35, 0.1
    crc = ConformalRiskController(alpha=alpha, delta=delta, n_bins=7).fit(
        binary_proba(p1), np.ones((n, 1, 7), np.int64))
    p = [ref_hb(j / 7, n, alpha) for j in range(9)]
    j = next(j for j in range(9) if p[j] > delta) - 1  # fixed sequence from the full mask
    assert crc.threshold_index_.tolist() == [j] and crc.method_ == "ltt"
    assert j >= 1


@pytest.mark.parametrize(("risk", "delta", "alpha"), [
    ("fnr", None, 0.1), ("fnr", 0.1, 0.15), ("fdr", None, 0.2), ("fdr", 0.1, 0.25),
    ("dice", 0.1, 0.3), ("volume", 0.2, 0.3)])
def test_threshold_matches_brute_force(risk, delta, alpha):
    proba, y = noisy_binary(3, n=120)
    crc = ConformalRiskController(risk=risk, alpha=alpha, delta=delta, n_bins=NB).fit(proba, y)
    losses = ref_losses(proba[:, 1], y == 1, risk)
    j = ref_threshold(losses, alpha, delta, risk)
    assert crc.threshold_index_.tolist() == [j]
    assert crc.empirical_risk_[0] == pytest.approx(losses[:, j].mean())
    # the masks predicted are the masks whose risk was measured
    masks = crc.predict(proba)[:, 0]
    np.testing.assert_array_equal(masks, proba[:, 1] >= j / NB)


def test_fdr_crc_uses_the_monotone_envelope():
    # image 0: FDR 0 at the strictest mask, 0.5 one step looser, 0 again two steps looser;
    # the envelope keeps 0.5 there, so the controller cannot jump to the looser mask
    p1 = np.zeros((10, 1, 4), np.float32)
    y = np.zeros((10, 1, 4), np.int64)
    p1[:, 0] = centred([19, 18, 17, 0])
    y[:, 0] = [1, 0, 1, 0]
    losses = ref_losses(p1, y == 1, "fdr")
    assert losses[0, 18] == 0.5 and losses[0, 17] == pytest.approx(1 / 3)
    crc = ConformalRiskController(risk="fdr", alpha=0.45, n_bins=NB).fit(binary_proba(p1), y)
    assert crc.threshold_index_.tolist() == [ref_threshold(losses, 0.45, None, "fdr")] == [19]
    assert not np.all(np.diff(losses.mean(0)) <= 0)  # the raw FDR curve is not monotone


def test_fnr_curve_is_monotone_and_empty_truth_images_are_left_out():
    proba, y = noisy_binary(5, n=50)
    y[:7] = 0  # no foreground in the first seven images
    crc = ConformalRiskController(alpha=0.2, n_bins=NB).fit(proba, y)
    assert crc.n_calibration_.tolist() == [43]
    losses = ref_losses(proba[7:, 1], y[7:] == 1, "fnr")
    assert np.all(np.diff(losses, axis=1) >= -1e-12)
    assert crc.threshold_index_.tolist() == [ref_threshold(losses, 0.2, None, "fnr")]


def test_multiclass_classes_and_overlapping_masks():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(40, 4, 10, 10)) * 2
    proba = (np.exp(z) / np.exp(z).sum(1, keepdims=True)).astype(np.float32)
    y = proba.argmax(1)
    crc = ConformalRiskController(alpha=0.05, n_bins=NB).fit(proba, y)
    assert crc.classes_.tolist() == [1, 2, 3]
    for i, c in enumerate(crc.classes_):
        losses = ref_losses(proba[:, c], y == c, "fnr")
        assert crc.threshold_index_[i] == ref_threshold(losses, 0.05, None, "fnr")
    masks = crc.predict(proba)
    assert masks.shape == (40, 3, 10, 10) and (masks.sum(1) > 1).any()  # sets may overlap
    two = ConformalRiskController(alpha=0.05, n_bins=NB, classes=[3, 0]).fit(proba, y)
    assert two.classes_.tolist() == [3, 0]
    assert two.threshold_index_[0] == crc.threshold_index_[2]


# ---------------------------------------------------------------------- validity
def test_crc_fnr_expected_risk_is_controlled_over_random_splits():
    proba, y = noisy_binary(11, n=400, shape=(8, 8), sep=0.2)
    losses = ref_losses(proba[:, 1], y == 1, "fnr")
    assert losses.shape[0] == 400
    rng = np.random.default_rng(0)
    realised = []
    for _ in range(200):
        idx = rng.permutation(400)
        cal, test = idx[:40], idx[40:]
        crc = ConformalRiskController(alpha=0.1, n_bins=NB).fit(proba[cal], y[cal])
        realised.append(losses[test, crc.threshold_index_[0]].mean())
    mean, se = np.mean(realised), np.std(realised) / np.sqrt(len(realised))
    assert mean <= 0.1 + 3 * se  # valid
    assert mean >= 0.1 - 0.04  # and not vacuous (the grid costs a little)


def test_prediction_sets_cover_exchangeable_images():
    rng = np.random.default_rng(4)

    def draw(n):
        z = rng.normal(size=(n, 3, 6, 6)) * 1.5
        p = (np.exp(z) / np.exp(z).sum(1, keepdims=True)).astype(np.float32)
        u = rng.random((n, 1, 6, 6))
        return p, (p.cumsum(1) < u).sum(1).clip(0, 2)  # y ~ Categorical(p)

    p_test, y_test = draw(1500)
    for score, mondrian in [("lac", False), ("aps", False), ("lac", True)]:
        covs, sizes = [], []
        for _ in range(20):
            p_cal, y_cal = draw(100)
            crc = ConformalRiskController(alpha=0.1, set_score=score, mondrian=mondrian,
                                          n_bins=200).fit(p_cal, y_cal)
            sets = crc.predict_set(p_test)
            covered = np.take_along_axis(sets, y_test[:, None], 1)[:, 0]
            covs.append(covered.mean() if not mondrian else
                        min(covered[y_test == c].mean() for c in range(3)))
            sizes.append(sets.sum(1).mean())
        assert np.mean(covs) >= 0.9 - 0.01, (score, mondrian)
        assert np.mean(covs) <= 0.9 + 0.05, (score, mondrian)  # not the full set
        assert 1 < np.mean(sizes) < 3
    # the sets are the LAC rule at the fitted quantile
    crc = ConformalRiskController(alpha=0.1, n_bins=200).fit(*draw(50))
    q = crc.set_threshold_index_
    ref = np.floor((1 - p_test[:20].astype(np.float32)) * np.float32(200)) <= q[None, :, None, None]
    np.testing.assert_array_equal(crc.predict_set(p_test[:20]), ref)
    assert crc.set_quantile_ == pytest.approx((q + 1) / 200)


def test_set_quantile_matches_image_level_crc():
    rng = np.random.default_rng(8)
    z = rng.normal(size=(30, 3, 5, 5)) * 2
    p = (np.exp(z) / np.exp(z).sum(1, keepdims=True)).astype(np.float32)
    y = rng.integers(0, 3, size=(30, 5, 5))
    crc = ConformalRiskController(alpha=0.2, n_bins=NB).fit(p, y)
    s = np.floor((1 - np.take_along_axis(p, y[:, None], 1)[:, 0]) * np.float32(NB))
    miss = np.stack([(s > q).mean((1, 2)) for q in range(NB + 1)], 1)  # per image, per Q
    ok = [q for q in range(NB + 1) if 30 / 31 * miss[:, q].mean() + 1 / 31 <= 0.2]
    assert crc.set_threshold_index_.tolist() == [min(ok)] * 3
    sets = crc.predict_set(p)
    assert crc.mean_set_size_ == pytest.approx(sets.sum(1).mean())


# ---------------------------------------------------------------------- errors
@pytest.mark.parametrize("alpha", [0, 1, -0.1, 1.5, True, "0.1", None])
def test_alpha_outside_unit_interval(alpha):
    proba, y = noisy_binary(0, n=20)
    with pytest.raises(ValueError, match=r"alpha must be a number in the open interval \(0, 1\)"):
        ConformalRiskController(alpha=alpha).fit(proba, y)


@pytest.mark.parametrize("delta", [0, 1, 2.0, -1e-3, "x"])
def test_delta_outside_unit_interval(delta):
    proba, y = noisy_binary(0, n=20)
    with pytest.raises(ValueError, match=r"delta must be a number in the open interval"):
        ConformalRiskController(delta=delta).fit(proba, y)


def test_ltt_without_valid_threshold_says_how_many_images():
    proba, y = noisy_binary(0, n=10)
    need = next(n for n in range(1, 1000) if 0.9 ** n <= 0.1)  # even R = 0 needs this many
    with pytest.raises(ValueError, match=rf"at least {need} images") as exc:
        ConformalRiskController(alpha=0.1, delta=0.1).fit(proba, y)
    assert "class 1" in str(exc.value) and "n=10" in str(exc.value)
    need2 = next(n for n in range(1, 1000) if 0.9 ** n <= 0.05)  # two chains: delta / 2
    with pytest.raises(ValueError, match=rf"at least {need2} images"):
        ConformalRiskController(risk="dice", alpha=0.1, delta=0.1).fit(proba, y)


def test_crc_with_too_few_images():
    proba, y = noisy_binary(0, n=8)
    with pytest.raises(ValueError, match=r"at least 9 calibration images for alpha=0.1; got n=8"):
        ConformalRiskController(alpha=0.1).fit(proba, y)
    ConformalRiskController(alpha=0.1).fit(*noisy_binary(0, n=9))


@pytest.mark.parametrize(("params", "match"), [
    ({"risk": "recall"}, "risk must be one of"),
    ({"risk": "dice"}, "pass delta"),
    ({"risk": "volume"}, "Learn-then-Test"),
    ({"n_bins": 1}, "n_bins must be an integer >= 2"),
    ({"batch_size": 0}, "batch_size must be"),
    ({"set_score": "raps"}, "set_score must be one of"),
    ({"classes": [2]}, r"class indices in \[0, 2\)"),
    ({"classes": [1, 1]}, "must not repeat"),
    ({"classes": []}, "non-empty"),
])
def test_bad_parameters(params, match):
    proba, y = noisy_binary(0, n=20)
    with pytest.raises(ValueError, match=match):
        ConformalRiskController(**params).fit(proba, y)


def test_bad_inputs():
    proba, y = noisy_binary(0, n=20)
    crc = ConformalRiskController()
    with pytest.raises(ValueError, match="X has 20 images but y has 19"):
        crc.fit(proba, y[:19])
    with pytest.raises(ValueError, match=r"y has shape \(8, 12, 11\)"):
        crc.fit(proba[:8], y[:8, :, :11])
    with pytest.raises(ValueError, match=r"labels in \[0, 2\]"):
        crc.fit(proba, np.where(y == 1, 2, 0))
    with pytest.raises(ValueError, match="are these logits"):
        crc.fit(proba * 4 - 2, y)
    with pytest.raises(ValueError, match="must sum to 1"):
        crc.fit(proba * 0.5, y)
    with pytest.raises(TypeError, match="floating point"):
        crc.fit(proba.astype(np.int64), y)
    with pytest.raises(TypeError, match="predict_proba"):
        ConformalRiskController(estimator=object()).fit(proba, y)
    with pytest.raises(NotFittedError):
        crc.predict(proba)
    crc.fit(proba, y)
    with pytest.raises(ValueError, match="3 classes on axis 1 but the controller was fitted "
                                         "with 2"):
        crc.predict(np.full((1, 3, 4, 4), 1 / 3, np.float32))


# ---------------------------------------------------------------------- streaming, glue
def test_deterministic_and_independent_of_batching():
    proba, y = noisy_binary(2, n=50)
    a = ConformalRiskController(risk="fdr", alpha=0.2, delta=0.2).fit(proba, y)
    b = ConformalRiskController(risk="fdr", alpha=0.2, delta=0.2, batch_size=1).fit(
        list(proba), list(y))
    a2 = clone(a).fit(proba, y)
    for other in (b, a2):
        np.testing.assert_array_equal(other.lambda_, a.lambda_)
        for key in a.stats_:
            np.testing.assert_array_equal(other.stats_[key], a.stats_[key])
    assert isinstance(b.predict(list(proba[:2])), list)
    np.testing.assert_array_equal(controlled_masks(a, proba[:5]), a.predict(proba[:5]))


def test_stats_are_histograms_not_voxels():
    proba, y = noisy_binary(2, n=30, shape=(64, 64))
    crc = ConformalRiskController(n_bins=100).fit(proba, y)
    assert crc.stats_["true"].shape == (30, 2, 101)
    assert crc.stats_["true"].dtype == np.uint32
    assert crc.stats_["n_voxels"].tolist() == [64 * 64] * 30
    np.testing.assert_array_equal(crc.stats_["true"][:, 1].sum(1), (y == 1).sum((1, 2)))


def test_ignore_index_voxels_count_nowhere():
    proba, y = noisy_binary(6, n=60)
    y_ign = y.copy()
    y_ign[:, :3] = 255
    crc = ConformalRiskController(risk="fdr", alpha=0.2, ignore_index=255, n_bins=NB).fit(
        proba, y_ign)
    ref = ConformalRiskController(risk="fdr", alpha=0.2, n_bins=NB).fit(
        np.ascontiguousarray(proba[:, :, 3:]), y[:, 3:])
    assert crc.threshold_index_.tolist() == ref.threshold_index_.tolist()
    assert crc.stats_["n_voxels"].tolist() == [9 * 12] * 60


def test_three_d_volumes():
    rng = np.random.default_rng(9)
    y = (rng.random((25, 6, 8, 8)) < 0.2).astype(np.int64)
    p1 = centred(np.floor(np.clip(0.5 + 0.3 * (2 * y - 1) + 0.25 * rng.standard_normal(y.shape),
                                  0, 0.999) * NB))
    proba = binary_proba(p1)
    crc = ConformalRiskController(alpha=0.1, n_bins=NB).fit(proba, y)
    losses = ref_losses(p1, y == 1, "fnr")
    assert crc.threshold_index_.tolist() == [ref_threshold(losses, 0.1, None, "fnr")]
    assert crc.predict(proba).shape == (25, 1, 6, 8, 8)
    assert crc.predict_set(proba).shape == (25, 2, 6, 8, 8)


def test_indicator_targets_of_sigmoid_channels():
    rng = np.random.default_rng(12)
    y = rng.random((40, 2, 8, 8)) < 0.3  # two overlapping channels
    p = centred(np.floor(np.clip(0.5 + 0.3 * (2 * y - 1) + 0.2 * rng.standard_normal(y.shape),
                                 0, 0.999) * NB))
    crc = ConformalRiskController(alpha=0.1, n_bins=NB).fit(p, y)
    assert crc.classes_.tolist() == [0, 1] and crc.target_kind_ == "indicator"
    for c in range(2):
        losses = ref_losses(p[:, c], y[:, c], "fnr")
        assert crc.threshold_index_[c] == ref_threshold(losses, 0.1, None, "fnr")
    with pytest.raises(ValueError, match="prediction sets need label targets"):
        crc.predict_set(p)
    one = ConformalRiskController(alpha=0.1, n_bins=NB).fit(p[:, :1], y[:, 0].astype(int))
    assert one.threshold_index_[0] == crc.threshold_index_[0]


def test_works_on_segmenters_ensembles_and_pipelines(tiny_2d, tiny_members):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((12, 1, 16, 16)).astype(np.float32)
    seg = OnnxSegmenter(tiny_2d).fit()
    y = rng.integers(0, 3, size=(12, 16, 16))
    ens = EnsembleSegmenter(tiny_members).fit()
    cal_X = rng.standard_normal((6, 1, 16, 16)).astype(np.float32)
    pipe = make_pipeline(OnnxSegmenter(tiny_2d), TemperatureCalibrator()).fit(cal_X,
                                                                               seg.predict(cal_X))
    for est in (seg, ens, pipe, tiny_2d):
        crc = ConformalRiskController(est, alpha=0.3, batch_size=5).fit(X, y)
        proba = (est if not isinstance(est, str) else seg).predict_proba(X)
        ref = ConformalRiskController(alpha=0.3).fit(proba, y)
        np.testing.assert_array_equal(crc.threshold_index_, ref.threshold_index_)
        np.testing.assert_array_equal(crc.predict(X), ref.predict(proba))
        np.testing.assert_array_equal(crc.predict_set(X), ref.predict_set(proba))
    with pytest.raises(ValueError, match="Pipeline must be fitted"):
        ConformalRiskController(make_pipeline(OnnxSegmenter(tiny_2d), TemperatureCalibrator())
                                ).fit(X, y)


def test_save_load_clone_and_pickle(tiny_2d, tmp_path):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10, 1, 16, 16)).astype(np.float32)
    seg = OnnxSegmenter(tiny_2d).fit()
    y = rng.integers(0, 3, size=(10, 16, 16))
    crc = ConformalRiskController(seg, risk="fdr", alpha=0.7, delta=0.4, set_score="aps").fit(
        X, y)
    assert clone(crc).get_params()["risk"] == "fdr"
    uqseg.save(crc, tmp_path / "crc")
    back = uqseg.load(tmp_path / "crc")
    assert isinstance(back, ConformalRiskController) and back.get_params()["delta"] == 0.4
    np.testing.assert_array_equal(back.lambda_, crc.lambda_)
    np.testing.assert_array_equal(back.predict(X), crc.predict(X))
    np.testing.assert_array_equal(back.predict_set(X), crc.predict_set(X))
    # every learned attribute is recomputable from the saved statistics (a load-time check)
    redo = clone(back)
    redo.stats_, redo.n_classes_, redo.target_kind_ = back.stats_, back.n_classes_, "labels"
    redo._solve_all()
    for attr in ("threshold_index_", "lambda_", "empirical_risk_", "n_calibration_",
                 "set_threshold_index_", "mean_set_size_"):
        np.testing.assert_array_equal(getattr(redo, attr), getattr(crc, attr))
    again = pickle.loads(pickle.dumps(crc))
    np.testing.assert_array_equal(again.predict(X), crc.predict(X))


def test_predict_set_says_why_it_has_no_quantile():
    proba, y = noisy_binary(1, n=2)
    y[:, 0, 0] = 1
    crc = ConformalRiskController(alpha=0.3, delta=0.5, n_bins=NB).fit(proba, y)  # LTT: n >= 2
    assert crc.lambda_.shape == (1,)
    with pytest.raises(ValueError, match="prediction sets: .*at least 3 calibration images"):
        crc.predict_set(proba)


def test_aps_scores_by_hand():
    p = np.array([[[[0.5]], [[0.3]], [[0.2]]], [[[0.4]], [[0.4]], [[0.2]]]], np.float32)
    y = np.array([[[0]], [[2]]])
    crc = ConformalRiskController(alpha=0.5, set_score="aps", n_bins=10, classes=[0]).fit(
        np.repeat(p, 3, axis=0), np.repeat(y, 3, axis=0))
    # scores (mass strictly more likely): image 1 -> (0, 0.5, 0.8); image 2 -> (0, 0, 0.8)
    sets = crc.predict_set(p)[:, :, 0, 0]
    q = crc.set_threshold_index_[0]
    ref = np.array([[0, 5, 8], [0, 0, 8]]) <= q
    np.testing.assert_array_equal(sets, ref)
    assert sets[:, 0].all()  # the most likely class is always in the set


@pytest.mark.parametrize(("params"), [
    {"alpha": 0.05}, {"risk": "fdr", "alpha": 0.3}, {"risk": "dice", "delta": 0.1, "alpha": 0.4},
    {"risk": "volume", "delta": 0.2, "alpha": 0.5}, {"set_score": "aps", "mondrian": True}])
def test_recalibrate_equals_a_refit(params):
    proba, y = noisy_binary(4, n=60)
    crc = ConformalRiskController(n_bins=NB).fit(proba, y)
    crc.recalibrate(**params)
    fresh = ConformalRiskController(n_bins=NB, **params).fit(proba, y)
    assert crc.get_params() == fresh.get_params()
    for attr in ("lambda_", "threshold_index_", "empirical_risk_", "n_calibration_",
                 "set_threshold_index_"):
        np.testing.assert_array_equal(getattr(crc, attr), getattr(fresh, attr))
    assert crc.method_ == fresh.method_
    np.testing.assert_array_equal(crc.predict(proba[:4]), fresh.predict(proba[:4]))


def test_recalibrate_refuses_statistics_parameters_and_keeps_state_on_error():
    proba, y = noisy_binary(4, n=30)
    with pytest.raises(NotFittedError):
        ConformalRiskController().recalibrate(alpha=0.2)
    crc = ConformalRiskController(n_bins=NB, alpha=0.2).fit(proba, y)
    before = crc.lambda_.copy()
    with pytest.raises(ValueError, match=r"refit for them\), got \['n_bins'\]"):
        crc.recalibrate(n_bins=50)
    with pytest.raises(ValueError, match="not monotone.*pass delta"):
        crc.recalibrate(risk="dice")
    assert crc.risk == "fnr" and crc.alpha == 0.2
    np.testing.assert_array_equal(crc.lambda_, before)
