"""Image corruptions with a severity knob: acquisition faults and image-quality degradations."""

from __future__ import annotations

import numbers

import numpy as np
from scipy import ndimage as ndi

from .._validation import check_images
from ._intensity import normalize_intensity, resize_image

CORRUPTIONS = (
    "noise",
    "ghosting",
    "bias",
    "blur",
    "gamma",
    "contrast",
    "downsample",
    "rotate",
)


def _noise(img, s, rng):
    # Rician: magnitude of the complex signal with Gaussian noise on both channels
    sigma = 0.3 * s
    n1, n2 = rng.normal(0.0, sigma, size=(2, *img.shape))
    return np.sqrt((img + n1) ** 2 + n2**2)


def _ghosting(img, s, rng):
    # periodic motion during acquisition = periodic phase errors along the phase-encoding
    # axis (rows) of k-space; the image shows shifted copies (ghosts) of the anatomy
    axes = tuple(range(img.ndim))
    k = np.fft.fftn(img, axes=axes)
    n = img.shape[-2]
    period = rng.uniform(3.0, 6.0)
    phase0 = rng.uniform(0.0, 2 * np.pi)
    theta = s * (np.pi / 2) * np.sin(2 * np.pi * np.arange(n) / period + phase0)
    shape = [1] * img.ndim
    shape[-2] = n
    k = k * np.exp(1j * theta).reshape(shape)
    return np.abs(np.fft.ifftn(k, axes=axes))


def _unit_grid(shape):
    return np.meshgrid(*[np.linspace(-1.0, 1.0, n) for n in shape], indexing="ij")


def _bias(img, s, rng):
    # smooth multiplicative field: exp of a random quadratic polynomial, up to e^{+-1.5}
    grid = _unit_grid(img.shape)
    terms = [*grid, *(g * g for g in grid)]
    terms += [grid[i] * grid[j] for i in range(len(grid)) for j in range(i + 1, len(grid))]
    field = sum(rng.uniform(-1.0, 1.0) * t for t in terms)
    field = field / max(np.abs(field).max(), 1e-12)
    return img * np.exp(1.5 * s * field)


def _blur(img, s, rng):
    return ndi.gaussian_filter(img, sigma=4.0 * s, mode="nearest")


def _gamma(img, s, rng):
    # darker or brighter mid-tones: the direction comes from the seed
    gamma = 4.0 ** (s if rng.random() < 0.5 else -s)
    return np.clip(img, 0.0, None) ** gamma


def _contrast(img, s, rng):
    # move towards an inverted (T2-like) tissue contrast inside the foreground
    # foreground from a smoothed image, so isolated background noise is not inverted
    fg = ndi.gaussian_filter(img, 1.5) > 0.15
    out = img.copy()
    out[fg] = (1.0 - s) * img[fg] + s * (1.0 - img[fg])
    return out


def _downsample(img, s, rng):
    factor = 1.0 + 3.0 * s  # up to 4x coarser, as a low-resolution acquisition
    low = tuple(max(2, int(round(n / factor))) for n in img.shape)
    if low == img.shape:
        return img
    small = resize_image(img, low, order=1)
    return resize_image(small, img.shape, order=1)


def _rotate(img, s, rng):
    angle = 90.0 * s * (1.0 if rng.random() < 0.5 else -1.0)
    return ndi.rotate(
        img, angle, axes=(-2, -1), reshape=False, order=1, mode="constant", cval=float(img.min())
    )


_FUNCS = {
    "noise": _noise,
    "ghosting": _ghosting,
    "bias": _bias,
    "blur": _blur,
    "gamma": _gamma,
    "contrast": _contrast,
    "downsample": _downsample,
    "rotate": _rotate,
}


def corrupt(X: object, kind: str, severity: float, *, seed: int = 0) -> np.ndarray:
    """Apply an image corruption of a given severity.

    The input is normalised with :func:`normalize_intensity`, corrupted, and normalised again,
    so the output is always comparable with the clean data. ``severity=0`` returns the
    normalised input unchanged; larger severities move the image further from it.

    ========== =========================================================================
    kind       what happens at ``severity=1``
    ========== =========================================================================
    noise      Rician noise with sigma 0.3 of the intensity range
    ghosting   periodic k-space phase errors along the rows (motion ghosts), up to pi/2
    bias       smooth multiplicative quadratic bias field, gain from e^-1.5 to e^+1.5
    blur       Gaussian blur, sigma 4 pixels
    gamma      gamma 4 or 1/4 (direction chosen by the seed)
    contrast   foreground intensities inverted (T2-like contrast); halfway at 0.5
    downsample resolution divided by 4 (resample down and back up)
    rotate     in-plane rotation (last two axes) by 90 degrees, sign chosen by the seed
    ========== =========================================================================

    Parameters
    ----------
    X : array-like of shape (N, C, H, W) or (N, C, D, H, W)
        Image batch.
    kind : str
        One of :data:`CORRUPTIONS`.
    severity : float
        In ``[0, 1]``.
    seed : int, default 0
        Seed of the random parts (noise, fields, directions); image ``n`` uses its own
        stream derived from ``(seed, n)``.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape, values in ``[0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from uqseg.datasets import corrupt
    >>> X = np.random.default_rng(0).random((2, 1, 32, 32)).astype(np.float32)
    >>> corrupt(X, "blur", 0.5).shape
    (2, 1, 32, 32)
    """
    if not isinstance(kind, str) or kind not in _FUNCS:
        raise ValueError(f"kind must be one of {CORRUPTIONS}, got {kind!r}")
    if isinstance(severity, bool) or not isinstance(severity, numbers.Real):
        raise TypeError(f"severity must be a real number in [0, 1], got {severity!r}")
    if not 0.0 <= float(severity) <= 1.0:
        raise ValueError(f"severity must be in [0, 1], got {severity!r}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise TypeError(f"seed must be a non-negative int, got {seed!r}")
    arr = check_images(X, allow_list=False)
    base = normalize_intensity(arr)
    if severity == 0:
        return base
    func = _FUNCS[kind]
    out = np.empty_like(base)
    for n in range(base.shape[0]):
        rng = np.random.default_rng([int(seed), n])
        for c in range(base.shape[1]):
            out[n, c] = func(base[n, c].astype(np.float64), float(severity), rng)
    return normalize_intensity(out)
