"""OOD and quality metrics against scikit-learn, scipy and brute-force definitions."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from uqseg.metrics import (
    detection_report,
    fpr_at_tpr,
    mean_absolute_error,
    ood_aupr,
    ood_auroc,
    pearson_r,
    quality_report,
    spearman_rho,
)


def labelled(s_in, s_out):
    return np.r_[np.ones(len(s_in)), np.zeros(len(s_out))], np.r_[s_in, s_out]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auroc_aupr_match_sklearn_with_ties(seed):
    rng = np.random.default_rng(seed)
    s_in = np.round(rng.normal(1.0, 1.0, 40), 1)  # rounding creates ties
    s_out = np.round(rng.normal(0.0, 1.0, 25), 1)
    is_in, s = labelled(s_in, s_out)
    assert ood_auroc(s_in, s_out) == pytest.approx(roc_auc_score(is_in, s))
    assert ood_aupr(s_in, s_out) == pytest.approx(average_precision_score(1 - is_in, -s))
    assert ood_aupr(s_in, s_out, positive="in") == pytest.approx(average_precision_score(is_in, s))


def test_auroc_is_pairwise_probability():
    s_in, s_out = np.array([3.0, 2.0, 1.0]), np.array([1.0, 0.0, 2.5, -1.0])
    pairs = [1.0 if a > b else 0.5 if a == b else 0.0 for a in s_in for b in s_out]
    assert ood_auroc(s_in, s_out) == pytest.approx(np.mean(pairs))
    assert ood_auroc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert ood_auroc([5.0], [5.0]) == 0.5


@pytest.mark.parametrize("tpr", [0.5, 0.9, 0.95, 1.0])
def test_fpr_at_tpr_matches_roc_curve(tpr):
    rng = np.random.default_rng(3)
    s_in, s_out = rng.normal(1.5, 1, 200), rng.normal(0, 1, 150)
    is_in, s = labelled(s_in, s_out)
    fpr, tprs, _ = roc_curve(is_in, s)
    expected = fpr[tprs >= tpr - 1e-12].min()  # best operating point reaching the rate
    assert fpr_at_tpr(s_in, s_out, tpr=tpr) == pytest.approx(expected)


def test_fpr_at_tpr_hand_case_and_bad_args():
    s_in = np.arange(20.0)  # keep 19 of 20 at 95 %: threshold 1.0
    assert fpr_at_tpr(s_in, [0.5, 1.0, 30.0, -2.0]) == 0.5
    with pytest.raises(ValueError, match="tpr"):
        fpr_at_tpr(s_in, [1.0], tpr=0.0)
    with pytest.raises(ValueError, match="scores_out"):
        ood_auroc(s_in, [])
    with pytest.raises(ValueError, match="scores_in"):
        ood_auroc([np.nan], [1.0])
    with pytest.raises(ValueError, match="positive"):
        ood_aupr(s_in, [1.0], positive="ood")


def test_detection_report_counts():
    s_in = np.array([3.0, 2.0, 1.0, 0.2])
    s_out = np.array([0.0, 1.5, -1.0])
    r = detection_report(s_in, s_out, threshold=1.0)
    # in accepted (>= 1): 3 of 4; OOD flagged (< 1): 2 of 3
    assert r["specificity"] == 0.75
    assert r["sensitivity"] == pytest.approx(2 / 3)
    assert r["accuracy"] == pytest.approx(5 / 7)
    assert r["auroc"] == pytest.approx(ood_auroc(s_in, s_out))
    assert (r["n_in"], r["n_out"]) == (4, 3)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.integers(-5, 5), min_size=1, max_size=30),
    st.lists(st.integers(-5, 5), min_size=1, max_size=30),
)
def test_auroc_symmetry_property(a, b):
    a, b = np.array(a, float), np.array(b, float)
    auc = ood_auroc(a, b)
    assert 0.0 <= auc <= 1.0
    assert auc + ood_auroc(b, a) == pytest.approx(1.0)
    assert 0.0 <= fpr_at_tpr(a, b) <= 1.0


def test_quality_report_matches_scipy_and_ignores_nan_pairs():
    rng = np.random.default_rng(4)
    true = rng.random((30, 2))
    pred = np.clip(true + rng.normal(0, 0.1, true.shape), 0, 1)
    true[3, 1] = np.nan
    pred[7, 0] = np.nan
    keep = ~(np.isnan(true) | np.isnan(pred))
    p, t = pred[keep], true[keep]
    r = quality_report(pred, true)
    assert r["n"] == 58
    assert r["mae"] == pytest.approx(np.mean(np.abs(p - t)))
    assert r["pearson_r"] == pytest.approx(stats.pearsonr(p, t)[0])
    assert r["spearman_rho"] == pytest.approx(stats.spearmanr(p, t)[0])
    assert mean_absolute_error(pred, true) == r["mae"]


def test_quality_degenerate_cases_give_nan_without_warning():
    assert np.isnan(pearson_r([0.5, 0.5, 0.5], [0.1, 0.2, 0.3]))  # constant input
    assert np.isnan(spearman_rho([0.5], [0.1]))
    assert np.isnan(mean_absolute_error([np.nan], [0.1]))
    assert quality_report([np.nan], [0.2])["n"] == 0
    with pytest.raises(ValueError, match="same shape"):
        quality_report([0.1, 0.2], [0.1])
