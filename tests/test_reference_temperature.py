"""Temperature-scaling internals against numpy/scipy references: the weighted ECE and NLL
objectives, their gradient, the water-filling cap and the subsampled fits."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import approx_fprime
from scipy.special import log_softmax
from scipy.special import softmax as sp_softmax
from test_calibration import synth

from uqseg.calibration import (
    TemperatureCalibrator,
    _ece_objective,
    _minimize_ece,
    _nll_and_grad,
    _objective,
    _water_fill,
)


def _sample(n=3000, k=4, seed=0):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((k, n)) * 2.5).astype(np.float32)
    z[0] += 1.0
    y = rng.integers(0, k, n)
    w = rng.uniform(0.2, 9.0, n)
    return z, y, w


def ref_weighted_ece(z, y, w, t, n_bins):
    """Weighted top-label ECE of softmax(z / T) with [lo, hi) bins (the objective's rule)."""
    p = sp_softmax(z.astype(np.float64) / t, axis=0)
    conf, hit = p.max(0), (p.argmax(0) == y).astype(float)
    b = np.minimum(np.floor(conf * n_bins).astype(int), n_bins - 1)
    gap = sum(abs(np.sum(w[b == i] * (conf[b == i] - hit[b == i]))) for i in range(n_bins))
    return gap / w.sum()


def ref_weighted_nll(z, y, w, log_t):
    """Weighted mean NLL of softmax(z / T_k) (T scalar or per class)."""
    t = np.exp(np.asarray(log_t, float)).reshape(-1, 1)
    lp = log_softmax(z.astype(np.float64) / t, axis=0)
    return float(np.sum(w * -lp[y, np.arange(y.size)]) / w.sum())


@pytest.mark.parametrize("t", [0.3, 1.0, 2.7])
@pytest.mark.parametrize("n_bins", [1, 10, 15])
def test_ece_objective_is_the_weighted_ece(t, n_bins):
    z, y, w = _sample()
    got = _ece_objective(z, y, w, n_bins)(np.log(t))
    assert got == pytest.approx(ref_weighted_ece(z, y, w, t, n_bins), abs=2e-6)
    # weights matter on this sample: the unweighted value differs
    assert abs(ref_weighted_ece(z, y, np.ones_like(w), t, n_bins) - got) > 1e-4 or n_bins == 1


@pytest.mark.parametrize("classwise", [False, True])
def test_nll_objective_and_gradient_against_scipy(classwise):
    z, y, w = _sample(n=2000, seed=1)
    dim = z.shape[0] if classwise else 1
    for log_t in (np.zeros(dim), np.linspace(-0.7, 0.9, dim)):
        f, g = _nll_and_grad(log_t, z, y, w, classwise)
        assert f == pytest.approx(ref_weighted_nll(z, y, w, log_t), rel=1e-9)
        num = approx_fprime(log_t, lambda v: ref_weighted_nll(z, y, w, v), 1e-6)
        np.testing.assert_allclose(g, num, atol=1e-5)
    # the objective is chunked: a sample larger than one chunk gives the same numbers
    import uqseg._temperature_objectives as cal_mod

    small = cal_mod._OBJ_CHUNK
    try:
        cal_mod._OBJ_CHUNK = 257
        f2, g2 = _objective(z, y, w, classwise)(np.full(dim, 0.3))
    finally:
        cal_mod._OBJ_CHUNK = small
    f1, g1 = _objective(z, y, w, classwise)(np.full(dim, 0.3))
    assert f2 == pytest.approx(f1, rel=1e-12)
    np.testing.assert_allclose(g2, g1, rtol=1e-10)


def test_minimize_ece_finds_the_grid_scan_minimum():
    z, y, w = _sample(seed=2)
    z = z * 2.0  # over-confident: the optimum is a temperature > 1
    fun = _ece_objective(z, y, w, 15)
    log_t, nfev = _minimize_ece(fun)
    scan = np.linspace(np.log(0.05), np.log(20.0), 2000)
    best = min(ref_weighted_ece(z, y, w, np.exp(s), 15) for s in scan[::10])
    assert fun(log_t) <= best + 1e-6
    assert np.log(0.05) - 1e-9 <= log_t <= np.log(20.0) + 1e-9
    assert nfev > 49


@pytest.mark.parametrize(("counts", "budget", "cap"), [
    ([5, 5, 5], 100, np.inf),        # everything fits
    ([5, 5, 5], 15, np.inf),
    ([100, 2, 3], 20, 15.0),         # 2 + 3 + 15 = 20
    ([100, 100, 1], 21, 10.0),       # 1 + 10 + 10
    ([50, 50, 50], 10, 3.0),         # floor(10 / 3)
    ([7, 1000], 3, 1.0),             # 2 would hold 4
])
def test_water_fill_against_brute_force(counts, budget, cap):
    got = _water_fill(np.array(counts), budget)
    assert got == cap
    if np.isfinite(got):  # brute force: the largest cap whose total fits (at least 1)
        best = max([c for c in range(1, max(counts) + 1)
                    if np.minimum(counts, c).sum() <= budget], default=1)
        assert got == best


def _dominant_background(seed=3, n=4, k=3, shape=(48, 48), t0=2.5, bg=5.0):
    """Labels drawn from softmax(z); shown logits z * t0. A strong background class makes
    the confidence strata very unequal, so the stratified sample must be re-weighted."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k, *shape)) * 2.0
    z[:, 0] += bg
    cum = sp_softmax(z, axis=1).cumsum(axis=1)[:, :-1]
    y = (cum < rng.random((n, 1, *shape))).sum(axis=1)
    return (z * t0).astype(np.float32), y


def test_subsampled_ece_fit_reweights_to_the_full_data_optimum():
    shown, y = _dominant_background()
    full = TemperatureCalibrator(objective="ece").fit(shown, y)
    small = TemperatureCalibrator(objective="ece", max_voxels=1500, random_state=0).fit(shown, y)
    assert small.n_voxels_sampled_ <= 1500 < small.n_voxels_fit_ == y.size
    w = small._weights()
    assert w.max() / w.min() > 5  # strata are sampled very unequally here
    # each kept voxel stands for counts / held voxels of its stratum: the weights add up
    assert w.sum() == pytest.approx(y.size)
    # the unweighted sample's optimum lies near T = 6 on this data; the weighted one near 2.5
    assert small.temperature_ == pytest.approx(full.temperature_, rel=0.12)
    assert full.temperature_ == pytest.approx(2.5, rel=0.1)
    # and the full-data fit is the ECE minimum of an independent scan
    zk = np.moveaxis(shown, 1, 0).reshape(3, -1)  # (K, voxels), in y.reshape(-1) order

    def ece(t):
        return ref_weighted_ece(zk, y.reshape(-1), np.ones(y.size), t, 15)

    scan = min(ece(t) for t in np.exp(np.linspace(np.log(1.5), np.log(4.0), 40)))
    assert full.ece_after_ <= scan + 1e-4


def test_subsampled_nll_fit_matches_the_full_data_fit():
    _, shown, y = synth(4, temps=0.6)
    full = TemperatureCalibrator().fit(shown, y)
    small = TemperatureCalibrator(max_voxels=1500, random_state=0).fit(shown, y)
    assert small.temperature_ == pytest.approx(full.temperature_, rel=0.06)
    lp = log_softmax(shown.astype(np.float64), axis=1)
    ref = -np.take_along_axis(lp, y[:, None], axis=1).mean()
    assert small.nll_before_ == pytest.approx(ref, rel=0.05)  # weighted sample ~ full data
