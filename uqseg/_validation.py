"""Input checks shared by every public estimator.

Inputs are validated once at the public edge; internals trust what comes back.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ImageBatch = np.ndarray | list[np.ndarray]


def check_real_dtype(arr: np.ndarray, name: str) -> None:
    """TypeError unless ``arr`` holds real numbers (float, integer or bool)."""
    if arr.dtype == object or not (
        np.issubdtype(arr.dtype, np.floating)
        or np.issubdtype(arr.dtype, np.integer)
        or arr.dtype == np.bool_
    ):
        raise TypeError(f"{name} must hold real numbers, got dtype {arr.dtype}")


def check_mask(mask, shape, *, name: str = "mask", hint: str = "") -> np.ndarray:
    """A boolean array of exactly ``shape``; ``hint`` follows the shape in the message."""
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {m.dtype}")
    if m.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}{hint}, got {m.shape}")
    return m


def _as_float_image(x: object, name: str) -> np.ndarray:
    arr = np.asarray(x)
    check_real_dtype(arr, name)
    if arr.dtype != np.float32:
        arr = arr.astype(np.float32)
    if arr.size and not np.isfinite(arr).all():
        bad = int(np.size(arr) - np.isfinite(arr).sum())
        raise ValueError(f"{name} contains {bad} NaN or infinite values")
    return arr


def check_images(
    X: object,
    *,
    name: str = "X",
    spatial_dims: int | None = None,
    n_channels: int | None = None,
    allow_list: bool = True,
) -> ImageBatch:
    """Validate an image batch.

    Returns a float32 array ``(N, C, *spatial)`` or, for a list input, a list of float32
    ``(C, *spatial)`` arrays. Raises ``ValueError``/``TypeError`` naming the problem.
    """
    if isinstance(X, (list, tuple)) and allow_list:
        if len(X) == 0:
            raise ValueError(f"{name} is an empty list: at least one image is required")
        items = [_as_float_image(x, f"{name}[{i}]") for i, x in enumerate(X)]
        for i, item in enumerate(items):
            _check_one(item, f"{name}[{i}]", spatial_dims, n_channels, batched=False)
        shapes = {item.shape for item in items}
        if len(shapes) == 1:
            # same-size images: one batch is faster and behaves identically
            return list(items)
        return items
    arr = _as_float_image(X, name)
    _check_one(arr, name, spatial_dims, n_channels, batched=True)
    if arr.shape[0] == 0:
        raise ValueError(
            f"{name} is an empty batch (shape {arr.shape}): at least one image is required"
        )
    return arr


def _check_one(arr, name, spatial_dims, n_channels, batched):
    lead = 2 if batched else 1
    layout = "(N, C, *spatial)" if batched else "(C, *spatial)"
    if spatial_dims is None:
        if arr.ndim not in (lead + 2, lead + 3):
            raise ValueError(
                f"{name} must have shape {layout} with 2-D or 3-D spatial axes "
                f"({lead + 2} or {lead + 3} dims), got {arr.ndim} dims (shape {arr.shape})"
            )
    elif arr.ndim != lead + spatial_dims:
        raise ValueError(
            f"{name} must have shape {layout} with {spatial_dims} spatial axes "
            f"({lead + spatial_dims} dims), got {arr.ndim} dims (shape {arr.shape})"
        )
    ch = arr.shape[lead - 1]
    if n_channels is not None and ch != n_channels:
        raise ValueError(
            f"{name} has {ch} channels (axis {lead - 1}) but the model expects {n_channels}"
        )
    if any(s == 0 for s in arr.shape[lead:]):
        raise ValueError(f"{name} has an empty spatial axis (shape {arr.shape})")


def n_images(X: ImageBatch) -> int:
    return len(X) if isinstance(X, list) else int(X.shape[0])


def check_labels(
    y: object,
    *,
    n_classes: int | None = None,
    shapes: Sequence[tuple[int, ...]] | tuple[int, ...] | None = None,
    ignore_index: int | None = None,
    name: str = "y",
) -> np.ndarray | list[np.ndarray]:
    """Validate integer labels ``(N, *spatial)`` (or a list of ``(*spatial)`` arrays).

    ``shapes`` is either the expected full array shape or one spatial shape per image.
    """
    if isinstance(y, (list, tuple)):
        out = [
            check_labels(
                v[None], n_classes=n_classes, ignore_index=ignore_index, name=f"{name}[{i}]"
            )[0]
            for i, v in enumerate(y)
        ]
        if shapes is not None and not isinstance(shapes, tuple):
            for i, (lab, shp) in enumerate(zip(out, shapes, strict=False)):
                if lab.shape != tuple(shp):
                    raise ValueError(f"{name}[{i}] has shape {lab.shape}, expected {tuple(shp)}")
            if len(out) != len(shapes):
                raise ValueError(f"{name} has {len(out)} label maps for {len(shapes)} images")
        return out
    arr = np.asarray(y)
    if not (np.issubdtype(arr.dtype, np.integer) or arr.dtype == np.bool_):
        if (
            np.issubdtype(arr.dtype, np.floating)
            and arr.size
            and np.all(np.isfinite(arr))
            and np.all(arr == np.round(arr))
        ):
            arr = arr.astype(np.int64)
        else:
            raise TypeError(f"{name} must hold integer class labels, got dtype {arr.dtype}")
    if arr.ndim < 2:
        raise ValueError(f"{name} must have shape (N, *spatial), got shape {arr.shape}")
    if isinstance(shapes, tuple) and arr.shape != shapes:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shapes}")
    if shapes is not None and not isinstance(shapes, tuple):
        for i, shp in enumerate(shapes):
            if arr.shape[1:] != tuple(shp):
                raise ValueError(f"{name}[{i}] has shape {arr.shape[1:]}, expected {tuple(shp)}")
        if arr.shape[0] != len(shapes):
            raise ValueError(f"{name} has {arr.shape[0]} label maps for {len(shapes)} images")
    if n_classes is not None and arr.size:
        valid = arr if ignore_index is None else arr[arr != ignore_index]
        if valid.size:
            lo, hi = int(valid.min()), int(valid.max())
            if lo < 0 or hi >= n_classes:
                raise ValueError(
                    f"{name} holds labels in [{lo}, {hi}] but the model has {n_classes} classes "
                    f"(valid labels 0..{n_classes - 1}"
                    + (f", ignore_index={ignore_index})" if ignore_index is not None else ")")
                )
    return arr


def check_scores(S: object, *, name: str, kind: str) -> np.ndarray:
    """Validate logits (``kind='logits'``) or probabilities (``kind='proba'``), (N, K, *spatial)."""
    arr = np.asarray(S)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(
            f"{name} must be floating point {kind} of shape (N, K, *spatial), got dtype {arr.dtype}"
        )
    if arr.ndim < 3:
        raise ValueError(f"{name} must have shape (N, K, *spatial), got shape {arr.shape}")
    if arr.shape[1] < 2:
        raise ValueError(f"{name} must have at least 2 classes on axis 1, got {arr.shape[1]}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    if kind == "proba":
        if arr.min() < -1e-6 or arr.max() > 1 + 1e-6:
            raise ValueError(
                f"{name} must hold probabilities in [0, 1]; got values in "
                f"[{arr.min():.3g}, {arr.max():.3g}] (are these logits?)"
            )
        sums = arr.sum(axis=1)
        if np.abs(sums - 1).max() > 1e-3:
            raise ValueError(
                f"{name} must sum to 1 over the class axis (axis 1); max deviation "
                f"{np.abs(sums - 1).max():.3g} (are these logits?)"
            )
    return arr
