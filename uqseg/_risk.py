"""Numeric core of :class:`uqseg.ConformalRiskController` (numpy/scipy only).

Per image and class the calibration pass keeps two histograms of the class probability on a
fixed grid of ``n_bins + 1`` bins (``bin = floor(p * n_bins)``): over the voxels whose truth is
the class, and over all voxels. A mask ``{bin(p) >= j}`` then has, for every grid index
``j = 0 .. n_bins + 1`` (``n_bins + 1``: the empty mask), a true-positive count and a size
given by reverse cumulative sums, so every risk below is exact at every grid threshold without
keeping a single voxel.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import binom

#: Risks the controller knows; the value is the end of the threshold grid where the loss is 0
#: ("low": index 0, the full mask; "high": the empty mask; None: neither end is safe).
RISKS = {"fnr": "low", "fdr": "high", "dice": None, "volume": None}


def bin_index(p: np.ndarray, n_bins: int) -> np.ndarray:
    """``floor(p * n_bins)`` clipped to ``[0, n_bins]`` (int32), computed in float32.

    Fit and predict both go through this one function, so the mask ``{bin >= j}`` predicted
    is exactly the one whose risk was measured.
    """
    b = np.multiply(p, np.float32(n_bins), dtype=np.float32)
    np.floor(b, out=b)
    np.clip(b, 0, n_bins, out=b)
    return b.astype(np.int32)


def class_histograms(bins: np.ndarray, truth: np.ndarray, n_bins: int):
    """Histograms of one image: ``bins`` ``(K, V)`` grid indices of the valid voxels,
    ``truth`` ``(V,)`` class labels or ``(K, V)`` booleans.

    Returns ``(true_hist, all_hist)``, uint32 ``(K, n_bins + 1)``: per class the grid indices
    over the voxels of that class, and over all voxels.
    """
    k, v = bins.shape
    width = n_bins + 1
    offs = (np.arange(k, dtype=np.int64) * width)[:, None]
    all_hist = np.bincount((bins + offs).ravel(), minlength=k * width).reshape(k, width)
    if truth.ndim == 1:  # labels: each voxel counts once, for its own class
        own = bins[truth, np.arange(v)].astype(np.int64) + truth.astype(np.int64) * width
    else:
        own = (bins + offs)[truth]
    true_hist = np.bincount(own, minlength=k * width).reshape(k, width)
    return true_hist.astype(np.uint32), all_hist.astype(np.uint32)


def set_scores(proba: np.ndarray, score: str) -> np.ndarray:
    """Non-conformity of every class, ``(K, V)``: LAC ``1 - p_k``; APS with ``u = 0`` (not
    randomised): ``sum of p_m over the classes strictly more likely than k``.

    Counting ``p_k`` itself (``u = 1``) would give the confident correct voxels a score of
    about 1, so the quantile, and every set, would take all classes; with ``u = 0`` the most
    likely class scores 0 and sets are never empty. Any fixed score keeps the guarantee."""
    if score == "lac":
        return np.subtract(np.float32(1), proba, dtype=np.float32)
    out = np.zeros_like(proba, dtype=np.float32)
    for m in range(proba.shape[0]):  # K is small: K vector passes, no sort
        out += np.where(proba[m] > proba, proba[m], np.float32(0))
    return out


def _tail(hist: np.ndarray) -> np.ndarray:
    """``out[..., j] = sum_{b >= j} hist[..., b]`` for ``j = 0 .. n_bins + 1`` (int64)."""
    h = np.asarray(hist)
    out = np.empty(h.shape[:-1] + (h.shape[-1] + 1,), np.int64)
    out[..., -1] = 0
    # the reversed cumulative sum written straight into the reversed view: no int64 copy of
    # the input, no concatenation (recalibrate runs this on every class's histograms)
    np.cumsum(h[..., ::-1], axis=-1, dtype=np.int64, out=out[..., -2::-1])
    return out


def loss_curves(true_hist: np.ndarray, all_hist: np.ndarray, risk: str):
    """Per-image losses of the masks ``{bin >= j}``, ``j = 0 .. n_bins + 1``.

    Parameters
    ----------
    true_hist, all_hist : ``(n, n_bins + 1)`` histograms of one class
    risk : one of :data:`RISKS`

    Returns
    -------
    losses : float64 ``(n_eligible, n_bins + 2)`` in ``[0, 1]``
    eligible : bool ``(n,)``: images whose loss is defined. ``fnr`` and ``volume`` are
        relative to the true volume, so an image without the class has none (it is left out,
        and the guarantee is conditional on the class being present); ``fdr`` of an empty
        mask is 0 (no discovery, none false) and ``1 - Dice`` of two empty masks is 0.
    """
    tp = _tail(true_hist).astype(np.float64)
    pos = _tail(all_hist).astype(np.float64)
    g = tp[:, :1]
    if risk in ("fnr", "volume"):
        eligible = g[:, 0] > 0
        tp, pos, g = tp[eligible], pos[eligible], g[eligible]
        if risk == "fnr":
            return 1.0 - tp / g, eligible
        return np.minimum(np.abs(pos - g) / g, 1.0), eligible
    eligible = np.ones(tp.shape[0], bool)
    if risk == "fdr":
        return np.divide(pos - tp, pos, out=np.zeros_like(tp), where=pos > 0), eligible
    denom = g + pos
    return 1.0 - np.divide(2 * tp, denom, out=np.ones_like(tp), where=denom > 0), eligible


def hb_pvalue(rhat, n: int, alpha: float) -> np.ndarray:
    """Hoeffding-Bentkus p-value of ``H: R > alpha`` from a mean ``rhat`` of ``n`` losses in
    [0, 1] (Learn-then-Test, Angelopoulos et al. 2021, Prop. 3)."""
    r = np.asarray(rhat, dtype=np.float64)
    a = np.minimum(r, alpha)
    with np.errstate(divide="ignore", invalid="ignore"):
        first = np.where(a > 0, a * np.log(a / alpha), 0.0)
        h = first + (1 - a) * np.log((1 - a) / (1 - alpha))
    hoeffding = np.exp(-n * h)
    bentkus = math.e * binom.cdf(np.ceil(n * r), n, alpha)
    return np.minimum(np.minimum(hoeffding, bentkus), 1.0)


def n_needed(alpha: float, delta: float, rhat: float = 0.0) -> int:
    """Images Learn-then-Test needs to reject ``R > alpha`` at ``delta`` when the mean loss is
    ``rhat``: exact for ``rhat = 0`` (the p-value is ``(1 - alpha)^n``), the Hoeffding bound's
    count otherwise (an upper estimate)."""
    if rhat <= 0:
        return math.ceil(math.log(delta) / math.log1p(-alpha))
    if rhat >= alpha:
        return -1
    h = rhat * math.log(rhat / alpha) + (1 - rhat) * math.log((1 - rhat) / (1 - alpha))
    return math.ceil(math.log(1 / delta) / h)


class NoValidThreshold(ValueError):
    """No threshold passes; the message says why and how many images would do."""


def crc_index(losses: np.ndarray, alpha: float) -> tuple[int, float]:
    """Conformal risk control on a grid whose index 0 is the safe end (loss 0 there).

    Losses are first replaced by their monotone envelope ``max_{j' <= j} L(j')`` (an upper
    bound, identical for a loss that already grows with ``j``), then
    ``j = max{j : n/(n+1) R_n(j) + 1/(n+1) <= alpha}`` (the loss bound ``B`` is 1): the
    ``inf`` over ``lambda`` of Angelopoulos et al. (2024), with ``lambda`` decreasing in ``j``.
    Returns the index and the empirical risk of the original losses there.
    """
    n = losses.shape[0]
    env = np.maximum.accumulate(losses, axis=1).mean(axis=0)
    adjusted = n / (n + 1) * env + 1 / (n + 1)
    ok = np.flatnonzero(adjusted <= alpha)
    if ok.size == 0 or ok[0] != 0:
        need = math.ceil(1 / alpha - 1 - 1e-12)
        raise NoValidThreshold(
            f"conformal risk control needs n/(n+1) * R_n + 1/(n+1) <= alpha even for the safest "
            f"mask, i.e. at least {need} calibration images for alpha={alpha}; got n={n}")
    # the envelope is non-decreasing, so the valid indices are 0 .. ok[-1]
    j = int(ok[-1])
    return j, float(losses[:, j].mean())


def ltt_index(losses: np.ndarray, alpha: float, delta: float, safe: str | None,
              start: int) -> tuple[int, float]:
    """Learn-then-Test: fixed-sequence testing of ``H_j: R(j) > alpha`` with
    Hoeffding-Bentkus p-values; the rejected ``j`` all have ``P(R(j) <= alpha) >= 1 - delta``
    jointly (FWER control at ``delta``).

    ``safe="low"``: one sequence ``0, 1, ...`` at level ``delta`` (index 0 is the safe end),
    keeping the last rejected index. ``safe=None`` (no safe end): two sequences from
    ``start``, one down and one up, each at ``delta / 2`` (Bonferroni across the two); among
    the rejected indices the one with the smallest empirical risk (ties: the larger index).
    """
    n, m = losses.shape
    rhat = losses.mean(axis=0)
    p = hb_pvalue(rhat, n, alpha)
    if safe == "low":
        chains, level = [np.arange(m)], delta
    else:
        chains, level = [np.arange(start, -1, -1), np.arange(start + 1, m)], delta / 2
    valid = []
    for chain in chains:
        fails = np.flatnonzero(p[chain] > level)
        valid.extend(chain[: fails[0] if fails.size else chain.size].tolist())
    if not valid:
        first = float(rhat[chains[0][0]])
        need0 = n_needed(alpha, level)
        msg = (f"Learn-then-Test found no threshold with risk <= alpha={alpha} at delta={delta}: "
               f"the first threshold tested has empirical risk {first:.4g} over n={n} images "
               f"(p-value {float(p[chains[0][0]]):.3g} > {level:.3g}). Even a risk of 0 needs at "
               f"least {need0} images")
        need = n_needed(alpha, level, first)
        if first > 0 and need > 0:
            msg += f"; at the risk observed here about {need} images (Hoeffding bound)"
        elif need < 0:
            msg += "; the risk observed here is above alpha, so more images will not help"
        raise NoValidThreshold(msg + "; or raise alpha or delta")
    valid = np.asarray(valid)
    if safe == "low":
        j = int(valid.max())
    else:
        best = rhat[valid].min()
        j = int(valid[rhat[valid] == best].max())
    return j, float(rhat[j])


def solve(losses: np.ndarray, alpha: float, delta: float | None, safe: str | None,
          start: int) -> tuple[int, float]:
    """The grid index chosen by CRC (``delta=None``) or LTT; ``safe="high"`` is solved on the
    reversed grid. Returns ``(index, empirical risk at it)``."""
    m = losses.shape[1]
    flip = safe == "high"
    arr = losses[:, ::-1] if flip else losses
    if delta is None:
        if safe is None:
            raise ValueError("conformal risk control needs a loss that is 0 at one end of the "
                             "grid")
        j, r = crc_index(arr, alpha)
    else:
        j, r = ltt_index(arr, alpha, delta, "low" if flip else safe,
                         m - 1 - start if flip else start)
    return (m - 1 - j if flip else j), r


def set_thresholds(set_true: np.ndarray, set_all: np.ndarray, n_voxels: np.ndarray,
                   alpha: float, mondrian: bool) -> tuple[np.ndarray, float]:
    """Score bounds of the voxel prediction sets by image-level conformal risk control.

    Class ``k`` is in a voxel's set where its score's grid index is ``<= Q``. The loss of an
    image is the fraction of its voxels (``mondrian``: of its voxels of class ``k``, over the
    images that contain ``k``) whose true class is outside the set: non-increasing in ``Q``
    and 0 at ``Q = n_bins``, so CRC applies with images, not voxels, as the exchangeable units.

    Parameters
    ----------
    set_true, set_all : ``(n, K, n_bins + 1)`` score histograms (true-class voxels / all)
    n_voxels : ``(n,)``

    Returns
    -------
    q : int ``(K,)``; mean_set_size : float (classes per voxel over these images at ``q``)
    """
    n_bins = set_true.shape[2] - 1
    k = set_true.shape[1]
    groups = [list(range(k))] if not mondrian else [[c] for c in range(k)]
    q = np.zeros(k, np.int64)
    for g in groups:
        # [:, Q + 1]: voxels of the group's classes whose score index is > Q (the tail is
        # linear: summing the classes first is exact and K times cheaper)
        counts = _tail(set_true[:, g, :].sum(axis=1, dtype=np.int64))
        denom = counts[:, 0].astype(np.float64)
        keep = denom > 0
        if not keep.any():
            raise NoValidThreshold(f"no calibration image contains class {g[0]}")
        # index i = 0 is the full set (Q = n_bins): loss(i) = miss(Q + 1) / |voxels|
        i, _ = crc_index(counts[keep, ::-1] / denom[keep, None], alpha)
        q[g] = n_bins - i
    outside = np.stack([set_all[:, c, q[c] + 1:].sum(axis=-1, dtype=np.int64)
                        for c in range(k)], axis=1)
    inside = n_voxels[:, None] - outside
    return q, float(inside.sum() / np.sum(n_voxels))
