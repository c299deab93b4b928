"""Intensity normalisation and resizing shared by every data set and corruption."""

from __future__ import annotations

import numpy as np
from skimage.transform import resize

from uqseg._validation import check_real_dtype

LOW_PERCENTILE = 1.0
HIGH_PERCENTILE = 99.0


def _normalize_one(img: np.ndarray) -> np.ndarray:
    flat = img.ravel()
    # "lower"/"higher" pick actual pixel values, so that a second pass maps 0 -> 0 and
    # 1 -> 1 exactly: the normalisation is idempotent
    lo = np.percentile(flat, LOW_PERCENTILE, method="lower")
    hi = np.percentile(flat, HIGH_PERCENTILE, method="higher")
    if hi <= lo:
        # mostly constant image: fall back to the full range
        lo, hi = flat.min(), flat.max()
    if hi <= lo:
        return np.zeros_like(img, dtype=np.float32)
    lo, hi = float(lo), float(hi)  # float64 arithmetic keeps the mapping of hi exactly 1
    out = (img.astype(np.float64) - lo) / (hi - lo)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def normalize_intensity(img: object) -> np.ndarray:
    """Robustly scale image intensities to ``[0, 1]``.

    Each image (and each channel) is mapped linearly so that its 1st percentile becomes 0 and
    its 99th percentile becomes 1, then clipped to ``[0, 1]``. The same function is applied to
    the in-distribution brain images, the out-of-distribution images and the corrupted images,
    so no image can be told apart by its intensity range alone. Applying it twice changes
    nothing. An image that is constant becomes all zeros.

    Parameters
    ----------
    img : array-like
        A batch ``(N, C, *spatial)`` (4 or 5 dimensions; every ``(n, c)`` image is normalised
        on its own) or a single 2-D ``(H, W)`` or 3-D ``(D, H, W)`` image.

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape with values in ``[0, 1]``.

    Examples
    --------
    >>> import numpy as np
    >>> from uqseg.datasets import normalize_intensity
    >>> x = normalize_intensity(np.arange(100.0).reshape(10, 10))
    >>> float(x.min()), float(x.max())
    (0.0, 1.0)
    """
    arr = np.asarray(img)
    check_real_dtype(arr, "img")
    if arr.ndim not in (2, 3, 4, 5):
        raise ValueError(
            "img must be a batch (N, C, *spatial) with 2-D or 3-D spatial axes or a single "
            f"2-D/3-D image, got {arr.ndim} dims (shape {arr.shape})"
        )
    if arr.size == 0:
        raise ValueError(f"img is empty (shape {arr.shape})")
    if not np.isfinite(arr).all():
        raise ValueError("img contains NaN or infinite values")
    if arr.ndim <= 3:
        return _normalize_one(arr)
    out = np.empty(arr.shape, dtype=np.float32)
    for n in range(arr.shape[0]):
        for c in range(arr.shape[1]):
            out[n, c] = _normalize_one(arr[n, c])
    return out


def resize_image(img: np.ndarray, shape: tuple[int, ...], order: int = 1) -> np.ndarray:
    """Resize one 2-D/3-D image to ``shape`` (anti-aliased when shrinking)."""
    shrinking = any(s < i for s, i in zip(shape, img.shape, strict=True))
    out = resize(
        img.astype(np.float64),
        shape,
        order=order,
        mode="edge",
        anti_aliasing=shrinking,
        preserve_range=True,
    )
    return out.astype(np.float32)
