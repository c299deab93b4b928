"""Calibration metrics against a brute-force numpy reference written from the definitions.

Probabilities are quantised to multiples of 1/16 with 8 bins (exact in binary), so half the
confidences lie exactly on bin edges: the ``(lo, hi]`` rule, the first-argmax tie rule and the
class-wise binning are all pinned, not only averages over random data.
"""

from __future__ import annotations

import numpy as np
import pytest

from uqseg.metrics import (
    adaptive_calibration_error,
    brier_score,
    expected_calibration_error,
    maximum_calibration_error,
    negative_log_likelihood,
    reliability_curve,
)
from uqseg.metrics.calibration import CalibrationAccumulator


def _quantised(n=3, k=3, shape=(9, 7), q=16, seed=0):
    """Probabilities in multiples of 1/q (rows sum to exactly 1) and labels."""
    rng = np.random.default_rng(seed)
    cuts = np.sort(rng.integers(0, q + 1, size=(n, *shape, k - 1)), axis=-1)
    parts = np.diff(np.concatenate([np.zeros((n, *shape, 1), int), cuts,
                                    np.full((n, *shape, 1), q)], axis=-1), axis=-1)
    p = np.moveaxis(parts / q, -1, 1).astype(np.float64)
    # labels drawn from p itself: calibrated on average, so per-bin gaps have both signs and
    # moving a voxel between bins changes the ECE (not only the MCE)
    u = rng.random((n, *shape))[:, None]
    y = (np.cumsum(p, axis=1) < u).sum(axis=1).clip(0, k - 1)
    return p, y


def _bin_of(v, edges):
    """(lo, hi] bins, the first one closed at 0: the number of inner edges strictly below v."""
    return (v[:, None] > edges[None, 1:-1]).sum(axis=1)


def _table(v, hit, edges):
    nb = edges.size - 1
    b = _bin_of(v, edges)
    count = np.array([np.sum(b == i) for i in range(nb)])
    conf = np.array([v[b == i].sum() for i in range(nb)])
    acc = np.array([hit[b == i].sum() for i in range(nb)])
    return count, conf, acc


def _flat(p, y, mask=None):
    k = p.shape[1]
    pv = np.moveaxis(p, 1, -1).reshape(-1, k)
    yv = y.reshape(-1)
    if mask is not None:
        pv, yv = pv[mask.reshape(-1)], yv[mask.reshape(-1)]
    return pv, yv


def ref_top(p, y, n_bins, mask=None, edges=None):
    pv, yv = _flat(p, y, mask)
    edges = np.linspace(0, 1, n_bins + 1) if edges is None else edges
    conf = pv.max(axis=1)
    hit = (pv.argmax(axis=1) == yv).astype(float)  # first argmax wins ties
    count, c, a = _table(conf, hit, edges)
    gaps = np.abs(c - a)
    ece = gaps.sum() / conf.size
    mce = max(gaps[i] / count[i] for i in range(len(count)) if count[i])
    with np.errstate(invalid="ignore"):
        curve = (c / count, a / count, count)
    return ece, mce, curve


def ref_classwise(p, y, n_bins, mask=None, class_edges=None):
    pv, yv = _flat(p, y, mask)
    eces, mces = [], []
    for c in range(pv.shape[1]):
        edges = np.linspace(0, 1, n_bins + 1) if class_edges is None else class_edges[c]
        count, s, a = _table(pv[:, c], (yv == c).astype(float), edges)
        gaps = np.abs(s - a)
        eces.append(gaps.sum() / pv.shape[0])
        mces.append(max(gaps[i] / count[i] for i in range(len(count)) if count[i]))
    return float(np.mean(eces)), float(np.mean(mces))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_top_label_ece_mce_and_curve_on_bin_edges(dtype):
    p, y = _quantised(seed=1)
    ece, mce, (conf, acc, count) = ref_top(p, y, 8)
    pd = p.astype(dtype)
    assert expected_calibration_error(pd, y, n_bins=8) == pytest.approx(ece, abs=1e-6)
    assert maximum_calibration_error(pd, y, n_bins=8) == pytest.approx(mce, abs=1e-6)
    got = reliability_curve(pd, y, n_bins=8)
    np.testing.assert_array_equal(got[2], count)
    np.testing.assert_allclose(got[0], conf, atol=1e-6)
    np.testing.assert_allclose(got[1], acc, atol=1e-12)
    # the edge rule matters on this data: the half-open rule the other way round differs
    other = ref_top(p, y, 8, edges=np.linspace(0, 1, 9) - 1e-12)[0]
    assert abs(other - ece) > 1e-3


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_classwise_ece_and_mce_on_bin_edges(dtype):
    p, y = _quantised(k=4, seed=2)
    ece, mce = ref_classwise(p, y, 8)
    pd = p.astype(dtype)
    assert expected_calibration_error(pd, y, n_bins=8, classwise=True) == pytest.approx(
        ece, abs=1e-6)
    assert maximum_calibration_error(pd, y, n_bins=8, classwise=True) == pytest.approx(
        mce, abs=1e-6)
    assert abs(ref_classwise(p, y, 8, class_edges=[np.linspace(0, 1, 9) - 1e-12] * 4)[0]
               - ece) > 1e-3


def test_random_probabilities_many_bins_against_reference():
    rng = np.random.default_rng(3)
    p = rng.dirichlet(np.full(5, 0.4), size=(2, 6, 5, 4)).transpose(0, 4, 1, 2, 3)  # 3-D
    y = rng.integers(0, 5, size=(2, 6, 5, 4))
    for n_bins in (1, 7, 15):
        ece, mce, _ = ref_top(p, y, n_bins)
        assert expected_calibration_error(p, y, n_bins=n_bins) == pytest.approx(ece, abs=1e-9)
        assert maximum_calibration_error(p, y, n_bins=n_bins) == pytest.approx(mce, abs=1e-9)
        cece, cmce = ref_classwise(p, y, n_bins)
        assert expected_calibration_error(p, y, n_bins=n_bins, classwise=True) == pytest.approx(
            cece, abs=1e-9)
        assert maximum_calibration_error(p, y, n_bins=n_bins, classwise=True) == pytest.approx(
            cmce, abs=1e-9)


def test_mask_and_ignore_index_select_the_same_voxels_as_the_reference():
    p, y = _quantised(seed=4)
    rng = np.random.default_rng(4)
    mask = rng.random(y.shape) < 0.6
    ece, mce, _ = ref_top(p, y, 8, mask=mask)
    assert expected_calibration_error(p, y, n_bins=8, mask=mask) == pytest.approx(ece, abs=1e-9)
    assert maximum_calibration_error(p, y, n_bins=8, mask=mask) == pytest.approx(mce, abs=1e-9)
    y_ign = np.where(mask, y, 255)
    assert expected_calibration_error(p, y_ign, n_bins=8, ignore_index=255) == pytest.approx(
        ece, abs=1e-9)
    cece, _ = ref_classwise(p, y, 8, mask=mask)
    assert expected_calibration_error(p, y, n_bins=8, classwise=True,
                                      mask=mask) == pytest.approx(cece, abs=1e-9)
    pv, yv = _flat(p, y, mask)
    onehot = np.eye(p.shape[1])[yv]
    assert brier_score(p, y, mask) == pytest.approx(((pv - onehot) ** 2).sum(1).mean(), abs=1e-12)
    assert brier_score(p, y_ign, ignore_index=255) == pytest.approx(
        ((pv - onehot) ** 2).sum(1).mean(), abs=1e-12)


def test_brier_and_nll_closed_forms_with_zero_probabilities():
    p, _ = _quantised(seed=5)
    y = np.random.default_rng(5).integers(0, 3, size=(3, 9, 7))  # some p_y are exactly 0
    pv, yv = _flat(p, y)
    py = pv[np.arange(yv.size), yv]
    assert (py == 0).any()
    onehot = np.eye(p.shape[1])[yv]
    assert brier_score(p, y) == pytest.approx(((pv - onehot) ** 2).sum(1).mean(), abs=1e-12)
    for eps in (1e-7, 1e-3):
        want = -np.log(np.maximum(py, eps)).mean()
        assert negative_log_likelihood(p, y, eps=eps) == pytest.approx(want, rel=1e-12)


def test_adaptive_ece_uses_exact_equal_mass_edges():
    rng = np.random.default_rng(6)
    p = rng.dirichlet(np.ones(3), size=(2, 10, 10)).transpose(0, 3, 1, 2)
    y = rng.integers(0, 3, size=(2, 10, 10))
    pv, yv = _flat(p, y)
    conf = pv.max(1)
    for n_bins in (2, 5, 10):
        edges = np.quantile(conf, np.linspace(0, 1, n_bins + 1))
        edges[0], edges[-1] = 0.0, 1.0
        ece, _, _ = ref_top(p, y, n_bins, edges=edges)
        assert adaptive_calibration_error(p, y, n_bins=n_bins) == pytest.approx(ece, abs=1e-9)
        class_edges = []
        for c in range(3):
            e = np.quantile(pv[:, c], np.linspace(0, 1, n_bins + 1))
            e[0], e[-1] = 0.0, 1.0
            class_edges.append(e)
        cece, _ = ref_classwise(p, y, n_bins, class_edges=class_edges)
        assert adaptive_calibration_error(p, y, n_bins=n_bins,
                                          classwise=True) == pytest.approx(cece, abs=1e-9)


def test_accumulator_in_small_chunks_and_merged_equals_the_reference():
    p, y = _quantised(n=4, seed=7)
    ece, mce, (_, _, count) = ref_top(p, y, 8)
    cece, cmce = ref_classwise(p, y, 8)
    a = CalibrationAccumulator(8, classwise=True, chunk_size=5)
    b = CalibrationAccumulator(8, classwise=True, chunk_size=7)
    a.update(p[:1], y[:1]).update(p[1:2], y[1:2])
    b.update(p[2:], y[2:])
    a.merge(b)
    assert a.n_voxels == y.size
    assert a.ece == pytest.approx(ece, abs=1e-9) and a.mce == pytest.approx(mce, abs=1e-9)
    assert a.classwise_ece == pytest.approx(cece, abs=1e-9)
    assert a.classwise_mce == pytest.approx(cmce, abs=1e-9)
    np.testing.assert_array_equal(a.reliability_curve()[2], count)
    pv, yv = _flat(p, y)
    onehot = np.eye(p.shape[1])[yv]
    assert a.brier == pytest.approx(((pv - onehot) ** 2).sum(1).mean(), abs=1e-12)
    py = pv[np.arange(yv.size), yv]
    assert a.nll == pytest.approx(-np.log(np.maximum(py, 1e-7)).mean(), rel=1e-12)


def test_accumulator_from_logits_equals_the_softmax_reference():
    rng = np.random.default_rng(8)
    z = rng.standard_normal((2, 4, 6, 5)) * 3
    y = rng.integers(0, 4, size=(2, 6, 5))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ece, mce, _ = ref_top(p, y, 10)
    acc = CalibrationAccumulator(10).update_logits(z, y)
    assert acc.ece == pytest.approx(ece, abs=1e-6) and acc.mce == pytest.approx(mce, abs=1e-6)
