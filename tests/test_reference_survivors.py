"""Tests written against mutants that survived the mutation run (docs/testing.md), each
checked against an independent reference (numpy, scipy, scikit-learn or a closed form)."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from uqseg import OnnxSegmenter
from uqseg.metrics import segment_uncertainty, uncertainty_error_overlap
from uqseg.metrics.uncertainty import binary_entropy


def _bin_h(p):
    from scipy.special import xlogy

    return -(xlogy(p, p) + xlogy(1 - p, 1 - p))


def _ref_segment_unc(p, pred, boundary, structure):
    n, k = p.shape[:2]
    out = np.full((n, k - 1), np.nan)
    for i in range(n):
        for c in range(1, k):
            seg = pred[i] == c
            if boundary:
                seg &= ~ndimage.binary_erosion(seg, structure=structure)
            if seg.any():
                out[i, c - 1] = _bin_h(p[i, c][seg]).mean()
    return out


@pytest.mark.parametrize("dims", [2, 3])
def test_segment_uncertainty_segment_and_boundary_against_reference(dims):
    rng = np.random.default_rng(dims)
    shape = (2, 3) + (9,) * dims
    z = ndimage.gaussian_filter(rng.standard_normal(shape), sigma=[0, 0] + [2] * dims) * 20
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    pred = p.argmax(1)
    cross = ndimage.generate_binary_structure(dims, 1)  # face neighbours only
    full = np.ones((3,) * dims, bool)
    seg = _ref_segment_unc(p, pred, False, cross)
    bnd = _ref_segment_unc(p, pred, True, cross)
    np.testing.assert_allclose(segment_uncertainty(p), seg, rtol=1e-9)
    np.testing.assert_allclose(segment_uncertainty(p, region="boundary"), bnd, rtol=1e-9)
    # the connectivity and the region really matter on this data
    assert not np.allclose(bnd, seg, equal_nan=True)
    assert not np.allclose(bnd, _ref_segment_unc(p, pred, True, full), equal_nan=True)
    # a given prediction is used as is (here: another class assignment)
    other = np.roll(pred, 2, axis=-1)
    np.testing.assert_allclose(segment_uncertainty(p, other), _ref_segment_unc(
        p, other, False, cross), rtol=1e-9)
    assert p.dtype == np.float64
    np.testing.assert_allclose(segment_uncertainty(p.astype(np.float32)), seg, rtol=1e-5)


def test_segment_uncertainty_validates_its_inputs_by_name():
    p = np.full((1, 2, 3, 3), 0.5)
    with pytest.raises(ValueError, match="proba"):
        segment_uncertainty(p * 3)  # not probabilities
    with pytest.raises(ValueError, match="pred"):
        segment_uncertainty(p, np.full((1, 3, 3), 5))  # label 5 with 2 classes
    with pytest.raises(ValueError, match="pred"):
        segment_uncertainty(p, np.zeros((1, 3, 4), int))
    with pytest.raises(ValueError, match="region"):
        segment_uncertainty(p, region="edge")


def test_binary_entropy_closed_form():
    p = np.array([0.0, 1e-12, 0.1, 0.25, 0.5, 0.9, 1.0])
    np.testing.assert_allclose(binary_entropy(p), _bin_h(p), rtol=1e-12, atol=0)
    np.testing.assert_allclose(binary_entropy(p.astype(np.float32)), _bin_h(p), atol=1e-6)
    assert binary_entropy(np.array([0, 1])).tolist() == [0.0, 0.0]  # ints accepted
    assert float(binary_entropy(0.5)) == pytest.approx(np.log(2))
    assert (binary_entropy(p) >= 0).all() and not np.signbit(binary_entropy(p)).any()


def _ref_ueo(unc, err, thresholds):
    best, arg = -1.0, None
    for t in thresholds:
        a = unc > t
        denom = a.sum() + err.sum()
        d = 2 * (a & err).sum() / denom if denom else np.nan
        if d > best:
            best, arg = d, t
    return best, arg


def test_ueo_against_a_threshold_loop():
    rng = np.random.default_rng(9)
    unc = rng.random((3, 12, 10))
    err = (unc + 0.4 * rng.random(unc.shape)) > 0.9
    pred, y = np.zeros(unc.shape, int), err.astype(int)
    lo, hi = unc.min(), unc.max()
    ts = np.linspace(lo, hi, 101)[:-1]
    ueo, thr = uncertainty_error_overlap(unc, pred, y, return_threshold=True)
    want = _ref_ueo(unc.ravel(), err.ravel(), ts)
    assert ueo == pytest.approx(want[0], abs=1e-12) and thr == pytest.approx(want[1])
    given = np.array([0.95, 0.2, 0.7, 0.5])  # unsorted on purpose
    assert uncertainty_error_overlap(unc, pred, y, given) == pytest.approx(
        _ref_ueo(unc.ravel(), err.ravel(), given)[0], abs=1e-12)
    per, thr_i = uncertainty_error_overlap(unc, pred, y, per_image=True, return_threshold=True)
    for i in range(3):
        ts_i = np.linspace(unc[i].min(), unc[i].max(), 101)[:-1]
        r = _ref_ueo(unc[i].ravel(), err[i].ravel(), ts_i)
        assert per[i] == pytest.approx(r[0], abs=1e-12) and thr_i[i] == pytest.approx(r[1])
    mask = rng.random(unc.shape) < 0.5
    assert uncertainty_error_overlap(unc, pred, y, mask=mask) == pytest.approx(_ref_ueo(
        unc[mask], err[mask], np.linspace(unc[mask].min(), unc[mask].max(), 101)[:-1])[0],
        abs=1e-12)
    # a constant map keeps everything: Dice(all, err)
    const = np.full(unc.shape, 0.3)
    assert uncertainty_error_overlap(const, pred, y) == pytest.approx(
        2 * err.sum() / (err.size + err.sum()))
    assert np.isnan(uncertainty_error_overlap(unc, y, y))  # no error at all


def test_sliding_window_output_dtype_small_steps_and_mc_mask(make_model):
    path = make_model("fixed16_mc", dims=2, spatial=(16, 16), mc_mask=True, seed=8)
    x = np.random.default_rng(10).standard_normal((2, 1, 20, 18)).astype(np.float32)
    seg = OnnxSegmenter(path, device="cpu", overlap=0.95, batch_size=4).fit()
    out = seg.transform(x)
    assert out.dtype == np.float32
    # overlap 0.95: step round(16 * 0.05) = 1, every start 0..4 and 0..2 is a window
    import onnxruntime as ort
    from test_reference_tiling import ref_gaussian

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    mask_name = [n for n in names if n != "image"][0]
    shape = [d if isinstance(d, int) else 1 for d in sess.get_inputs()[1].shape]
    rng = np.random.default_rng(11)
    masks = (rng.random((2, *shape[1:])) < 0.7).astype(np.float32) / 0.7
    g = ref_gaussian((16, 16))
    for use_mask in (False, True):
        acc = np.zeros((2, 3, 20, 18))
        norm = np.zeros((20, 18))
        for a in range(5):
            for b in range(3):
                patch = np.ascontiguousarray(x[:, :, a:a + 16, b:b + 16])
                m = masks if use_mask else np.ones_like(masks)
                feeds = {"image": patch, mask_name: m.astype(np.float32)}
                acc[:, :, a:a + 16, b:b + 16] += sess.run(None, feeds)[0] * g
                norm[a:a + 16, b:b + 16] += g
        ref = acc / norm
        got = seg.run(x, layers=(), mc_mask=masks)["logits"] if use_mask else out
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
