"""Calibration metrics against brute-force per-bin loops, scikit-learn and hand-made cases."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import brier_score_loss, log_loss

from uqseg.metrics import (
    CalibrationAccumulator,
    adaptive_calibration_error,
    brier_score,
    expected_calibration_error,
    foreground_roi,
    maximum_calibration_error,
    negative_log_likelihood,
    plot_reliability_diagram,
    reliability_curve,
)

SHAPES = {"2d": (3, 4, 6, 5), "3d": (2, 3, 3, 4, 5)}  # (N, K, *spatial)


def random_case(shape, seed=0, sharpness=2.0):
    rng = np.random.default_rng(seed)
    z = rng.normal(size=shape) * sharpness
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = rng.integers(0, shape[1], size=(shape[0], *shape[2:]))
    return p.astype(np.float32), y


def flat(p, y, mask=None):
    """(V, K) probabilities and (V,) labels of the selected voxels."""
    pk = np.moveaxis(p, 1, -1).reshape(-1, p.shape[1]).astype(np.float64)
    yy = y.ravel()
    if mask is not None:
        pk, yy = pk[mask.ravel()], yy[mask.ravel()]
    return pk, yy


def ref_bins(conf, correct, edges):
    """Per-bin (mean conf, accuracy, count) by explicit interval tests (lo, hi]."""
    out = []
    for b in range(len(edges) - 1):
        lo, hi = edges[b], edges[b + 1]
        sel = (conf > lo) & (conf <= hi) if b > 0 else (conf <= hi)
        out.append(
            (
                conf[sel].mean() if sel.any() else np.nan,
                correct[sel].mean() if sel.any() else np.nan,
                int(sel.sum()),
            )
        )
    return out


def ref_ece_mce(conf, correct, edges):
    bins = ref_bins(conf, correct, edges)
    n = conf.size
    ece = sum(c / n * abs(a - m) for m, a, c in bins if c)
    mce = max(abs(a - m) for m, a, c in bins if c)
    return ece, mce


def ref_top(p, y, n_bins=15, mask=None, edges=None):
    pk, yy = flat(p, y, mask)
    conf, correct = pk.max(axis=1), (pk.argmax(axis=1) == yy).astype(float)
    edges = np.linspace(0, 1, n_bins + 1) if edges is None else edges
    return ref_ece_mce(conf, correct, edges)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("n_bins", [1, 5, 15])
def test_ece_mce_match_brute_force(dim, n_bins):
    p, y = random_case(SHAPES[dim], seed=n_bins)
    ece, mce = ref_top(p, y, n_bins)
    assert expected_calibration_error(p, y, n_bins) == pytest.approx(ece, abs=1e-9)
    assert maximum_calibration_error(p, y, n_bins) == pytest.approx(mce, abs=1e-9)


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_classwise_ece_matches_per_class_loop(dim):
    p, y = random_case(SHAPES[dim], seed=3)
    pk, yy = flat(p, y)
    edges = np.linspace(0, 1, 11)
    per_class = [ref_ece_mce(pk[:, c], (yy == c).astype(float), edges) for c in range(p.shape[1])]
    assert expected_calibration_error(p, y, 10, classwise=True) == pytest.approx(
        np.mean([e for e, _ in per_class]), abs=1e-9
    )
    assert maximum_calibration_error(p, y, 10, classwise=True) == pytest.approx(
        np.mean([m for _, m in per_class]), abs=1e-9
    )


def test_adaptive_uses_equal_mass_quantile_bins():
    p, y = random_case((2, 3, 5, 5), seed=4)
    pk, yy = flat(p, y)
    conf = pk.max(axis=1)
    edges = np.quantile(conf, np.linspace(0, 1, 6))
    edges[0], edges[-1] = 0.0, 1.0
    ece, _ = ref_top(p, y, edges=edges)
    assert adaptive_calibration_error(p, y, 5) == pytest.approx(ece, abs=1e-9)
    assert expected_calibration_error(p, y, 5, strategy="quantile") == pytest.approx(ece, abs=1e-9)
    _, _, count = reliability_curve(p, y, 5, strategy="quantile")
    assert count.sum() == conf.size and count.max() - count.min() <= 1  # 50 voxels, 5 bins
    # class-wise adaptive: each class gets its own quantile edges
    per_class = []
    for c in range(3):
        e = np.quantile(pk[:, c], np.linspace(0, 1, 6))
        e[0], e[-1] = 0.0, 1.0
        per_class.append(ref_ece_mce(pk[:, c], (yy == c).astype(float), e)[0])
    assert adaptive_calibration_error(p, y, 5, classwise=True) == pytest.approx(
        np.mean(per_class), abs=1e-9
    )


def test_perfectly_calibrated_gives_zero_and_hand_computed_value():
    # 10 voxels of confidence 0.8 for class 0, 8 of them really class 0: calibrated
    p = np.zeros((1, 2, 1, 10), np.float32)
    p[0, 0], p[0, 1] = 0.8, 0.2
    y = np.zeros((1, 1, 10), int)
    y[0, 0, :2] = 1
    assert expected_calibration_error(p, y) == pytest.approx(0.0, abs=1e-7)
    assert maximum_calibration_error(p, y) == pytest.approx(0.0, abs=1e-7)
    # all correct: gap = 1 - 0.8
    assert expected_calibration_error(p, np.zeros_like(y)) == pytest.approx(0.2, abs=1e-6)
    conf, acc, count = reliability_curve(p, y, n_bins=5)
    np.testing.assert_array_equal(count, [0, 0, 0, 10, 0])
    assert conf[3] == pytest.approx(0.8) and acc[3] == pytest.approx(0.8)
    assert np.isnan(conf[[0, 1, 2, 4]]).all() and np.isnan(acc[[0, 1, 2, 4]]).all()


@pytest.mark.parametrize("dim", ["2d", "3d"])
def test_mask_and_ignore_index_select_voxels(dim):
    p, y = random_case(SHAPES[dim], seed=5)
    rng = np.random.default_rng(0)
    mask = rng.random(y.shape) < 0.5
    ece, _ = ref_top(p, y, 10, mask=mask)
    assert expected_calibration_error(p, y, 10, mask=mask) == pytest.approx(ece, abs=1e-9)
    y_ign = np.where(mask, y, 255)
    assert expected_calibration_error(p, y_ign, 10, ignore_index=255) == pytest.approx(
        ece, abs=1e-9
    )
    pk, yy = flat(p, y, mask)
    assert brier_score(p, y_ign, ignore_index=255) == pytest.approx(
        np.mean(((pk - np.eye(p.shape[1])[yy]) ** 2).sum(axis=1)), rel=1e-6
    )
    assert negative_log_likelihood(p, y, mask=mask) == pytest.approx(
        log_loss(yy, pk / pk.sum(1, keepdims=True), labels=range(p.shape[1])), rel=1e-6
    )


def test_empty_selection_gives_nan_without_warning():
    p, y = random_case((1, 2, 3, 3))
    none = np.zeros(y.shape, bool)
    assert np.isnan(expected_calibration_error(p, y, mask=none))
    assert np.isnan(maximum_calibration_error(p, y, mask=none, classwise=True))
    assert np.isnan(brier_score(p, y, mask=none))
    assert np.isnan(negative_log_likelihood(p, y, mask=none))
    assert np.isnan(adaptive_calibration_error(p, y, mask=none))


def test_brier_and_nll_against_sklearn_binary():
    p, y = random_case((4, 2, 8, 8), seed=6)
    pk, yy = flat(p, y)
    # documented convention: multi-class sum over classes = 2 x sklearn's binary Brier score
    assert brier_score(p, y) == pytest.approx(2 * brier_score_loss(yy, pk[:, 1]), rel=1e-6)
    pk /= pk.sum(1, keepdims=True)  # sklearn insists on float64 rows summing to 1
    assert negative_log_likelihood(p, y) == pytest.approx(log_loss(yy, pk), rel=1e-6)


def test_nll_clips_zero_probability_at_eps():
    p = np.zeros((1, 2, 1, 2), np.float32)
    p[0, 0] = 1.0
    y = np.array([[[0, 1]]])
    assert negative_log_likelihood(p, y, eps=1e-4) == pytest.approx(-np.log(1e-4) / 2)


@pytest.mark.parametrize("dim", ["2d", "3d"])
@pytest.mark.parametrize("chunk", [1, 7, 31, 1000])
def test_chunking_does_not_change_results(dim, chunk):
    p, y = random_case(SHAPES[dim], seed=7)
    mask = np.random.default_rng(1).random(y.shape) < 0.7
    big = CalibrationAccumulator(10, classwise=True).update(p, y, mask)
    small = CalibrationAccumulator(10, classwise=True, chunk_size=chunk).update(p, y, mask)
    for attr in ("ece", "mce", "classwise_ece", "classwise_mce", "brier", "nll", "n_voxels"):
        assert getattr(small, attr) == pytest.approx(getattr(big, attr), rel=1e-9, abs=1e-12)
    assert big.n_voxels == mask.sum()


def test_merge_equals_single_pass_and_logits_match_softmax():
    p, y = random_case((6, 3, 5, 7), seed=8)
    whole = CalibrationAccumulator(8, classwise=True).update(p, y)
    a = CalibrationAccumulator(8, classwise=True).update(p[:2], y[:2])
    b = CalibrationAccumulator(8, classwise=True, chunk_size=3).update(p[2:], y[2:])
    a.merge(b).merge(CalibrationAccumulator(8, classwise=True))  # empty merge is a no-op
    for attr in ("ece", "mce", "classwise_ece", "brier", "nll", "n_voxels"):
        assert getattr(a, attr) == pytest.approx(getattr(whole, attr), rel=1e-12)
    for x, z in zip(a.reliability_curve(), whole.reliability_curve(), strict=True):
        np.testing.assert_allclose(x, z)
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(2, 3, 4, 4)).astype(np.float32) * 30  # large: needs stable softmax
    soft = np.exp(logits - logits.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    yl = rng.integers(0, 3, size=(2, 4, 4))
    from_logits = CalibrationAccumulator(5, chunk_size=5).update_logits(logits, yl)
    from_proba = CalibrationAccumulator(5).update(soft, yl)
    assert from_logits.ece == pytest.approx(from_proba.ece, abs=1e-6)
    assert from_logits.nll == pytest.approx(from_proba.nll, rel=1e-5)


def test_reliability_curve_matches_brute_force():
    p, y = random_case((2, 4, 6, 6), seed=9)
    pk, yy = flat(p, y)
    ref = ref_bins(pk.max(1), (pk.argmax(1) == yy).astype(float), np.linspace(0, 1, 8))
    conf, acc, count = reliability_curve(p, y, n_bins=7)
    np.testing.assert_allclose(conf, [r[0] for r in ref], equal_nan=True)
    np.testing.assert_allclose(acc, [r[1] for r in ref], equal_nan=True)
    np.testing.assert_array_equal(count, [r[2] for r in ref])


def test_plot_reliability_diagram_draws_the_curve():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p, y = random_case((1, 2, 8, 8), seed=10)
    fig, ax = plt.subplots()
    out = plot_reliability_diagram(p, y, n_bins=5, ax=ax, label="net")
    assert out is ax
    conf, acc, count = reliability_curve(p, y, n_bins=5)
    line = ax.get_lines()[1]
    np.testing.assert_allclose(line.get_xdata(), conf[count > 0])
    np.testing.assert_allclose(line.get_ydata(), acc[count > 0])
    assert "net" in ax.get_legend().get_texts()[1].get_text()
    plt.close(fig)



def test_metrics_import_no_presentation_and_old_paths_still_work():
    import subprocess
    import sys

    # a fresh interpreter: the metrics must not pull in the plotting layer or matplotlib
    code = ("import sys, uqseg.metrics; "
            "print(sorted(m for m in ('matplotlib', 'uqseg.plotting') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import uqseg.metrics
    import uqseg.metrics.calibration as old
    import uqseg.plotting

    assert plot_reliability_diagram is uqseg.plotting.plot_reliability_diagram
    assert "plot_reliability_diagram" in dir(uqseg.metrics)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = uqseg.metrics.nope
    # names other modules import from uqseg.metrics.calibration keep working
    assert old.CalibrationAccumulator is CalibrationAccumulator
    assert old.brier_score is brier_score and old.negative_log_likelihood is negative_log_likelihood
    assert old.foreground_roi is foreground_roi

def test_foreground_roi_boxes_2d_and_3d():
    y = np.zeros((3, 6, 7), int)
    y[0, 2, 3] = 1
    y[0, 3, 4] = 2
    y[1, 0, 6] = 1  # at the corner: margin clipped at the border
    roi = foreground_roi(y, margin=1)
    expect = np.zeros_like(roi)
    expect[0, 1:5, 2:6] = True
    expect[1, 0:2, 5:7] = True
    np.testing.assert_array_equal(roi, expect)  # image 2 has no foreground: empty ROI
    y3 = np.zeros((1, 5, 6, 7), int)
    y3[0, 2, 3, 3] = 1
    roi3 = foreground_roi(y3, margin=(0, 1, 2))
    assert roi3.sum() == 1 * 3 * 5 and roi3[0, 2, 2:5, 1:6].all()
    p = np.stack([1 - (y3 > 0), (y3 > 0)], axis=1).astype(np.float32)
    assert expected_calibration_error(p, y3, mask=roi3) == pytest.approx(0.0, abs=1e-7)


def test_bad_inputs_raise_clear_errors():
    p, y = random_case((1, 3, 4, 4))
    with pytest.raises(ValueError, match="strategy"):
        expected_calibration_error(p, y, strategy="equal")
    with pytest.raises(ValueError, match="n_bins"):
        expected_calibration_error(p, y, n_bins=0)
    with pytest.raises(ValueError, match="logits"):
        expected_calibration_error(p * 5, y)
    with pytest.raises(ValueError, match="mask"):
        brier_score(p, y, mask=np.ones((1, 4, 5), bool))
    with pytest.raises(TypeError, match="mask"):
        brier_score(p, y, mask=np.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(p, y + 3)
    with pytest.raises(ValueError, match="edges"):
        CalibrationAccumulator(5).merge(CalibrationAccumulator(6))
    with pytest.raises(ValueError, match="classwise"):
        _ = CalibrationAccumulator(5).update(p, y).classwise_ece
    with pytest.raises(ValueError, match="classes"):
        CalibrationAccumulator(5).update(p, y).update(
            p[:, :2] / p[:, :2].sum(1, keepdims=True), np.zeros_like(y)
        )


@settings(max_examples=40, deadline=None)
@given(
    st.integers(0, 10_000),
    st.integers(2, 4),
    st.integers(1, 20),
    st.sampled_from(["uniform", "quantile"]),
)
def test_ece_bounds_property(seed, k, n_bins, strategy):
    p, y = random_case((2, k, 3, 4), seed=seed, sharpness=3.0)
    ece = expected_calibration_error(p, y, n_bins, strategy=strategy)
    mce = maximum_calibration_error(p, y, n_bins, strategy=strategy)
    assert 0.0 <= ece <= mce + 1e-12 <= 1.0 + 1e-12
    assert 0.0 <= brier_score(p, y) <= 2.0


def test_public_names_of_the_design_contract():
    import uqseg

    names = [
        "expected_calibration_error", "maximum_calibration_error", "adaptive_calibration_error",
        "brier_score", "negative_log_likelihood", "reliability_curve", "plot_reliability_diagram",
        "dice_score", "hausdorff_distance_95", "uncertainty_error_overlap", "ood_auroc",
        "ood_aupr", "fpr_at_tpr",
    ]  # fmt: skip
    missing = [n for n in names if not callable(getattr(uqseg.metrics, n, None))]
    assert missing == []
    assert set(uqseg.metrics.__all__) >= set(names)


def test_binned_only_accumulator_matches_and_refuses_scores():
    from uqseg.metrics.calibration import CalibrationAccumulator

    rng = np.random.default_rng(7)
    z = rng.standard_normal((3, 4, 9, 11)).astype(np.float32)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    y = rng.integers(0, 4, (3, 9, 11))
    full = CalibrationAccumulator(10).update(p, y)
    binned = CalibrationAccumulator(10, scores=False).update(p, y)
    assert binned.ece == pytest.approx(full.ece, abs=1e-12)
    np.testing.assert_allclose(binned.reliability_curve()[2], full.reliability_curve()[2])
    with pytest.raises(ValueError, match="scores=True"):
        _ = binned.brier
    with pytest.raises(ValueError, match="scores=False"):
        CalibrationAccumulator(10).update(p, y).merge(binned)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("nb", [1, 7, 10, 15, 100])
def test_fast_uniform_binning_equals_searchsorted_at_and_near_edges(dtype, nb):
    from uqseg.metrics._binning import uniform_bins

    e = np.linspace(0.0, 1.0, nb + 1).astype(dtype)
    near = np.concatenate([np.nextafter(e, -np.inf), e, np.nextafter(e, np.inf)])
    rng = np.random.default_rng(nb)
    conf = np.concatenate([near, rng.random(5000), [1 + 5e-7, 0.0]]).astype(dtype)
    np.testing.assert_array_equal(uniform_bins(conf, nb, e[1:-1]),
                                  np.searchsorted(e[1:-1], conf, side="left"))


def test_packed_histogram_equals_two_bincounts_bit_for_bit():
    from uqseg.metrics._binning import packed_histogram, packed_run_log2, separate_histogram

    rng = np.random.default_rng(3)
    conf = rng.uniform(1 / 3, 1, 70_000).astype(np.float32)
    conf[:50] = 1.0
    b = np.minimum((conf * 15).astype(np.int32), 14)
    correct = rng.random(conf.size) < conf
    q = packed_run_log2(conf)
    assert q == 13
    c1, s1 = packed_histogram(b, correct, conf, 15, q)
    c2, s2 = separate_histogram(b, correct, conf, 15)
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(s1, s2)
    assert packed_run_log2(conf.astype(np.float64)) is None  # float64 needs two bincounts
    assert packed_run_log2(np.float32([1e-6, 0.5])) is None  # too many bits to pack


def test_confidence_just_above_one_goes_to_the_last_bin():
    # values up to 1 + 1e-6 pass validation; they used to crash the histogram
    p = np.array([1 + 5e-7, 0.0], np.float32).reshape(1, 2, 1)
    assert expected_calibration_error(p, np.array([[0]]), n_bins=15) == pytest.approx(0.0,
                                                                                     abs=1e-6)
    conf, acc, count = reliability_curve(p, np.array([[0]]), n_bins=15)
    assert count[-1] == 1 and count.sum() == 1


@pytest.mark.parametrize("nb", [1, 2, 3, 7, 15])
def test_fused_histogram_equals_searchsorted_and_two_bincounts(nb):
    from uqseg.metrics import _binning as bn

    m = bn.ceil_multiplier(nb)
    assert m == nb
    e = np.linspace(0.0, 1.0, nb + 1).astype(np.float32)
    near = np.concatenate([np.nextafter(e, -np.inf), e, np.nextafter(e, np.inf)])
    rng = np.random.default_rng(nb)
    conf = np.concatenate([near, rng.random(40_000), [1 + 5e-7, 1 + 1e-6, 1.0]])
    conf = conf.astype(np.float32)
    conf = conf[(conf > 0.01) & (conf <= np.float32(1 + 1e-6))]
    correct = rng.random(conf.size) < 0.7
    q = bn.packed_run_log2(conf)
    b = np.searchsorted(e[1:-1], conf, side="left")  # the definition of the bins
    c_ref, s_ref = bn.separate_histogram(b, correct, conf, nb)
    c, s = bn.fused_histogram(conf, correct, nb, q, m)
    np.testing.assert_array_equal(c, c_ref)
    np.testing.assert_array_equal(s, s_ref)


def test_fused_histogram_bincount_fallback_is_the_same(monkeypatch):
    from uqseg.metrics import _binning as bn

    rng = np.random.default_rng(5)
    conf = rng.uniform(1 / 3, 1, 30_000).astype(np.float32)
    correct = rng.random(conf.size) < conf
    q = bn.packed_run_log2(conf)
    c1, s1 = bn.fused_histogram(conf, correct, 15, q, bn.ceil_multiplier(15))
    monkeypatch.setattr(bn, "_SCATTER_OK", [False])  # as if scipy's private loop were gone
    c2, s2 = bn.fused_histogram(conf, correct, 15, q, bn.ceil_multiplier(15))
    np.testing.assert_array_equal(c1, c2)
    np.testing.assert_array_equal(s1, s2)


def test_ceil_multiplier_refuses_bin_counts_it_cannot_bin_exactly():
    from uqseg.metrics import _binning as bn

    # 10 bins: 10 * x rounds an edge's float32 neighbour onto the edge
    e = np.linspace(0.0, 1.0, 11).astype(np.float32)[1:-1]
    up = np.nextafter(e, np.float32(2))
    assert np.any(np.ceil(up * np.float32(10)) < np.arange(2, 11))
    assert bn.ceil_multiplier(10) is None
    assert bn.ceil_multiplier(100) is None  # columns would not fit int8


def test_scatter_refuses_out_of_range_columns():
    from uqseg.metrics import _binning as bn

    if not bn._SCATTER_OK[0]:
        pytest.skip("scipy's csr_todense is not available")
    with pytest.raises(ValueError, match="out of range"):
        bn._scatter_runs(np.array([0, 40], np.int8), np.ones(2), 8, 34)


@pytest.mark.parametrize("nb", [10, 15])
def test_accumulator_float32_equals_float64_binning_reference(nb):
    # the fused float32 path (15 bins) and the searchsorted path (10 bins) against a direct
    # reference: float32 edges, (lo, hi] bins, argmax correctness
    from uqseg.metrics.calibration import CalibrationAccumulator

    rng = np.random.default_rng(nb)
    z = (3 * rng.standard_normal((5, 3, 64, 64))).astype(np.float32)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = rng.integers(0, 3, (5, 64, 64))
    acc = CalibrationAccumulator(nb, scores=False, chunk_size=3000).update(p, y)
    conf = p.max(1).ravel()
    correct = (p.argmax(1) == y).ravel()
    e = np.linspace(0, 1, nb + 1).astype(np.float32)
    b = np.searchsorted(e[1:-1], conf, side="left")
    count = np.bincount(b, minlength=nb)
    gap = np.abs(np.bincount(b, conf.astype(np.float64), nb) - np.bincount(b, correct, nb))
    np.testing.assert_array_equal(acc.reliability_curve()[2], count)
    assert acc.ece == pytest.approx(gap.sum() / conf.size, rel=1e-12, abs=1e-15)
