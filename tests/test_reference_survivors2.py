"""Second round of tests written against surviving mutants (docs/testing.md, "Mutation
testing"). Each checks real behaviour against an independent reference: brute-force loops
written from the definitions, scipy, or a closed form; error tests pin the type and message."""

from __future__ import annotations

import numpy as np
import pytest

from uqseg.metrics import (
    adaptive_calibration_error,
    detection_report,
    expected_calibration_error,
    fpr_at_tpr,
    hausdorff_distance_95,
    iou_score,
    maximum_calibration_error,
    ood_aupr,
    ood_auroc,
    pearson_r,
    reliability_curve,
    segment_uncertainty,
    spearman_rho,
    uncertainty_error_overlap,
)
from uqseg.metrics.calibration import CalibrationAccumulator
from uqseg.metrics.uncertainty import binary_entropy
from uqseg.uncertainty import MemberAccumulator, entropy, softmax


# ------------------------------------------------------------------ calibration references
def _ref_bins(v, edges):
    """(lo, hi] bins, the first closed at 0: inner edges strictly below v (v's own dtype)."""
    inner = np.asarray(edges)[1:-1].astype(v.dtype)
    return np.array([int(np.sum(x > inner)) for x in v])


def _ref_ece_mce(conf, hit, edges):
    nb = len(edges) - 1
    b = _ref_bins(conf, edges)
    conf = conf.astype(np.float64)
    ece, gaps = 0.0, []
    for i in range(nb):
        sel = b == i
        if sel.any():
            gap = abs(conf[sel].sum() - hit[sel].sum())
            ece += gap
            gaps.append(gap / sel.sum())
    return ece / conf.size, max(gaps)


def _ref_quantile_edges(v, n_bins):
    e = np.quantile(v.astype(np.float64), np.linspace(0, 1, n_bins + 1))
    e[0], e[-1] = 0.0, 1.0
    return np.maximum.accumulate(e)


def _kept(p, y, mask, ignore_index):
    """(n_kept, K) probabilities and labels of the kept voxels, by explicit loops."""
    rows, labels = [], []
    for i in range(p.shape[0]):
        for idx in np.ndindex(*p.shape[2:]):
            if mask is not None and not mask[(i, *idx)]:
                continue
            if ignore_index is not None and y[(i, *idx)] == ignore_index:
                continue
            rows.append(p[(i, slice(None), *idx)])
            labels.append(y[(i, *idx)])
    return np.array(rows), np.array(labels)


def _two_class(v):
    """(1, 2, n) probabilities whose class-0 confidence is exactly ``v``."""
    v = np.asarray(v, dtype=np.float64)
    return np.stack([v, 1.0 - v])[None]


def test_top_label_bins_at_float64_edges_follow_the_lo_hi_rule():
    # 0.30000000000000004 * 10 rounds to 3.0000000000000004 in float64: arithmetic binning
    # alone would put it one bin too high; values just above the last inner edge must stay
    # in the last bin
    e = np.linspace(0.0, 1.0, 11)
    vals = [e[6], e[7], e[9], np.nextafter(e[6], 2), np.nextafter(e[7], 0), e[9] + 1e-9,
            e[9] - 1e-9, 0.55, 1.0, e[8]]
    p = _two_class(vals)
    y = np.array([[0, 1, 0, 0, 1, 1, 0, 1, 0, 0]])
    conf_ref = p[0].max(axis=0)
    hit = (p[0].argmax(axis=0) == y[0]).astype(float)
    b = _ref_bins(conf_ref, e)
    count_ref = np.bincount(b, minlength=10)
    conf, acc, count = reliability_curve(p, y, n_bins=10)
    np.testing.assert_array_equal(count, count_ref)
    assert np.issubdtype(count.dtype, np.integer)  # documented: counts are integers
    for i in range(10):
        if count_ref[i]:
            assert conf[i] == pytest.approx(conf_ref[b == i].mean(), rel=1e-12)
            assert acc[i] == pytest.approx(hit[b == i].mean(), rel=1e-12)
        else:
            assert np.isnan(conf[i]) and np.isnan(acc[i])
    assert (count_ref == 1).any()  # a bin holding exactly one voxel has a value, not NaN
    ece, mce = _ref_ece_mce(conf_ref, hit, e)
    assert expected_calibration_error(p, y, n_bins=10) == pytest.approx(ece, rel=1e-12)
    assert maximum_calibration_error(p, y, n_bins=10) == pytest.approx(mce, rel=1e-12)


def _p_with_bad_voxel(row):
    """(1, K, 4) probabilities: two valid voxels first, then ``row`` twice (past the one-voxel
    slice that the entry check looks at; with chunk_size=2 a block of bad rows only)."""
    k = len(row)
    good = np.full(k, 1.0 / k)
    bad = np.asarray(row, float)
    return np.stack([good, good, bad, bad], axis=1)[None]


@pytest.mark.parametrize("row", [
    [1.5, -0.5],                        # both bounds broken, rows sum to 1
    [-0.1, 0.6, 0.5],                   # only the lower bound broken
    [1 + 2e-6, -1e-6, -1e-6],           # only the upper bound broken (by 1e-6)
])
def test_update_refuses_probabilities_outside_0_1_in_a_later_voxel(row):
    p = _p_with_bad_voxel(row)
    y = np.zeros((1, 4), int)
    for chunk in (2, 4):
        acc = CalibrationAccumulator(n_bins=5, chunk_size=chunk)
        with pytest.raises(ValueError, match=r"^proba must hold probabilities in \[0, 1\]"):
            acc.update(p, y)
        assert acc.n_voxels == 0  # nothing half-added
    with pytest.raises(ValueError, match=r"^proba must hold probabilities in \[0, 1\]"):
        expected_calibration_error(p, y, n_bins=5)


@pytest.mark.parametrize("row", [
    [0.1, 0.8],              # sums to 0.9
    [0.9, 0.9, 0.9],         # sums to 2.7
    [0.2, 0.2, 0.2],         # sums to 0.6
    [1 + 1e-6, 1.0005e-3],   # in range, sums to 1 + 1.0015e-3 (p0 - p1 is within 1e-3 of 1)
])
def test_update_refuses_rows_not_summing_to_one_in_a_later_voxel(row):
    p = _p_with_bad_voxel(row)
    y = np.zeros((1, 4), int)
    for chunk in (2, 4):
        with pytest.raises(ValueError, match=r"^proba must sum to 1 over the class axis"):
            CalibrationAccumulator(n_bins=5, chunk_size=chunk).update(p, y)
    with pytest.raises(ValueError, match=r"^proba must sum to 1 over the class axis"):
        maximum_calibration_error(p, y, n_bins=5)


def test_more_than_127_classes_keep_their_label():
    # class indices above 127 do not fit the int8 fast path: the top class 129 must still
    # count as correct
    k, n = 130, 40
    rng = np.random.default_rng(3)
    top = rng.choice([2, 127, 128, 129], size=n)
    conf = rng.uniform(0.3, 0.95, size=n)
    p = np.full((k, n), 0.0)
    p[:, :] = ((1 - conf) / (k - 1))[None]
    p[top, np.arange(n)] = conf
    y = np.where(rng.random(n) < 0.7, top, 129)[None]
    p = p[None]
    hit = (top == y[0]).astype(float)
    e = np.linspace(0, 1, 16)
    ece, mce = _ref_ece_mce(conf, hit, e)
    assert expected_calibration_error(p, y) == pytest.approx(ece, rel=1e-9)
    assert maximum_calibration_error(p, y) == pytest.approx(mce, rel=1e-9)
    acc = CalibrationAccumulator(scores=True).update(p, y)
    brier = np.mean([((p[0, :, i] - np.eye(k)[y[0, i]]) ** 2).sum() for i in range(n)])
    assert acc.brier == pytest.approx(brier, rel=1e-9)


def _masked_data(seed=5):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(3, 3, 6, 5)) * 2
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = rng.integers(0, 3, size=(3, 6, 5))
    y[rng.random(y.shape) < 0.25] = 7  # ignored
    mask = rng.random(y.shape) < 0.7
    mask[0, 0, 0] = True
    return p, y, mask


@pytest.mark.parametrize("use_mask,ignore", [(True, None), (False, 7), (True, 7)])
def test_adaptive_ece_edges_come_from_the_kept_voxels_only(use_mask, ignore):
    p, y, mask = _masked_data()
    if ignore is None:
        y = np.where(y == 7, 0, y)
    m = mask if use_mask else None
    pv, yv = _kept(p, y, m, ignore)
    nb = 4
    conf = pv.max(axis=1)
    hit = (pv.argmax(axis=1) == yv).astype(float)
    ece, _ = _ref_ece_mce(conf, hit, _ref_quantile_edges(conf, nb))
    got = adaptive_calibration_error(p, y, n_bins=nb, mask=m, ignore_index=ignore)
    assert got == pytest.approx(ece, rel=1e-12)
    cw = []
    for c in range(3):
        e = _ref_quantile_edges(pv[:, c], nb)
        cw.append(_ref_ece_mce(pv[:, c], (yv == c).astype(float), e)[0])
    got = adaptive_calibration_error(p, y, n_bins=nb, classwise=True, mask=m,
                                     ignore_index=ignore)
    assert got == pytest.approx(np.mean(cw), rel=1e-12)


def test_adaptive_ece_with_every_voxel_masked_is_nan():
    p, y, _ = _masked_data()
    y = np.where(y == 7, 0, y)
    none = np.zeros(y.shape, bool)
    assert np.isnan(adaptive_calibration_error(p, y, n_bins=4, mask=none))
    assert np.isnan(adaptive_calibration_error(p, y, n_bins=4, mask=none, classwise=True))
    conf, acc, count = reliability_curve(p, y, n_bins=4, strategy="quantile", mask=none)
    assert conf.shape == acc.shape == count.shape == (4,) and count.sum() == 0


def test_classwise_bins_compare_float32_probabilities_in_float32():
    # float32(0.1) = 0.10000000149 lies above the float64 edge 0.1 but on the float32 edge:
    # compared in the data's dtype it belongs to the lower bin (lo, hi]
    e = np.linspace(0, 1, 11)
    v = e[[1, 2, 3, 4, 6, 7, 9]].astype(np.float32)
    p = np.stack([v, np.float32(1) - v])[None]
    y = np.array([[0, 1, 1, 0, 0, 1, 0]])
    acc = CalibrationAccumulator(n_bins=10, classwise=True).update(p, y)
    ref_ece, ref_mce = [], []
    for c in range(2):
        ece, mce = _ref_ece_mce(p[0, c], (y[0] == c).astype(float), e)
        ref_ece.append(ece)
        ref_mce.append(mce)
    assert acc.classwise_ece == pytest.approx(np.mean(ref_ece), rel=1e-6)
    assert acc.classwise_mce == pytest.approx(np.mean(ref_mce), rel=1e-6)


# ------------------------------------------------------------------ accumulator merging
def _acc(p, y, **kw):
    return CalibrationAccumulator(n_bins=kw.pop("n_bins", 5), **kw).update(p, y)


def test_merge_refuses_incompatible_accumulators_with_clear_messages():
    p, y, _ = _masked_data()
    y = np.where(y == 7, 0, y)
    a = _acc(p, y)
    with pytest.raises(TypeError, match=r"^other must be a CalibrationAccumulator, got int$"):
        a.merge(3)
    e1 = CalibrationAccumulator(edges=[0, 0.3, 1]).update(p, y)
    e2 = CalibrationAccumulator(edges=[0, 0.5, 1]).update(p, y)
    with pytest.raises(ValueError, match=r"^cannot merge accumulators with different bin edges$"):
        e1.merge(e2)
    with pytest.raises(ValueError, match=r"^other was built with scores=False: it has no "
                                         r"Brier/NLL statistics$"):
        a.merge(_acc(p, y, scores=False))
    with pytest.raises(ValueError, match=r"^other does not keep class-wise histograms$"):
        _acc(p, y, classwise=True).merge(_acc(p, y))
    two = np.stack([p[:, 0], 1 - p[:, 0]], axis=1)
    with pytest.raises(ValueError, match=r"^cannot merge 2 classes into 3$"):
        a.merge(_acc(two, np.zeros_like(y)))


def test_merge_into_an_empty_accumulator_and_from_a_classwise_one():
    p, y, _ = _masked_data()
    y = np.where(y == 7, 0, y)
    pv, yv = _kept(p, y, None, None)
    e = np.linspace(0, 1, 6)
    ref = np.mean([_ref_ece_mce(pv[:, c], (yv == c).astype(float), e)[0] for c in range(3)])
    empty = CalibrationAccumulator(n_bins=5, classwise=True)
    empty.merge(_acc(p, y, classwise=True))
    assert empty.n_classes == 3
    assert empty.classwise_ece == pytest.approx(ref, rel=1e-12)
    # a plain accumulator takes the top-label statistics of a class-wise one
    conf, hit = pv.max(axis=1), (pv.argmax(axis=1) == yv).astype(float)
    plain = _acc(p[:1], y[:1]).merge(_acc(p[1:], y[1:], classwise=True))
    assert plain.ece == pytest.approx(_ref_ece_mce(conf, hit, e)[0], rel=1e-12)


# ------------------------------------------------------------------ uncertainty maps
def _ref_entropy(p, axis):
    from scipy.stats import entropy as sp_entropy

    return sp_entropy(np.asarray(p, np.float64), axis=axis)


def test_entropy_of_one_distribution_is_a_scalar():
    for p, h in [([0.5, 0.5], np.log(2)), ([0.25] * 4, np.log(4)), ([1.0, 0.0], 0.0),
                 ([0.2, 0.3, 0.5], _ref_entropy([0.2, 0.3, 0.5], 0))]:
        got = entropy(np.array(p), axis=0)
        assert np.ndim(got) == 0
        assert float(got) == pytest.approx(h, abs=1e-15)


def test_entropy_keeps_float32_and_converts_integers():
    from uqseg.uncertainty import entropy as ent

    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.ones(3), size=(2, 4)).transpose(0, 2, 1)  # (2, 3, 4)
    h32 = ent(p.astype(np.float32))
    assert h32.dtype == np.float32  # a float32 map stays float32 (memory of 3-D volumes)
    np.testing.assert_allclose(h32, _ref_entropy(p, 1), rtol=1e-5)
    onehot = np.eye(3, dtype=np.int64)[[0, 2, 1, 1]].T[None]  # integer one-hot (1, 3, 4)
    np.testing.assert_array_equal(ent(onehot), np.zeros((1, 4)))


def test_binary_entropy_dtypes():
    p = np.array([0.1, 0.5, 0.9], np.float32)
    h = binary_entropy(p)
    assert h.dtype == np.float32
    np.testing.assert_allclose(h, -(p * np.log(p) + (1 - p) * np.log(1 - p)), rtol=1e-6)
    # a boolean map (0/1 probabilities) is accepted: entropy 0
    np.testing.assert_array_equal(binary_entropy(np.array([True, False])), [0.0, 0.0])


def test_softmax_accepts_integers_and_other_axes_and_refuses_complex():
    from scipy.special import softmax as sp_softmax

    z = np.array([[1, 2, 3], [0, 0, 5]])
    np.testing.assert_allclose(softmax(z, axis=1), sp_softmax(z.astype(float), axis=1),
                               rtol=1e-6)
    np.testing.assert_allclose(softmax(z, axis=0), sp_softmax(z.astype(float), axis=0),
                               rtol=1e-6)
    z64 = np.random.default_rng(1).normal(size=(3, 2, 4))
    np.testing.assert_allclose(softmax(z64, axis=0), sp_softmax(z64, axis=0), rtol=1e-6)
    np.testing.assert_allclose(softmax(z64, axis=2), sp_softmax(z64, axis=2), rtol=1e-6)
    with pytest.raises(TypeError, match=r"^logits must hold real numbers, got dtype complex128$"):
        softmax(np.ones((1, 2, 3), complex))
    with pytest.raises(TypeError, match=r"^logits must hold real numbers, got dtype bool$"):
        softmax(np.ones((1, 2, 3), bool))


def test_member_accumulator_messages_and_mean_dtype():
    acc = MemberAccumulator()
    with pytest.raises(ValueError, match=r"^proba must hold probabilities"):
        acc.add(np.full((1, 2, 3), 2.0))
    with pytest.raises(TypeError, match=r"^other must be a MemberAccumulator, got list$"):
        acc.merge([])
    p = np.array([[[0.2, 0.7]], [[0.8, 0.3]]]).transpose(1, 0, 2)  # (1, 2, 2)
    acc.add(p)
    m = acc.mean()
    assert m.dtype == np.float32  # documented: the mean is float32
    np.testing.assert_allclose(m, p, rtol=1e-7)
    other = MemberAccumulator().add(np.full((1, 2, 3), 0.5))
    with pytest.raises(ValueError, match=r"^cannot merge shapes \(1, 2, 3\) and \(1, 2, 2\)$"):
        acc.merge(other)


@pytest.mark.parametrize("empty", [True, False])
def test_member_accumulator_merge_refuses_a_partner_missing_one_kind(empty):
    p = np.array([[[0.2, 0.7]], [[0.8, 0.3]]]).transpose(1, 0, 2)
    msg = r"^other does not track every kind this accumulator needs$"
    for kinds in [("expected_entropy",), ("variance",)]:  # lacks variance / lacks entropy sum
        full = MemberAccumulator()
        if not empty:
            full.add(p)
        with pytest.raises(ValueError, match=msg):
            full.merge(MemberAccumulator(kinds=kinds).add(p))


def test_member_accumulator_merge_of_untracked_kinds():
    # neither side tracks variance or the entropy sum: merging into an empty one works
    p = np.array([[[0.2, 0.7]], [[0.8, 0.3]]]).transpose(1, 0, 2)
    q = np.array([[[0.6, 0.1]], [[0.4, 0.9]]]).transpose(1, 0, 2)
    other = MemberAccumulator(kinds=("entropy",)).add(p).add(q, weight=3.0)
    acc = MemberAccumulator(kinds=("entropy",)).merge(other)
    mean = (p + 3 * q) / 4
    np.testing.assert_allclose(acc.mean(), mean, rtol=1e-6)
    np.testing.assert_allclose(acc.entropy(), _ref_entropy(mean, 1), rtol=1e-6)
    assert acc.n_members == 2 and acc.total_weight == 4.0


# ------------------------------------------------------------------ ensemble statistics
def test_softmax_entropy_of_large_and_spread_logits():
    from scipy.special import softmax as sp_softmax

    from uqseg._numeric import softmax_entropy as _softmax_entropy

    # voxel 0 near +100, voxel 1 near -300: shifting by one global maximum (or adding the
    # maximum) would overflow or underflow to 0/0
    z = np.array([[[100.0, -300.0]], [[99.0, -301.5]], [[97.0, -299.0]]], np.float32)
    z = z.transpose(1, 0, 2).copy()  # (1, 3, 2)
    ref_p = sp_softmax(z.astype(np.float64), axis=1)
    ref_h = _ref_entropy(ref_p, 1)
    p, h = _softmax_entropy(z.copy(), True)
    np.testing.assert_allclose(p, ref_p, rtol=1e-5)
    np.testing.assert_allclose(h, ref_h, rtol=1e-5)
    p2, none = _softmax_entropy(z.copy(), False)
    assert none is None
    np.testing.assert_allclose(p2, ref_p, rtol=1e-5)


def test_finish_clips_rounding_negatives_and_derives_missing_maps():
    from uqseg._ensemble_engine import EnsembleEngine as EnsembleSegmenter  # holds _finish

    p = np.array([[[0.5, 0.9]], [[0.5, 0.1]]], np.float32).transpose(1, 0, 2)  # (1, 2, 2)
    h = _ref_entropy(p, 1).astype(np.float32)
    # rounding in the running sums can leave the expected entropy a hair above the entropy
    # of the mean, and the mean of squares a hair below the squared mean
    res = {"proba": p, "expected_entropy": h + np.float32(1e-6),
           "mean_sq": p * p - np.float32(1e-6)}
    kinds = frozenset({"entropy", "expected_entropy", "mutual_information", "variance"})
    out = EnsembleSegmenter._finish(dict(res), kinds)
    np.testing.assert_allclose(out["entropy"], h, rtol=1e-6)
    np.testing.assert_array_equal(out["mutual_information"], np.zeros((1, 2)))
    np.testing.assert_array_equal(out["variance"], np.zeros((1, 2)))
    half = np.full_like(p, 0.5)
    res2 = {"proba": p, "expected_entropy": np.zeros((1, 2), np.float32), "mean_sq": half}
    out2 = EnsembleSegmenter._finish(res2, kinds)
    np.testing.assert_allclose(out2["mutual_information"], h, rtol=1e-6)
    ref_var = np.maximum(0.5 - p.astype(np.float64) ** 2, 0).mean(axis=1)
    np.testing.assert_allclose(out2["variance"], ref_var, rtol=1e-6)


# ------------------------------------------------------------------ OOD, quality, overlap
def test_ood_metrics_name_the_bad_argument():
    good = [0.1, 0.5, 0.9]
    for fn in (ood_auroc, ood_aupr, fpr_at_tpr, lambda a, b: detection_report(a, b, 0.5)):
        with pytest.raises(ValueError, match=r"^scores_in contains NaN or infinite values$"):
            fn([0.1, np.nan], good)
        with pytest.raises(ValueError, match=r"^scores_out is empty: at least one score"):
            fn(good, [])
        with pytest.raises(TypeError, match=r"^scores_out must hold real numbers"):
            fn(good, ["a"])
    with pytest.raises(ValueError, match=r"^threshold must be a finite number, got nan$"):
        detection_report(good, good, float("nan"))
    with pytest.raises(ValueError, match=r"^tpr must be"):
        fpr_at_tpr(good, good, tpr=1.5)


def test_detection_report_accepts_a_score_equal_to_the_threshold():
    # documented rule: a sample is accepted (in-distribution) when score >= threshold
    a, b = np.array([0.2, 0.5, 0.9]), np.array([0.1, 0.5, 0.5, 0.7])
    rep = detection_report(a, b, 0.5)
    tn, tp = int(np.sum(a >= 0.5)), int(np.sum(b < 0.5))
    assert (tn, tp) == (2, 1)
    assert rep["sensitivity"] == tp / 4 and rep["specificity"] == tn / 3
    assert rep["accuracy"] == (tp + tn) / 7


def test_correlations_of_two_points_and_of_a_unit_range():
    from scipy import stats

    assert pearson_r([0.2, 0.4], [0.1, 0.9]) == pytest.approx(1.0)
    assert pearson_r([0.2, 0.4], [0.9, 0.1]) == pytest.approx(-1.0)
    p, t = [0.1, 0.5, 0.3, 0.8], [0.0, 1.0, 0.2, 0.6]  # true side spans exactly 1
    assert pearson_r(p, t) == pytest.approx(stats.pearsonr(p, t)[0], rel=1e-12)
    assert spearman_rho(p, t) == pytest.approx(stats.spearmanr(p, t)[0], rel=1e-12)


def test_iou_with_more_classes_than_labels_seen():
    pred = np.array([[[0, 1, 1], [2, 2, 0]]])
    y = np.array([[[0, 1, 0], [2, 1, 0]]])
    got = iou_score(pred, y, n_classes=4)
    assert got.shape == (1, 3)
    np.testing.assert_allclose(got[0, :2], [1 / 3, 1 / 2])
    assert np.isnan(got[0, 2])  # class 3 absent from both: undefined


def _ref_surface(m):
    out = np.zeros_like(m)
    for idx in zip(*np.nonzero(m), strict=True):
        for ax in range(m.ndim):
            for d in (-1, 1):
                j = list(idx)
                j[ax] += d
                if not (0 <= j[ax] < m.shape[ax]) or not m[tuple(j)]:
                    out[idx] = True
    return out


def _ref_hd95(a, b, sp):
    sa, sb = np.argwhere(_ref_surface(a)) * sp, np.argwhere(_ref_surface(b)) * sp
    d = np.sqrt(((sa[:, None] - sb[None]) ** 2).sum(-1))
    return max(np.percentile(d.min(1), 95), np.percentile(d.min(0), 95))


def test_hd95_objects_touching_the_image_border():
    pred = np.zeros((1, 9, 8), int)
    y = np.zeros((1, 9, 8), int)
    pred[0, 0:5, 0:4] = 1   # touches two image borders
    y[0, 0:6, 1:5] = 1
    pred[0, 6:9, 5:8] = 2   # the opposite corner
    y[0, 5:9, 6:8] = 2
    sp = np.array([1.5, 0.7])
    got = hausdorff_distance_95(pred, y, spacing=sp, n_classes=4)
    assert got.shape == (1, 3) and got.dtype == np.float64
    for c in (1, 2):
        assert got[0, c - 1] == pytest.approx(_ref_hd95(pred[0] == c, y[0] == c, sp), rel=1e-12)
    assert np.isnan(got[0, 2])  # class 3 in neither map


def test_hd95_spacing_and_rank_errors():
    pred = np.zeros((1, 4, 4), int)
    pred[0, 1, 1] = 1
    msg = r"^spacing must be one positive number or 2 of them"
    for bad in ([[1.0, 1.0]], 0.0, [1.0, 0.0], [1.0, 2.0, 3.0]):
        with pytest.raises(ValueError, match=msg):
            hausdorff_distance_95(pred, pred, spacing=bad)
    two, three = np.ones((3, 3), int), np.ones((3, 3, 3), int)
    with pytest.raises(ValueError, match=r"^pred\[1\] has 3 spatial axes, expected 2$"):
        hausdorff_distance_95([two, three], [two, three])


def test_ueo_best_cut_just_below_the_maximum_and_a_cut_above_everything():
    unc = np.zeros((1, 5, 5))
    unc[0, 0, 0], unc[0, 0, 1] = 0.985, 1.0
    pred, y = np.zeros((1, 5, 5), int), np.zeros((1, 5, 5), int)
    pred[0, 0, 1] = 1  # the only error, at the highest uncertainty
    # default cuts lo + j (hi - lo) / 100, j < 100: only j = 99 separates 1.0 from 0.985
    ueo, t = uncertainty_error_overlap(unc, pred, y, return_threshold=True)
    assert ueo == 1.0 and t == pytest.approx(0.99)
    # a single cut above every voxel: nothing flagged, Dice 0 (defined: there is an error)
    ueo, t = uncertainty_error_overlap(unc, pred, y, thresholds=[5.0], return_threshold=True)
    assert ueo == 0.0 and t == 5.0


def test_segment_uncertainty_names_its_arguments():
    p = np.full((1, 2, 3, 3), 0.5)
    with pytest.raises(ValueError, match=r"^proba must hold probabilities"):
        segment_uncertainty(p * 3)
    with pytest.raises(ValueError, match=r"^pred has shape"):
        segment_uncertainty(p, np.zeros((1, 3, 4), int))


# ------------------------------------------------------------------ temperature scaling
def _ref_wnll(z, y, w, t):
    from scipy.special import log_softmax

    lp = log_softmax(z.astype(np.float64) / np.reshape(t, (-1, 1)), axis=0)
    return float(np.sum(-lp[y, np.arange(y.size)] * w) / w.sum())


@pytest.mark.parametrize("classwise", [False, True])
def test_objective_with_an_absent_top_class_and_spread_logits(classwise):
    from scipy.optimize import approx_fprime

    from uqseg.calibration import _objective

    rng = np.random.default_rng(2)
    k, n = 4, 50
    z = rng.normal(size=(k, n)) * 3
    z[:, :5] *= 300  # voxels with logits in the hundreds next to ordinary ones
    y = rng.integers(0, k - 1, size=n)  # class k - 1 never occurs in the sample
    w = rng.uniform(0.5, 3.0, size=n)
    fun = _objective(z.astype(np.float32), y, w, classwise)
    log_t = np.array([0.3, -0.2, 0.1, 0.5]) if classwise else np.array([0.4])
    t = np.exp(log_t) if classwise else np.full(k, np.exp(log_t[0]))
    zf = z.astype(np.float32)
    f, g = fun(log_t)
    assert f == pytest.approx(_ref_wnll(zf, y, w, t), rel=1e-9)
    if classwise:
        ref_g = approx_fprime(log_t, lambda lt: _ref_wnll(zf, y, w, np.exp(lt)), 1e-7)
    else:
        ref_g = approx_fprime(log_t, lambda lt: _ref_wnll(zf, y, w, np.full(k, np.exp(lt[0]))),
                              1e-7)
    np.testing.assert_allclose(g, ref_g, rtol=1e-4, atol=1e-6)


def test_ece_objective_puts_confidence_one_in_the_last_bin():
    from uqseg.calibration import _ece_objective

    # voxel 0: confidence exactly 1 and wrong; voxel 1: confidence 0.95, right. Both belong to
    # the last of 10 bins, where their gaps partly cancel: |1 - 0 + 0.95 - 1| / 2
    z = np.array([[100.0, np.log(0.95 / 0.05)], [0.0, 0.0]], np.float32)
    y = np.array([1, 0])
    ece = _ece_objective(z, y, np.ones(2), 10)(0.0)
    conf = 1 / (1 + np.exp(z[1] - z[0]).astype(np.float64))
    assert conf[0] == 1.0
    assert ece == pytest.approx(abs(conf[0] - 0 + conf[1] - 1) / 2, rel=1e-6)


def test_minimize_ece_refines_between_the_neighbours_of_the_best_grid_point():
    from uqseg.calibration import _minimize_ece

    grid = np.linspace(np.log(0.05), np.log(20.0), 49)
    for c in [(grid[0] + grid[1]) / 2, (grid[-2] + grid[-1]) / 2, grid[20] + 0.01]:
        best, n_eval = _minimize_ece(lambda x, c=c: (float(x) - c) ** 2)
        assert best == pytest.approx(c, abs=2e-4)
        assert n_eval > 49
    # a function lower only exactly on one grid point: the search cannot beat the grid point,
    # which is kept
    spike = grid[30]
    best, _ = _minimize_ece(lambda x: 0.0 if float(x) == spike else 1.0)
    assert best == spike
    # a flat function: the search's point ties with the grid point and is kept (<=)
    best, _ = _minimize_ece(lambda x: 1.0)
    assert grid[0] < best <= grid[1]


def test_singleton_stratum_keeps_its_weight_in_the_exact_fit():
    from scipy.optimize import minimize_scalar

    from uqseg.calibration import TemperatureCalibrator

    rng = np.random.default_rng(4)
    n = 300
    z = rng.normal(size=(1, 3, 1, n)).astype(np.float32) * 2
    z[0, 2] -= 6  # class 2 is never predicted ...
    y = rng.integers(0, 2, size=(1, 1, n))
    y[0, 0, 7] = 2  # ... and occurs once: a stratum of one voxel
    z[0, 0, 0, 7], z[0, 1, 0, 7] = 8.0, 0.0  # confidently wrong there
    cal = TemperatureCalibrator().fit(z, y)
    zz, yy = z[0, :, 0], y[0, 0]
    res = minimize_scalar(lambda lt: _ref_wnll(zz, yy, np.ones(n), np.full(3, np.exp(lt))),
                          bounds=(np.log(1e-2), np.log(1e2)), method="bounded",
                          options={"xatol": 1e-8})
    assert cal.temperature_ == pytest.approx(np.exp(res.x), rel=1e-3)
    proba = cal.predict_proba(z)
    assert proba.dtype == np.float32  # documented float32
    from scipy.special import softmax as sp_softmax

    np.testing.assert_allclose(proba, sp_softmax(z / cal.temperature_, axis=1), rtol=1e-5)


# ------------------------------------------------------------------ OOD feature statistics
def _ref_pool(f, grid):
    """Adaptive average pooling by explicit windows, sums with math.fsum (exact rounding)."""
    import math

    n, c = f.shape[:2]
    sp = f.shape[2:]
    out = np.zeros((n, c, *grid))
    for cell in np.ndindex(*grid):
        sl = tuple(slice((i * s) // g, -((-(i + 1) * s) // g))
                   for i, s, g in zip(cell, sp, grid, strict=True))
        for a in range(n):
            for b in range(c):
                vals = np.asarray(f[(a, b, *sl)], np.float64).ravel()
                out[(a, b, *cell)] = math.fsum(vals) / vals.size
    return out


def test_adaptive_avg_pool_exact_means_per_axis():
    from uqseg.ood import adaptive_avg_pool

    rng = np.random.default_rng(6)
    f = rng.normal(size=(2, 2, 4, 6))
    # first axis already at its size, second pooled: both axes must be handled
    np.testing.assert_allclose(adaptive_avg_pool(f, (4, 3)), _ref_pool(f, (4, 3)), rtol=1e-12)
    np.testing.assert_allclose(adaptive_avg_pool(f, (4, 4)), _ref_pool(f, (4, 4)), rtol=1e-12)
    # large and small values side by side: equal windows are plain means (a cumulative sum
    # would cancel the small values), float32 input averaged in float64
    big = np.array([1e16, 1.0, 1.0, 1.0, 3.0, 5.0])[None, None]
    np.testing.assert_array_equal(adaptive_avg_pool(big, 3), [[[5e15, 1.0, 4.0]]])
    f32 = np.array([16777216.0, 1.0, 16777216.0, 3.0, 2.0], np.float32)[None, None]
    np.testing.assert_allclose(adaptive_avg_pool(f32, 1), _ref_pool(f32, (1,)), rtol=1e-15)
    np.testing.assert_allclose(adaptive_avg_pool(f32, 2), _ref_pool(f32, (2,)), rtol=1e-15)
    np.testing.assert_allclose(adaptive_avg_pool(f32, 3), _ref_pool(f32, (3,)), rtol=1e-15)


def test_spectral_signature_defaults_against_a_direct_svd():
    from uqseg.ood import singular_values, spectral_signature

    rng = np.random.default_rng(7)
    f = rng.normal(size=(2, 3, 20, 18))
    pooled = _ref_pool(f, (8, 8)).reshape(2, 3, -1)
    s = np.linalg.svd(pooled, compute_uv=False)
    sig = np.log(s + 1e-6)
    sig /= np.linalg.norm(sig, axis=1, keepdims=True)
    np.testing.assert_allclose(spectral_signature(f), sig, rtol=1e-10)
    # float32 input with nearly parallel rows: the Gram matrix must be formed in float64 (a
    # float32 one loses the smallest singular value entirely)
    v, w, x = rng.normal(size=(3, 40))
    a = np.stack([v, v + 1e-3 * w, v - 1e-3 * w + 1e-4 * x]).astype(np.float32)[None]
    ref = np.linalg.svd(a[0].astype(np.float64), compute_uv=False)
    np.testing.assert_allclose(singular_values(a)[0], ref, rtol=1e-5)


@pytest.mark.parametrize("k", [2, 3, 7])
def test_kth_euclidean_against_sorted_distances(k):
    from scipy.spatial.distance import cdist

    from uqseg.ood import _kth_euclidean

    rng = np.random.default_rng(k)
    train, query = rng.normal(size=(200, 5)), rng.normal(size=(30, 5))
    ref = np.sort(cdist(query, train), axis=1)[:, k - 1]
    np.testing.assert_allclose(_kth_euclidean(train, query, k), ref, rtol=1e-9)


def test_fused_graph_statistics_are_used_without_a_numpy_entropy_pass(tiny_members, monkeypatch):
    # with the statistics computed inside the fused graph (the GPU default) and no flips, the
    # entropy comes from the graph: the numpy pass over the probabilities must not run
    import uqseg._ensemble_engine as ens_mod
    from uqseg.ensemble import EnsembleSegmenter

    X = np.random.default_rng(0).standard_normal((2, 1, 8, 12)).astype(np.float32)
    ens = EnsembleSegmenter(tiny_members, fuse=True, device="cpu", fused_stats="graph").fit()

    def no_numpy_pass(proba):
        raise AssertionError("numpy entropy pass on the fused single-pass path")

    monkeypatch.setattr(ens_mod, "categorical_entropy", no_numpy_pass)
    proba, maps = ens.predict_with_uncertainty(X, kinds=("entropy", "mutual_information"))
    np.testing.assert_allclose(maps["entropy"], _ref_entropy(proba, 1), atol=2e-5)
    assert (maps["mutual_information"] >= 0).all()


def test_adaptive_ece_over_several_voxel_blocks_of_one_image():
    # 300 x 300 voxels exceed one 2**16-voxel block: the confidences are collected block by
    # block (unequal last block) before the quantile edges are taken
    rng = np.random.default_rng(8)
    z = rng.normal(size=(1, 2, 300, 300)) * 2
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = (rng.random((1, 300, 300)) < p[:, 1]).astype(int)
    conf = p.max(axis=1).ravel()
    hit = (p.argmax(axis=1) == y).ravel()
    e = _ref_quantile_edges(conf, 6)
    b = (conf[:, None] > e[None, 1:-1]).sum(axis=1)
    ece = sum(abs(conf[b == i].sum() - hit[b == i].sum()) for i in range(6)) / conf.size
    assert adaptive_calibration_error(p, y, n_bins=6) == pytest.approx(ece, rel=1e-9)
