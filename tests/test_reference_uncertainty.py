"""Ensemble uncertainty against numpy/scipy references written from the definitions.

The weighted :class:`MemberAccumulator` is compared with the weighted formulas, never with
the library's own stacked functions (which take no weights).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax as sp_softmax
from scipy.stats import entropy as sp_entropy

from uqseg.uncertainty import (
    MemberAccumulator,
    entropy,
    expected_entropy,
    mutual_information,
    softmax,
    variance,
)


def _members(m=4, shape=(2, 3, 5, 4), seed=0, alpha=0.5):
    rng = np.random.default_rng(seed)
    n, k = shape[:2]
    p = rng.dirichlet(np.full(k, alpha), size=(m, n, *shape[2:]))  # (m, n, *sp, k)
    return np.moveaxis(p, -1, 2)


def _ref(p, w):
    """Weighted ensemble statistics from scipy's entropy and numpy's average."""
    w = np.asarray(w, float)
    mean = np.average(p, axis=0, weights=w)
    h_mean = sp_entropy(mean, axis=1)
    h_members = np.stack([sp_entropy(pm, axis=1) for pm in p])
    eh = np.average(h_members, axis=0, weights=w)
    var = np.average((p - mean) ** 2, axis=0, weights=w)
    return {"mean": mean, "entropy": h_mean, "expected_entropy": eh,
            "mutual_information": np.maximum(h_mean - eh, 0), "variance": var}


@pytest.mark.parametrize("weights", [[1, 1, 1, 1], [0.5, 2.0, 1.0, 3.5], [10, 0.1, 0.1, 5]])
def test_weighted_accumulator_equals_the_weighted_formulas(weights):
    p = _members()
    ref = _ref(p, weights)
    acc = MemberAccumulator()
    for pm, w in zip(p, weights, strict=True):
        acc.add(pm, weight=w)
    assert acc.n_members == 4 and acc.total_weight == pytest.approx(sum(weights))
    np.testing.assert_allclose(acc.mean(), ref["mean"], atol=1e-6)
    np.testing.assert_allclose(acc.entropy(), ref["entropy"], atol=1e-6)
    np.testing.assert_allclose(acc.expected_entropy(), ref["expected_entropy"], atol=1e-9)
    np.testing.assert_allclose(acc.mutual_information(), ref["mutual_information"], atol=1e-9)
    np.testing.assert_allclose(acc.variance(per_class=True), ref["variance"], atol=1e-9)
    np.testing.assert_allclose(acc.variance(), ref["variance"].mean(axis=1), atol=1e-9)
    for kind in ("entropy", "expected_entropy", "mutual_information", "variance"):
        np.testing.assert_allclose(acc.uncertainty(kind), getattr(acc, kind)(), atol=0)


@pytest.mark.parametrize("split", [1, 2, 3])
def test_merged_weighted_accumulators_equal_the_weighted_formulas(split):
    p = _members(m=5, seed=1)
    w = [0.3, 1.7, 2.0, 0.9, 4.1]
    ref = _ref(p, w)
    a, b = MemberAccumulator(), MemberAccumulator()
    for i in range(5):
        (a if i < split else b).add(p[i], weight=w[i])
    a.merge(b)
    assert a.n_members == 5 and a.total_weight == pytest.approx(sum(w))
    np.testing.assert_allclose(a.mean(), ref["mean"], atol=1e-6)
    np.testing.assert_allclose(a.mutual_information(), ref["mutual_information"], atol=1e-9)
    np.testing.assert_allclose(a.expected_entropy(), ref["expected_entropy"], atol=1e-9)
    np.testing.assert_allclose(a.variance(per_class=True), ref["variance"], atol=1e-9)
    # merging into an empty accumulator copies; merging an empty one changes nothing
    c = MemberAccumulator().merge(a).merge(MemberAccumulator())
    assert c.n_members == 5 and c.total_weight == pytest.approx(sum(w))
    np.testing.assert_allclose(c.variance(per_class=True), ref["variance"], atol=1e-9)
    np.testing.assert_allclose(c.mutual_information(), ref["mutual_information"], atol=1e-9)


def test_stacked_functions_equal_scipy():
    p = _members(m=3, seed=2)
    ref = _ref(p, np.ones(3))
    np.testing.assert_allclose(expected_entropy(p), ref["expected_entropy"], atol=1e-12)
    np.testing.assert_allclose(mutual_information(p), ref["mutual_information"], atol=1e-12)
    np.testing.assert_allclose(variance(p), ref["variance"].mean(axis=1), atol=1e-12)
    np.testing.assert_allclose(variance(p, per_class=True), ref["variance"], atol=1e-12)
    np.testing.assert_allclose(entropy(p[0]), sp_entropy(p[0], axis=1), atol=1e-12)
    # entropy along another axis and with exact zeros (0 log 0 = 0)
    q = np.array([[1.0, 0.0], [0.25, 0.75]])
    np.testing.assert_allclose(entropy(q, axis=1), sp_entropy(q, axis=1), atol=1e-15)
    np.testing.assert_allclose(entropy(q.T, axis=0), sp_entropy(q, axis=1), atol=1e-15)


def test_softmax_equals_scipy_on_any_axis_and_in_place():
    rng = np.random.default_rng(3)
    z = (rng.standard_normal((2, 4, 3, 5)) * 30).astype(np.float32)  # large: needs the max shift
    for axis in (1, -1, 0):
        np.testing.assert_allclose(softmax(z, axis=axis), sp_softmax(z.astype(np.float64),
                                                                     axis=axis), atol=1e-6)
    z64 = z.astype(np.float64)
    out = softmax(z64)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, sp_softmax(z64, axis=1), atol=1e-6)
    zi = z.copy()
    res = softmax(zi, copy=False)
    np.testing.assert_allclose(res, sp_softmax(z.astype(np.float64), axis=1), atol=1e-6)
    kept = z.copy()
    softmax(kept, copy=True)
    np.testing.assert_array_equal(kept, z)  # copy=True leaves the input alone


def test_accumulator_refuses_bad_weights_and_shapes():
    p = _members(m=2)
    acc = MemberAccumulator().add(p[0])
    for bad in (0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="weight must be a positive finite number"):
            acc.add(p[1], weight=bad)
    assert acc.n_members == 1 and acc.total_weight == 1.0  # nothing half-added
    with pytest.raises(ValueError, match=r"proba has shape .* but earlier members had"):
        acc.add(p[1][:, :, :2])
    with pytest.raises(ValueError, match="'variance' was not requested"):
        MemberAccumulator(kinds=("entropy",)).add(p[0]).variance()
    with pytest.raises(ValueError, match="no member has been added"):
        MemberAccumulator().mean()
