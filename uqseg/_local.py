"""Local temperature scaling (torch-free): the features a voxel's log-temperature is linear in,
and the NLL of the temperature map with its analytic gradient.

Features of one image, from its logits ``z`` (and the image, where the calibrator sees it):

- ``log_margin``: log of the gap between the two largest logits (+``MARGIN_EPS``);
- ``log_entropy``: log of the entropy of ``softmax`` of the logits averaged over 2-voxel
  blocks (+``ENTROPY_EPS``), i.e. on a grid 2x coarser per axis;
- ``log_margin@s``, ``log_entropy@s``: both Gaussian-smoothed at each scale ``s`` (voxels);
- ``log_boundary_distance``: ``log(1 + d)``, ``d`` the Euclidean distance to the predicted
  boundary (voxels whose argmax differs from an axis neighbour), capped at ``DIST_CAP``;
- ``intensity[c]``: channel ``c`` of the image, z-scored per image;
- ``class[k]``: 1 where class ``k >= 1`` is predicted.

Cost decides the layout (predicting must stay within 10% of the network's inference):
everything is float32; margin and argmax take one pass per class over cache-sized blocks; the
exponentials of the entropy run on the 2x coarser grid; a smoothing at scale ``s`` runs on a
grid coarser by :func:`scale_factor` (the smoothed map varies on that scale anyway), the
distance on a grid ``DIST_COARSE`` coarser, in one ``distance_transform_edt`` over all images
of a batch laid side by side; at predict time the coarse terms are summed per grid, coarsest
first, and upsampled (nearest) once. The temperature at a voxel divides all of that voxel's
class logits, so its argmax never changes.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

#: logit margin added before the log, so a tie (margin 0) gives a finite feature
MARGIN_EPS = 1e-3
#: entropy (nats) added before the log
ENTROPY_EPS = 1e-6
#: boundary distances are capped here (voxels): beyond it the distance says nothing new
DIST_CAP = 32.0
#: the distance is computed on a grid this much coarser per axis (a power of 2)
DIST_COARSE = 4
_BLOCK = 1 << 16  # voxels per block of the pointwise features
_TRUNCATE = 3.0
_CHUNK = 1 << 18  # sample rows per objective step


def feature_names(n_classes: int, scales, n_image_channels: int = 0) -> list[str]:
    """Names of the local features, in the order of :func:`local_features`'s rows."""
    names = ["log_margin", *[f"log_margin@{float(s):g}" for s in scales],
             "log_entropy", *[f"log_entropy@{float(s):g}" for s in scales],
             "log_boundary_distance"]
    names += [f"intensity[{c}]" for c in range(n_image_channels)]
    names += [f"class[{k}]" for k in range(1, n_classes)]
    return names


def sigmoid_feature_names(n_channels: int, scales, n_image_channels: int = 0) -> list[str]:
    """Names of the local features of sigmoid outputs: those of one channel's two-class
    problem on ``[0, z_c]`` (``class[1]``: the channel's mask), then ``channel[c]`` for
    ``c >= 1`` (one intercept per channel: a temperature map per channel)."""
    return feature_names(2, scales, n_image_channels) + [
        f"channel[{c}]" for c in range(1, n_channels)]


# ---------------------------------------------------------------------- building blocks
def _margin_labels(z):
    """log margin (float32) and argmax (int16) of logits ``(n, K, *spatial)``.

    Walked in blocks of about ``2**16`` voxels (whole images when they are small) so the
    temporaries stay in cache, one pass per class (numpy reduces a short class axis slowly).
    """
    n, k = z.shape[:2]
    zf = z.reshape(n, k, -1)
    v = zf.shape[2]
    log_margin = np.empty((n, v), np.float32)
    labels = np.empty((n, v), np.int16)
    step = max(1, _BLOCK // max(v, 1))
    blocks = [(slice(i, i + step), slice(None)) for i in range(0, n, step)] if v < _BLOCK \
        else [(slice(i, i + 1), slice(s, s + _BLOCK)) for i in range(n)
              for s in range(0, v, _BLOCK)]
    for bi, bv in blocks:
        zb = zf[bi, :, bv]
        t1 = zb[:, 0].copy()
        t2 = np.full_like(t1, -np.inf)
        tmp = np.empty_like(t1)
        lab = np.zeros(t1.shape, np.int16)
        for c in range(1, k):
            zc = zb[:, c]
            np.minimum(t1, zc, out=tmp)
            np.maximum(t2, tmp, out=t2)
            np.copyto(lab, np.int16(c), where=zc > t1)  # strict: ties keep the lower class
            np.maximum(t1, zc, out=t1)
        np.subtract(t1, t2, out=t1)
        t1 += np.float32(MARGIN_EPS)
        np.log(t1, out=log_margin[bi, bv])
        labels[bi, bv] = lab
    shape = (n, *z.shape[2:])
    return log_margin.reshape(shape), labels.reshape(shape)


def _class_max(z):
    """Maximum over axis 1, one pass per class (numpy reduces a short class axis slowly)."""
    m = z[:, 0].copy()
    for c in range(1, z.shape[1]):
        np.maximum(m, z[:, c], out=m)
    return m


def _log_entropy(z):
    """log(entropy of softmax(z) + eps) over axis 1, ``log sum e^u - sum p u`` with
    ``u = z - max``."""
    t1 = _class_max(z)
    tot = np.zeros_like(t1)
    acc = np.zeros_like(t1)
    for c in range(z.shape[1]):
        u = z[:, c] - t1
        e = np.exp(u)
        tot += e
        e *= u
        acc += e
    acc /= tot
    np.log(tot, out=tot)
    tot -= acc
    np.maximum(tot, 0, out=tot)
    tot += np.float32(ENTROPY_EPS)
    return np.log(tot, out=tot)


def scale_factor(scale: float) -> int:
    """Grid coarsening (power of 2, 2 to 8) on which a smoothing at ``scale`` voxels is done:
    the smoothed map varies on that scale, so a coarser grid loses nothing and costs less."""
    return int(min(8, max(2, 2 ** int(np.floor(np.log2(max(float(scale), 1.0)))))))


def _halve(a, how):
    """Block mean (``how="mean"``) or any (``"any"``) over 2-voxel blocks of every spatial
    axis of ``a`` ``(n, *spatial)`` (odd sizes: the last voxel is repeated). Pairs are
    combined one axis at a time, the outermost first, so the largest pass reads whole rows
    (strided slices, not a reshape: numpy reduces interleaved axes slowly)."""
    pad = [(0, 0)] + [(0, s % 2) for s in a.shape[1:]]
    if any(p[1] for p in pad):
        a = np.pad(a, pad, mode="edge")
    for ax in range(1, a.ndim):
        lo = [slice(None)] * a.ndim
        hi = [slice(None)] * a.ndim
        lo[ax], hi[ax] = slice(0, None, 2), slice(1, None, 2)
        a = (a[tuple(lo)] | a[tuple(hi)]) if how == "any" else a[tuple(lo)] + a[tuple(hi)]
    if how != "any":
        a *= np.float32(0.5 ** (a.ndim - 1))
    return a


def _coarse(a, how, f):
    """``a`` on the grid ``f`` (a power of 2) times coarser per spatial axis."""
    while f > 1:
        a, f = _halve(a, how), f // 2
    return a


def _upsample(c, spatial, f):
    """Nearest upsampling of coarse maps ``(..., *coarse)`` by ``f`` back to ``spatial``."""
    lead = c.ndim - len(spatial)
    for ax, s in enumerate(spatial):
        c = np.repeat(c, f, axis=lead + ax)
        if c.shape[lead + ax] != s:
            c = np.take(c, np.arange(s), axis=lead + ax)
    return c


def _edges(labels):
    """Voxels whose label differs from one of their axis neighbours (both sides marked)."""
    edge = np.zeros(labels.shape, bool)
    for ax in range(1, labels.ndim):
        n = labels.shape[ax]
        if n < 2:
            continue
        lo = [slice(None)] * labels.ndim
        hi = [slice(None)] * labels.ndim
        lo[ax], hi[ax] = slice(None, -1), slice(1, None)
        d = labels[tuple(hi)] != labels[tuple(lo)]
        edge[tuple(lo)] |= d
        edge[tuple(hi)] |= d
    return edge


def _coarse_distance(labels):
    """log(1 + distance to the predicted boundary), distance capped at ``DIST_CAP`` full-grid
    voxels, on the coarse grid ``(n, *coarse)``.

    One ``distance_transform_edt`` for the whole batch: the coarse edge maps are laid side by
    side along the last axis with ``DIST_CAP`` of empty padding in between, so no voxel finds
    a neighbouring image's boundary closer than the cap.
    """
    edge = _coarse(_edges(labels), "any", DIST_COARSE)
    n = edge.shape[0]
    cap = DIST_CAP / DIST_COARSE
    if not edge.any():
        return np.full(edge.shape, np.log1p(DIST_CAP), np.float32)
    gap = int(np.ceil(cap)) + 1
    width = edge.shape[-1]
    pad = [(0, 0)] * (edge.ndim - 1) + [(0, gap)]
    canvas = np.pad(edge, pad)  # (n, ..., width + gap)
    canvas = np.moveaxis(canvas, 0, -2)  # (..., n, width + gap): images side by side
    canvas = canvas.reshape(*canvas.shape[:-2], n * (width + gap))
    d = ndimage.distance_transform_edt(~canvas).astype(np.float32)
    d = d.reshape(*d.shape[:-1], n, width + gap)[..., :width]
    d = np.moveaxis(d, -2, 0)
    np.minimum(d, np.float32(cap), out=d)
    d *= np.float32(DIST_COARSE)
    return np.log1p(d)


def _image_stats(image):
    """Per image and channel mean and standard deviation (1 where constant), float32."""
    axes = tuple(range(2, image.ndim))
    img = image.astype(np.float32, copy=False)
    mu = img.mean(axis=axes, keepdims=True)
    sd = img.std(axis=axes, keepdims=True)
    return img, mu, np.where(sd > 0, sd, np.float32(1))


def _parts(z, scales, image):
    """(fine, coarse, labels): the features on the full grid ``{name: map}`` (intensity as
    (image, mean, sd) triples, z-scored by the caller), on coarser grids
    ``{name: (map, factor)}``, and the predicted labels."""
    n, k = z.shape[:2]
    log_margin, labels = _margin_labels(z)
    dims = z.ndim - 2
    # the entropy of the 2-block mean logits: the exponentials on a quarter of the voxels
    zc = _coarse(z.reshape(n * k, *z.shape[2:]), "mean", 2)
    log_ent = _log_entropy(zc.reshape(n, k, *zc.shape[1:]))
    fine = {"log_margin": log_margin}
    crs = {"log_entropy": (log_ent, 2)}
    grids = {2: np.concatenate([_coarse(log_margin, "mean", 2), log_ent])}  # (2 n, *coarse)
    for s in scales:
        f = scale_factor(s)
        if f not in grids:
            prev = max(g for g in grids if g < f)
            grids[f] = _coarse(grids[prev], "mean", f // prev)
        sm = ndimage.gaussian_filter(grids[f], (0,) + (float(s) / f,) * dims,
                                     truncate=_TRUNCATE)
        sm = sm.reshape(2, n, *sm.shape[1:])
        crs[f"log_margin@{float(s):g}"] = (sm[0], f)
        crs[f"log_entropy@{float(s):g}"] = (sm[1], f)
    crs["log_boundary_distance"] = (_coarse_distance(labels), DIST_COARSE)
    if image is not None:
        img, mu, sd = _image_stats(image)
        for c in range(image.shape[1]):
            fine[f"intensity[{c}]"] = (img[:, c], mu[:, c], sd[:, c])
    return fine, crs, labels


def local_features(z, scales, image=None) -> np.ndarray:
    """Local features of logits ``z`` ``(n, K, *spatial)``: float32 ``(F, n, *spatial)`` in
    the order of :func:`feature_names` (``image`` ``(n, C, *spatial)`` adds ``C`` rows)."""
    fine, crs, labels = _parts(z, scales, image)
    names = feature_names(z.shape[1], scales, 0 if image is None else image.shape[1])
    spatial = z.shape[2:]
    rows = []
    for name in names:
        if name.startswith("class["):
            rows.append(labels == int(name[6:-1]))
        elif name.startswith("intensity["):
            img, mu, sd = fine[name]
            rows.append((img - mu) / sd)
        elif name in fine:
            rows.append(fine[name])
        else:
            rows.append(_upsample(crs[name][0], spatial, crs[name][1]))
    return np.stack(rows).astype(np.float32, copy=False)


def log_temperature(z, scales, image, coef, intercept) -> np.ndarray:
    """``intercept + coef . features`` ``(n, *spatial)`` float32, without building the feature
    stack. Smoothing and block means are linear, so each scale smooths one map, the weighted
    sum of the margin and entropy it would smooth; the coarse terms are summed per grid,
    coarsest first, and upsampled once to the full grid; the class terms are one look-up."""
    n, k = z.shape[:2]
    spatial = z.shape[2:]
    dims = len(spatial)
    names = feature_names(k, scales, 0 if image is None else image.shape[1])
    coef = dict(zip(names, np.asarray(coef, np.float32), strict=True))
    log_margin, labels = _margin_labels(z)
    zc = _coarse(z.reshape(n * k, *spatial), "mean", 2)
    log_ent = _log_entropy(zc.reshape(n, k, *zc.shape[1:]))
    m2 = _coarse(log_margin, "mean", 2)
    sums = {2: log_ent * coef["log_entropy"]}
    for s in scales:
        f = scale_factor(s)
        key = f"{float(s):g}"
        mix = m2 * coef[f"log_margin@{key}"]
        mix += log_ent * coef[f"log_entropy@{key}"]
        mix = _coarse(mix, "mean", f // 2)
        sm = ndimage.gaussian_filter(mix, (0,) + (float(s) / f,) * dims, truncate=_TRUNCATE)
        sums[f] = sm if f not in sums else sums[f] + sm
    dist = _coarse_distance(labels) * coef["log_boundary_distance"]
    sums[DIST_COARSE] = dist if DIST_COARSE not in sums else sums[DIST_COARSE] + dist
    acc, prev = None, None
    for f in sorted(sums, reverse=True):
        if acc is not None:  # onto the next finer grid
            acc = _upsample(acc, tuple(-(-s // f) for s in spatial), prev // f) + sums[f]
        else:
            acc = sums[f]
        prev = f
    out = _upsample(acc, spatial, prev)
    table = np.array([intercept] + [intercept + coef[f"class[{c}]"] for c in range(1, k)],
                     np.float32)
    out += np.take(table, labels)
    log_margin *= coef["log_margin"]
    out += log_margin
    if image is not None:  # coef (x - mu) / sd as one multiply-add per channel
        img, mu, sd = _image_stats(image)
        for c in range(image.shape[1]):
            g = coef[f"intensity[{c}]"] / sd[:, c]
            out += img[:, c] * g
            out -= mu[:, c] * g
    return out


def scaled_softmax(z, a, log=False):
    """``softmax(z * a)`` (or its log) over axis 1 for a positive per-voxel factor ``a``
    ``(n, *spatial)``, one pass per class (numpy reduces a short class axis slowly)."""
    out = np.empty_like(z)
    m = _class_max(z)
    tot = np.zeros_like(m)
    tmp = np.empty_like(m)
    for k in range(z.shape[1]):
        uk = out[:, k]
        np.subtract(z[:, k], m, out=uk)
        uk *= a
        np.exp(uk, out=tmp if log else uk)
        tot += tmp if log else uk
    if log:
        np.log(tot, out=tot)
        out -= tot[:, None]
    else:
        np.reciprocal(tot, out=tot)
        out *= tot[:, None]
    return out


# ---------------------------------------------------------------------- objective
def local_objective(z, feats, y, w, alpha, bounds, top_weight=0.0, center=None):
    """``fun(theta) -> (penalised loss, gradient)`` of the local temperature map.

    ``theta = (b, v)``: ``log T_i = clip(b + v . f_i, bounds)`` with ``f_i`` the (already
    standardised) features ``feats`` ``(F, n)`` of voxel ``i``; ``z`` is ``(K, n)``. With
    ``a_i = exp(-log T_i)`` and ``p = softmax(a_i z_i)`` the voxel NLL is
    ``L_i = logsumexp(a_i z_i) - a_i z_iy``, so ``dL_i/d log T_i = -a_i (sum_k p_ik z_ik -
    z_iy)`` (zero where the clip is active).

    ``top_weight`` adds that many times the top-label log-loss, the NLL of the event "the
    predicted class is right" under the confidence ``c_i = max_k p_ik``:
    ``-log c_i`` where right, ``-log(1 - c_i)`` where wrong. Both are proper scoring rules;
    the second one scores exactly what the top-label ECE bins. With ``u = a z`` shifted by its
    maximum, ``log c = -log S``, ``log(1 - c) = log S' - log S`` (``S' `` the sum over the
    classes other than the top one, computed from the second largest so it never
    underflows), and ``d/d log T`` of ``log S`` and ``log S'`` is ``-a (E_p[z] - z_max)``
    and ``-a (E_p'[z] - z_max)`` (``p'``: the softmax over the non-top classes).

    The penalty ``alpha * (|v|^2 + (b - center)^2)`` pulls the map towards a constant, and
    with ``center`` (the global log-temperature) towards the global temperature.
    """
    w = np.asarray(w, np.float64)
    wsum = float(w.sum())
    yi = y.astype(np.intp)
    zy = np.take_along_axis(z, yi[None], axis=0)[0]
    top_weight = float(top_weight)
    if top_weight:
        top = z.argmax(axis=0)
        wrong = top != yi
    lo, hi = bounds
    # the voxel arrays stay in the inputs' precision (float32 in the calibrator: half the
    # memory traffic); the sums over voxels are float64
    dt = np.result_type(z.dtype, feats.dtype)

    def fun(theta):
        theta = np.asarray(theta, np.float64)
        b, v = theta[0], theta[1:]
        f = 0.0
        gb = 0.0
        gv = np.zeros(v.size)
        vv = v.astype(dt)
        for s in range(0, z.shape[1], _CHUNK):
            sl = slice(s, s + _CHUNK)
            zc, fc, wc, zyc = z[:, sl], feats[:, sl], w[sl], zy[sl]
            lt = vv @ fc + dt.type(b)
            free = (lt > lo) & (lt < hi)
            np.clip(lt, lo, hi, out=lt)
            a = np.exp(-lt)
            u = zc * a
            m = u.max(axis=0)
            u -= m
            np.exp(u, out=u)
            tot = u.sum(axis=0)
            log_s = np.log(tot)
            loss = m + log_s - a * zyc
            ez = np.einsum("ki,ki->i", u, zc) / tot  # sum_k p_k z_k
            g = -a * (ez - zyc)
            if top_weight:
                wr = wrong[sl]
                zmax = m / a
                # the classes other than the top one, shifted by the second largest
                v2 = zc * a
                np.put_along_axis(v2, top[sl][None], -np.inf, axis=0)
                m2 = v2.max(axis=0)
                v2 -= m2
                np.exp(v2, out=v2)
                tot2 = v2.sum(axis=0)
                log_s2 = (m2 - m) + np.log(tot2)  # log S' with the same shift as log S
                ez2 = np.einsum("ki,ki->i", v2, zc) / tot2
                d_s = -a * (ez - zmax)
                d_s2 = -a * (ez2 - zmax)
                loss += top_weight * np.where(wr, log_s - log_s2, log_s)
                g += top_weight * np.where(wr, d_s - d_s2, d_s)
            f += float(np.dot(wc, loss.astype(np.float64)))
            g = np.where(free, g, 0).astype(np.float64) * wc
            gb += float(g.sum())
            gv += (fc @ g.astype(dt)).astype(np.float64)
        db = 0.0 if center is None else b - float(center)
        obj = f / wsum + alpha * (float(v @ v) + db * db)
        grad = np.concatenate([[gb / wsum + 2 * alpha * db], gv / wsum + 2 * alpha * v])
        return obj, grad

    return fun


def local_ece(z, feats, y, w, theta, bounds, n_bins):
    """Top-label ECE (``n_bins`` equal-width bins) of the local map ``theta`` over the
    weighted sample (labels are the raw argmax: the map never changes them)."""
    w = np.asarray(w, np.float64)
    b, v = float(theta[0]), np.asarray(theta[1:], feats.dtype)
    lt = np.clip((v @ feats).astype(np.float64) + b, *bounds)
    a = np.exp(-lt)
    zmax = z.max(axis=0)
    conf = np.zeros(z.shape[1])
    for row in z:
        conf += np.exp((row - zmax) * a)
    conf = 1.0 / conf
    correct = (z.argmax(axis=0) == y).astype(np.float64)
    bins = np.minimum((conf * n_bins).astype(np.intp), n_bins - 1)
    gap = np.bincount(bins, weights=w * conf, minlength=n_bins)
    gap -= np.bincount(bins, weights=w * correct, minlength=n_bins)
    return float(np.abs(gap).sum() / w.sum())

