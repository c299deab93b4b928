"""Second round of tests written against surviving mutants (docs/testing.md, "Mutation
testing"). Each checks real behaviour against an independent reference: brute-force loops
written from the definitions, scipy, or a closed form; error tests pin the type and message."""

from __future__ import annotations

import numpy as np
import pytest

from uqseg.metrics import (
    adaptive_calibration_error,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_curve,
)
from uqseg.metrics.calibration import CalibrationAccumulator


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
    """(1, K, 4) probabilities: three valid voxels first, then ``row`` (past the one-voxel
    slice that the entry check looks at)."""
    k = len(row)
    good = np.full(k, 1.0 / k)
    return np.stack([good, good, good, np.asarray(row, float)], axis=1)[None]


@pytest.mark.parametrize("row", [
    [1.5, -0.5],                        # both bounds broken, rows sum to 1
    [-0.1, 0.6, 0.5],                   # only the lower bound broken
    [1 + 2e-6, -1e-6, -1e-6],           # only the upper bound broken (by 1e-6)
])
def test_update_refuses_probabilities_outside_0_1_in_a_later_voxel(row):
    p = _p_with_bad_voxel(row)
    y = np.zeros((1, 4), int)
    acc = CalibrationAccumulator(n_bins=5)
    with pytest.raises(ValueError, match=r"^proba must hold probabilities in \[0, 1\]"):
        acc.update(p, y)
    assert acc.n_voxels == 0  # nothing half-added
    with pytest.raises(ValueError, match=r"^proba must hold probabilities in \[0, 1\]"):
        expected_calibration_error(p, y, n_bins=5)


@pytest.mark.parametrize("row", [[0.1, 0.8], [0.9, 0.9, 0.9], [0.2, 0.2, 0.2]])
def test_update_refuses_rows_not_summing_to_one_in_a_later_voxel(row):
    p = _p_with_bad_voxel(row)
    y = np.zeros((1, 4), int)
    with pytest.raises(ValueError, match=r"^proba must sum to 1 over the class axis"):
        CalibrationAccumulator(n_bins=5).update(p, y)
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
