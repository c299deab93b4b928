"""Labelled images widened with corrupted copies: a spread of segmentation quality."""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage

from uqseg._validation import check_images, check_labels

from ._corrupt import CORRUPTIONS, corrupt
from ._intensity import normalize_intensity

__all__ = ["make_quality_set"]


def _rotated_labels(x_clean: np.ndarray, x_rot: np.ndarray, y: np.ndarray, angle: float):
    """Rotate labels like ``corrupt(kind="rotate")`` rotated the image (sign read off the image)."""
    base = normalize_intensity(x_clean[None])[0].astype(np.float64)
    best, best_err = None, np.inf
    for sign in (1.0, -1.0):
        cand = np.stack([ndimage.rotate(c, sign * angle, axes=(-2, -1), reshape=False, order=1,
                                        mode="constant", cval=float(c.min())) for c in base])
        err = float(np.mean((normalize_intensity(cand[None])[0] - x_rot) ** 2))
        if err < best_err:
            best, best_err = sign, err
    return ndimage.rotate(y, best * angle, axes=(-2, -1), reshape=False, order=0,
                          mode="constant", cval=0)


def make_quality_set(X, y, corruptions=None, severities=(0.25, 0.5, 0.75, 1.0), seed=0,
                     include_clean=True):
    """Widen a labelled split with corrupted copies, for a spread of segmentation quality.

    Every image is repeated once per (corruption, severity) with
    :func:`uqseg.datasets.corrupt`; the labels are repeated alongside (and rotated with the
    image for ``"rotate"``, the one corruption that moves the anatomy).

    Parameters
    ----------
    X : array of shape (N, C, *spatial)
    y : array of int, shape (N, *spatial)
    corruptions : sequence of str, optional
        Kinds from :data:`uqseg.datasets.CORRUPTIONS` (default: all of them).
    severities : sequence of float in (0, 1], default=(0.25, 0.5, 0.75, 1.0)
    seed : int, default=0
        Seed of the corruptions' random parts (each (kind, severity) gets its own stream).
    include_clean : bool, default=True
        Keep the original images (intensity-normalised) first.

    Returns
    -------
    X_wide : ndarray of float32, shape (N * n_copies, C, *spatial)
    y_wide : ndarray of int64, shape (N * n_copies, *spatial)
    info : dict
        ``source`` (index into ``X``), ``corruption`` (``"none"`` for clean copies) and
        ``severity`` (0 for clean copies), one entry per output image (numpy arrays).

    Examples
    --------
    >>> import numpy as np
    >>> from uqseg.datasets import make_quality_set
    >>> X = np.random.default_rng(0).random((2, 1, 16, 16)).astype(np.float32)
    >>> y = np.zeros((2, 16, 16), int)
    >>> Xw, yw, info = make_quality_set(X, y, corruptions=["blur", "noise"], severities=[0.5])
    >>> Xw.shape, [str(c) for c in info["corruption"]]
    ((6, 1, 16, 16), ['none', 'none', 'blur', 'blur', 'noise', 'noise'])
    """
    X = check_images(X, allow_list=False)
    y = check_labels(y, shapes=(X.shape[0], *X.shape[2:]))
    kinds = list(CORRUPTIONS) if corruptions is None else (
        [corruptions] if isinstance(corruptions, str) else list(corruptions))
    bad = [c for c in kinds if c not in CORRUPTIONS]
    if bad:
        raise ValueError(f"corruptions must be taken from {CORRUPTIONS}, got unknown {bad}")
    sevs = [severities] if isinstance(severities, numbers.Real) else list(severities)
    for s in sevs:
        if isinstance(s, bool) or not isinstance(s, numbers.Real) or not 0 < s <= 1:
            raise ValueError(f"severities must be numbers in (0, 1], got {severities!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if not kinds and not include_clean:
        raise ValueError("nothing to return: no corruption and include_clean=False")
    n = X.shape[0]
    xs, ys, src, names, levels = [], [], [], [], []
    if include_clean:
        xs.append(normalize_intensity(X))
        ys.append(y)
        src.append(np.arange(n))
        names += ["none"] * n
        levels.append(np.zeros(n))
    for j, kind in enumerate(kinds):
        for m, s in enumerate(sevs):
            xc = corrupt(X, kind, float(s), seed=int(seed) * 1000 + 37 * j + m)
            yc = y
            if kind == "rotate":
                yc = np.stack([_rotated_labels(X[i], xc[i], y[i], 90.0 * float(s))
                               for i in range(n)])
            xs.append(xc)
            ys.append(yc)
            src.append(np.arange(n))
            names += [kind] * n
            levels.append(np.full(n, float(s)))
    info = {"source": np.concatenate(src), "corruption": np.array(names),
            "severity": np.concatenate(levels)}
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64), info

