"""Dice, IoU and HD95 against explicit set computations and pairwise surface distances."""

import numpy as np
import pytest
from scipy.spatial.distance import cdist, directed_hausdorff

from uqseg.metrics import dice_score, hausdorff_distance_95, iou_score


def ref_overlap(pred, y, k, ignore_index=None):
    dice = np.full((len(pred), k - 1), np.nan)
    iou = np.full((len(pred), k - 1), np.nan)
    for i, (a, b) in enumerate(zip(pred, y, strict=True)):
        keep = np.ones(b.shape, bool) if ignore_index is None else b != ignore_index
        for c in range(1, k):
            P = set(zip(*np.nonzero((a == c) & keep), strict=True))
            G = set(zip(*np.nonzero((b == c) & keep), strict=True))
            if P or G:
                dice[i, c - 1] = 2 * len(P & G) / (len(P) + len(G))
                iou[i, c - 1] = len(P & G) / len(P | G)
    return dice, iou


def surface_points(m):
    pts = []
    for idx in zip(*np.nonzero(m), strict=True):
        for ax in range(m.ndim):
            for d in (-1, 1):
                j = list(idx)
                j[ax] += d
                if not (0 <= j[ax] < m.shape[ax]) or not m[tuple(j)]:
                    pts.append(idx)
                    break
            else:
                continue
            break
    return np.array(pts, float)


def ref_hd95(a, b, spacing):
    sa, sb = surface_points(a) * spacing, surface_points(b) * spacing
    d = cdist(sa, sb)
    return max(np.percentile(d.min(axis=1), 95), np.percentile(d.min(axis=0), 95))


@pytest.mark.parametrize("shape", [(4, 9, 11), (3, 5, 6, 7)])
def test_dice_iou_match_set_computation(shape):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=shape)
    pred = np.where(rng.random(shape) < 0.7, y, rng.integers(0, 4, size=shape))
    pred[0][pred[0] == 3] = 0
    y[0][y[0] == 3] = 0  # class 3 empty in both for image 0 -> NaN
    dice, iou = ref_overlap(pred, y, 4)
    np.testing.assert_allclose(dice_score(pred, y, 4), dice, equal_nan=True)
    np.testing.assert_allclose(iou_score(pred, y, 4), iou, equal_nan=True)
    assert np.isnan(dice_score(pred, y)[0, 2])  # n_classes inferred as 4
    # Dice and IoU are tied by D = 2J / (1 + J)
    j = iou_score(pred, y)
    np.testing.assert_allclose(dice_score(pred, y), 2 * j / (1 + j), equal_nan=True)


def test_ignore_index_lists_and_edge_cases():
    rng = np.random.default_rng(1)
    ys = [rng.integers(0, 3, size=s) for s in [(5, 6), (8, 3)]]
    preds = [rng.integers(0, 3, size=s) for s in [(5, 6), (8, 3)]]
    ys[1][0, :] = 255
    dice, iou = ref_overlap(preds, ys, 3, ignore_index=255)
    np.testing.assert_allclose(dice_score(preds, ys, 3, ignore_index=255), dice)
    np.testing.assert_allclose(iou_score(preds, ys, ignore_index=255), iou)
    y = np.zeros((1, 4, 4), int)
    np.testing.assert_array_equal(dice_score(y, y, 2), [[np.nan]])  # both empty
    y1 = y.copy()
    y1[0, 1, 1] = 1
    np.testing.assert_array_equal(dice_score(y1, y1), [[1.0]])  # all correct
    np.testing.assert_array_equal(dice_score(y, y1), [[0.0]])  # prediction empty
    with pytest.raises(ValueError, match="shape"):
        dice_score(y, np.zeros((1, 4, 5), int))
    with pytest.raises(TypeError, match="lists"):
        dice_score([y[0]], y)
    with pytest.raises(ValueError, match="labels"):
        dice_score(y1 * 3, y1, n_classes=2)


@pytest.mark.parametrize("spacing", [None, (1.0, 1.0), (0.5, 2.0)])
def test_hd95_2d_matches_pairwise_surface_distances(spacing):
    rng = np.random.default_rng(2)
    y = np.zeros((2, 20, 24), int)
    y[0, 4:12, 5:15] = 1
    y[0, 14:18, 2:6] = 2
    y[1, 8:16, 10:20] = 1
    y[1, 1:3, 1:3] = 2
    pred = np.roll(y, (1, 2), axis=(1, 2))
    pred[0][rng.random((20, 24)) < 0.05] = 1
    sp = np.ones(2) if spacing is None else np.array(spacing)
    got = hausdorff_distance_95(pred, y, spacing=spacing)
    for i in range(2):
        for c in (1, 2):
            a, b = pred[i] == c, y[i] == c
            assert got[i, c - 1] == pytest.approx(ref_hd95(a, b, sp), rel=1e-9)
            # never above the full (100th percentile) Hausdorff distance between the voxel sets
            pa, pb = np.argwhere(a) * sp, np.argwhere(b) * sp
            full = max(directed_hausdorff(pa, pb)[0], directed_hausdorff(pb, pa)[0])
            assert got[i, c - 1] <= full + 1e-9


def test_hd95_3d_shift_and_empty_cases():
    y = np.zeros((1, 10, 12, 12), int)
    y[0, 3:7, 3:8, 3:8] = 1
    pred = np.roll(y, 2, axis=1)  # every surface voxel moves 2 slices
    got = hausdorff_distance_95(pred, y, spacing=(3.0, 1.0, 1.0))
    assert got[0, 0] == pytest.approx(ref_hd95(pred[0] == 1, y[0] == 1, np.array([3.0, 1, 1])))
    assert 0 < got[0, 0] <= 6.0  # 2 slices of 3 mm
    np.testing.assert_array_equal(hausdorff_distance_95(y, y, spacing=2.0), [[0.0]])
    empty = np.zeros_like(y)
    res = hausdorff_distance_95(
        np.concatenate([empty, y, empty]), np.concatenate([empty, empty, y]), n_classes=2
    )
    assert np.isnan(res[0, 0]) and np.isinf(res[1, 0]) and np.isinf(res[2, 0])
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distance_95(y, y, spacing=(1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        hausdorff_distance_95(y, y, spacing=-1.0)


def test_hd95_accepts_lists_of_different_sizes():
    a = np.zeros((9, 9), int)
    a[2:6, 2:6] = 1
    b = np.zeros((7, 12), int)
    b[1:4, 3:9] = 1
    got = hausdorff_distance_95([a, b], [np.roll(a, 1, axis=0), b])
    assert got[0, 0] == pytest.approx(ref_hd95(a == 1, np.roll(a, 1, axis=0) == 1, np.ones(2)))
    assert got[1, 0] == 0.0
