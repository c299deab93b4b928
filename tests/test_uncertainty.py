"""Uncertainty maps, MemberAccumulator and uncertainty metrics (UEO, segment uncertainty)."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage
from scipy.stats import entropy as scipy_entropy

from uqseg.metrics import segment_uncertainty, uncertainty_error_overlap
from uqseg.uncertainty import (
    MemberAccumulator,
    binary_entropy,
    entropy,
    expected_entropy,
    mutual_information,
    segment_level_uncertainty,
    softmax,
    variance,
)


def members(m=4, shape=(2, 3, 5, 6), seed=0, sharpness=2.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(m, *shape)) * sharpness
    p = np.exp(z - z.max(2, keepdims=True))
    return (p / p.sum(2, keepdims=True)).astype(np.float32)


def test_softmax_is_stable_and_in_place():
    z = np.array([[[1000.0]], [[1000.0 + np.log(3)]]], np.float32).transpose(1, 0, 2)
    out = softmax(z)
    # the float32 input itself is only 1000 + log 3 to within 6e-5
    np.testing.assert_allclose(out.ravel(), [0.25, 0.75], rtol=1e-4)
    assert np.isfinite(out).all()
    assert out.dtype == np.float32 and out is not z
    x = np.random.default_rng(0).normal(size=(2, 4, 3, 3)).astype(np.float32)
    ref = np.exp(x) / np.exp(x).sum(1, keepdims=True)
    same = softmax(x, copy=False)
    assert same is x
    np.testing.assert_allclose(same, ref, rtol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 4, 3, 4, 5)])
def test_maps_match_scipy_and_numpy(shape):
    P = members(shape=shape)
    mean = P.mean(0)
    np.testing.assert_allclose(entropy(mean), scipy_entropy(mean, axis=1), rtol=1e-5)
    ee = np.mean([scipy_entropy(p, axis=1) for p in P], axis=0)
    np.testing.assert_allclose(expected_entropy(P), ee, rtol=1e-5)
    np.testing.assert_allclose(
        mutual_information(P), np.maximum(scipy_entropy(mean, axis=1) - ee, 0), atol=1e-6
    )
    np.testing.assert_allclose(variance(P, per_class=True), P.var(0), atol=1e-7)
    np.testing.assert_allclose(variance(P), P.var(0).mean(1), atol=1e-7)
    assert entropy(mean).shape == (shape[0], *shape[2:])


def test_zero_probabilities_and_binary_entropy():
    p = np.array([[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(entropy(p), [0.0, np.log(2)])
    q = np.array([0.0, 0.2, 1.0])
    ref = [0.0, -(0.2 * np.log(0.2) + 0.8 * np.log(0.8)), 0.0]
    np.testing.assert_allclose(binary_entropy(q), ref)
    P = np.zeros((3, 1, 2, 2, 2))
    P[:, :, 0] = 1.0  # all members certain and agreeing
    assert not mutual_information(P).any() and not variance(P).any()


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 6), st.floats(0.1, 8.0))
def test_mutual_information_between_zero_and_entropy(seed, m, sharp):
    P = members(m=m, shape=(1, 3, 4, 4), seed=seed, sharpness=sharp)
    mi, h = mutual_information(P), entropy(P.mean(0))
    assert (mi >= 0).all() and (mi <= h + 1e-6).all()
    assert (h <= np.log(3) + 1e-6).all()


@pytest.mark.parametrize("shape", [(2, 3, 5, 6), (1, 2, 3, 4, 5)])
def test_member_accumulator_equals_stacked(shape):
    P = members(m=5, shape=shape, seed=1)
    acc = MemberAccumulator()
    for p in P:
        acc.add(p)
    np.testing.assert_allclose(acc.mean(), P.mean(0), atol=1e-6)
    np.testing.assert_allclose(acc.entropy(), entropy(P.mean(0)), atol=1e-5)
    np.testing.assert_allclose(acc.expected_entropy(), expected_entropy(P), atol=1e-5)
    np.testing.assert_allclose(acc.mutual_information(), mutual_information(P), atol=1e-5)
    np.testing.assert_allclose(acc.variance(), variance(P), atol=1e-7)
    np.testing.assert_allclose(acc.uncertainty("variance"), variance(P), atol=1e-7)
    assert acc.n_members == 5


def test_member_accumulator_weights_and_merge():
    P = members(m=4, seed=2).astype(np.float64)
    w = np.array([1.0, 2.0, 0.5, 3.0])
    acc = MemberAccumulator()
    for p, wi in zip(P, w, strict=True):
        acc.add(p, weight=wi)
    wn = (w / w.sum())[:, None, None, None, None]
    mean = (wn * P).sum(0)
    var = (wn * (P - mean) ** 2).sum(0)
    ee = (wn[:, :, 0] * np.stack([entropy(p) for p in P])).sum(0)
    np.testing.assert_allclose(acc.mean(), mean, atol=1e-6)
    np.testing.assert_allclose(acc.variance(per_class=True), var, atol=1e-10)
    np.testing.assert_allclose(acc.expected_entropy(), ee, atol=1e-10)
    a, b = MemberAccumulator(), MemberAccumulator()
    a.add(P[0], w[0]).add(P[1], w[1])
    b.add(P[2], w[2]).add(P[3], w[3])
    a.merge(b)
    assert a.total_weight == pytest.approx(w.sum()) and a.n_members == 4
    np.testing.assert_allclose(a.variance(per_class=True), var, atol=1e-10)
    np.testing.assert_allclose(a.mutual_information(), acc.mutual_information(), atol=1e-10)
    empty = MemberAccumulator().merge(acc)
    np.testing.assert_allclose(empty.variance(), acc.variance())


def test_member_accumulator_errors():
    P = members(m=2)
    acc = MemberAccumulator(kinds=("entropy",))
    with pytest.raises(ValueError, match="add"):
        acc.mean()
    acc.add(P[0])
    with pytest.raises(ValueError, match="variance"):
        acc.variance()
    with pytest.raises(ValueError, match="shape"):
        acc.add(P[0][:1])
    with pytest.raises(ValueError, match="weight"):
        acc.add(P[1], weight=0)
    with pytest.raises(ValueError, match="kinds"):
        MemberAccumulator(kinds=("variation",))
    with pytest.raises(ValueError, match="logits"):
        acc.add(P[1] * 3)


def test_ueo_matches_threshold_loop():
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, size=(3, 8, 9))
    pred = np.where(rng.random(y.shape) < 0.8, y, (y + 1) % 3)
    err = pred != y
    unc = np.where(err, rng.random(y.shape) + 0.3, rng.random(y.shape))
    ts = np.linspace(0, 1.3, 27)

    def dice(a, b):
        return 2 * (a & b).sum() / (a.sum() + b.sum())

    curve = [dice(unc > t, err) for t in ts]
    ueo, thr = uncertainty_error_overlap(unc, pred, y, ts, return_threshold=True)
    assert ueo == pytest.approx(max(curve))
    assert thr == ts[int(np.argmax(curve))]
    per = uncertainty_error_overlap(unc, pred, y, ts, per_image=True)
    np.testing.assert_allclose(per, [max(dice(unc[i] > t, err[i]) for t in ts) for i in range(3)])
    # default thresholds span the map; a perfectly separating map reaches 1
    assert uncertainty_error_overlap(err * 0.7, pred, y) == pytest.approx(1.0)
    mask = np.zeros(y.shape, bool)
    mask[:, :4] = True
    ref = max(dice(unc[mask] > t, err[mask]) for t in ts)
    assert uncertainty_error_overlap(unc, pred, y, ts, mask=mask) == pytest.approx(ref)


def test_ueo_without_errors_is_nan():
    y = np.zeros((2, 4, 4), int)
    assert np.isnan(uncertainty_error_overlap(np.ones(y.shape), y, y))
    res = uncertainty_error_overlap(np.ones(y.shape), y, y, per_image=True, return_threshold=True)
    assert np.isnan(res[0]).all() and np.isnan(res[1]).all()
    with pytest.raises(ValueError, match="shape"):
        uncertainty_error_overlap(np.ones((2, 4, 5)), y, y)
    with pytest.raises(ValueError, match="thresholds"):
        uncertainty_error_overlap(np.ones(y.shape), y, y, thresholds=[])


@pytest.mark.parametrize("shape", [(2, 3, 7, 8), (1, 3, 4, 5, 6)])
def test_segment_uncertainty_loop(shape):
    P = members(m=1, shape=shape, seed=6, sharpness=1.5)[0]
    pred = P.argmax(1)
    got = segment_uncertainty(P)
    bnd = segment_uncertainty(P, region="boundary")
    st1 = ndimage.generate_binary_structure(len(shape) - 2, 1)
    for i in range(shape[0]):
        for c in range(1, shape[1]):
            seg = pred[i] == c
            vals = [
                binary_entropy(float(P[(i, c, *idx)])) for idx in zip(*np.nonzero(seg), strict=True)
            ]
            assert got[i, c - 1] == pytest.approx(np.mean(vals), rel=1e-5)
            edge = seg & ~ndimage.binary_erosion(seg, st1)
            assert bnd[i, c - 1] == pytest.approx(binary_entropy(P[i, c][edge]).mean(), rel=1e-5)
    np.testing.assert_allclose(segment_level_uncertainty(P), got)


def test_segment_uncertainty_empty_segment_and_given_pred():
    P = members(m=1, shape=(1, 3, 4, 4), seed=7)[0]
    pred = np.zeros((1, 4, 4), int)
    pred[0, 0, 0] = 1
    out = segment_uncertainty(P, pred)
    assert out[0, 0] == pytest.approx(binary_entropy(float(P[0, 1, 0, 0])), rel=1e-5)
    assert np.isnan(out[0, 1])
    with pytest.raises(ValueError, match="region"):
        segment_uncertainty(P, region="edge")
