"""Objectives of temperature scaling over a weighted voxel sample: the NLL of
``softmax(z / T)`` with its analytic gradient in ``log T`` (one or one per class), the
top-label ECE, and the search that minimises the (non-convex) ECE.

A sigmoid channel is the two-class softmax problem on ``[0, z]`` (``softmax([0, z / T])``'s
second entry is ``sigmoid(z / T)``), so the same kernels fit binary and multi-label
networks: :func:`channel_objective` sums one two-class problem per channel.
"""

from __future__ import annotations

import numpy as np
from scipy.optimize import minimize_scalar

#: log-temperature bounds of the optimiser: T in [1e-2, 1e2].
LOG_T_BOUNDS = (float(np.log(1e-2)), float(np.log(1e2)))
_OBJ_CHUNK = 1 << 18  # sample rows per objective step


def _objective(z, y, w, classwise):
    """``fun(log_t) -> (mean NLL, gradient)`` over the weighted sample, for L-BFGS-B.

    ``z`` is class-major ``(K, n)``: reductions over a short class axis are slow in numpy,
    row-wise operations over ``n`` are fast.

    With ``a = exp(-log T)`` and ``p = softmax(a * z)`` the voxel loss is
    ``L = logsumexp(a * z) - a_y z_y``, so ``dL/da_k = p_k z_k - 1[y == k] z_k`` and
    ``dL/dlog T_k = -a_k dL/da_k`` (global mode: one ``a``, the sum over ``k``). The
    ``1[y == k] z_k`` terms do not depend on ``a``; they are summed once here.
    """
    w = np.asarray(w, np.float64)
    k = z.shape[0]
    zy = np.take_along_axis(z, y[None].astype(np.intp), axis=0)[0].astype(np.float64)
    c = np.bincount(y, weights=w * zy, minlength=k)  # sum over voxels of class k of w z_y
    wsum = float(w.sum())

    def fun(log_t):
        log_t = np.atleast_1d(np.asarray(log_t, dtype=np.float64))
        a = np.exp(-log_t)
        f = -float(np.broadcast_to(a, (k,)) @ c)
        ga = -c.copy()
        a_col = np.broadcast_to(a, (k,))[:, None]
        for s in range(0, z.shape[1], _OBJ_CHUNK):
            zc, wc = z[:, s:s + _OBJ_CHUNK], w[s:s + _OBJ_CHUNK]
            u = np.multiply(zc, a_col, dtype=np.float64)
            m = u.max(axis=0)
            u -= m
            np.exp(u, out=u)
            tot = u.sum(axis=0)
            # einsum, not BLAS: a threaded dot stalls on a busy machine for no gain here
            f += float(np.einsum("i,i->", wc, m + np.log(tot)))
            u *= zc
            ga += np.einsum("ki,i->k", u, wc / tot)  # sum_i w_i p_ik z_ik
        g = -np.broadcast_to(a, (k,)) * ga / wsum
        return f / wsum, (g if classwise else np.array([g.sum()]))

    return fun


def _ece_objective(z, y, w, n_bins):
    """``fun(log_t) -> ECE`` of ``softmax(z / T)`` over the weighted sample (top-label,
    ``n_bins`` equal-width bins, as :func:`uqseg.metrics.expected_calibration_error`).

    A global temperature never changes the argmax, so correctness is computed once; only the
    confidence ``1 / sum_k exp((z_k - z_max) / T)`` depends on ``T``.
    """
    w = np.asarray(w, np.float64)
    zmax = z.max(axis=0)
    d = (z - zmax).astype(np.float32)  # <= 0
    correct = (z.argmax(axis=0) == y).astype(np.float64)
    wc = w * correct
    wsum = float(w.sum())

    def fun(log_t):
        a = np.float32(np.exp(-float(np.asarray(log_t).reshape(-1)[0])))
        conf = np.zeros(d.shape[1], np.float64)
        for row in d:
            conf += np.exp(row * a)
        np.reciprocal(conf, out=conf)
        b = np.minimum((conf * n_bins).astype(np.intp), n_bins - 1)
        gap = np.bincount(b, weights=w * conf, minlength=n_bins)
        gap -= np.bincount(b, weights=wc, minlength=n_bins)
        return float(np.abs(gap).sum() / wsum)

    return fun


def _minimize_ece(fun, n_grid=49):
    """Global temperature minimising a (piecewise smooth, not convex) ECE: a log-spaced grid
    over ``T`` in [0.05, 20], then a bounded scalar search between the best point's
    neighbours."""
    grid = np.linspace(np.log(0.05), np.log(20.0), n_grid)
    vals = np.array([fun(g) for g in grid])
    i = int(np.argmin(vals))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, n_grid - 1)]
    res = minimize_scalar(fun, bounds=(lo, hi), method="bounded", options={"xatol": 1e-4})
    best = float(res.x) if res.fun <= vals[i] else float(grid[i])
    return best, n_grid + int(res.nfev)


def _nll_and_grad(log_t, z, y, w, classwise):
    """Weighted mean NLL of ``softmax(z / T)`` (``z`` is ``(K, n)``) and its gradient in
    ``log T``."""
    return _objective(z, y, w, classwise)(log_t)



def two_class(z):
    """Sigmoid logits ``(n,)`` or ``(1, n)`` as the equivalent two-class softmax logits
    ``[0, z]`` ``(2, n)``: class 1 is "the channel is on"."""
    z = np.asarray(z).reshape(-1)
    return np.stack([np.zeros_like(z), z])


def channel_objective(z, y, channel, w, n_channels, shared):
    """``fun(log_t) -> (mean binary NLL, gradient)`` of sigmoid channels.

    ``z`` ``(n,)`` holds one logit per sampled (voxel, channel) entry, ``y`` its 0/1 target,
    ``channel`` its channel. The loss of an entry is the Bernoulli NLL
    ``softplus(z / T_c) - y z / T_c``, the two-class softmax NLL on ``[0, z]``; with
    ``shared`` one temperature serves every channel (``log_t`` of size 1), otherwise
    ``log_t`` holds one per channel and the channels' problems are independent (a channel
    without entries keeps its gradient at 0).
    """
    w = np.asarray(w, np.float64)
    wsum = float(w.sum())
    if shared:
        inner = _objective(two_class(z), y, w, False)
        return inner
    parts = []
    for c in range(n_channels):
        sel = channel == c
        if sel.any():
            wc = w[sel]
            parts.append((c, _objective(two_class(z[..., sel]), y[sel], wc, False),
                          float(wc.sum()) / wsum))

    def fun(log_t):
        log_t = np.asarray(log_t, np.float64).reshape(-1)
        f, g = 0.0, np.zeros(n_channels)
        for c, fc, share in parts:
            v, gc = fc(log_t[c:c + 1])
            f += share * v
            g[c] = share * gc[0]
        return f, g

    return fun


def sigmoid_objectives(sample, w, n_channels, shared, n_bins):
    """For a sigmoid voxel sample (``scores`` ``(1, n)``, targets ``2 c + y``): the binary NLL
    (:func:`channel_objective`), the ECE of one shared temperature (None per channel), and
    ``ece_at(log_t)``, the pooled binary ECE at given log-temperatures (the masks ``z > 0``
    never change, so it is the ECE of the two-class problems on ``[0, z / T_c]``)."""
    z, y, ch = sample["scores"][0], sample["labels"] & 1, sample["labels"] >> 1
    fun = channel_objective(z, y, ch, w, n_channels, shared)
    ece = _ece_objective(two_class(z), y, w, n_bins) if shared else None

    def ece_at(log_t):
        a = np.exp(-np.asarray(log_t, np.float64)).reshape(-1)
        scaled = z * (a[0] if shared else a[ch]).astype(np.float32)
        return _ece_objective(two_class(scaled), y, w, n_bins)(0.0)

    return fun, ece, ece_at
