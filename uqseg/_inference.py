"""The inference layer's shared mechanics and the segmenter protocol.

Every consumer of a segmenter (OOD detectors, quality regressor, :func:`uqseg.assess`, the
CLI and ``uqseg.distributed``) asks for what it needs with one call, :func:`run`, and never
tells segmenters apart. uqseg's segmenters implement the protocol themselves
(``run(X, layers=(), maps=(), *, proba=True)``, ``feature_layers_``, ``MAPS``); other objects
with ``predict_proba`` (and ``predict_members`` for several samples) are adapted here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from uqseg._numeric import categorical_entropy
from uqseg.uncertainty import KINDS, expected_entropy, mutual_information, variance

# batch_size="auto": on a CPU, calls of at most this many input voxels (smaller calls keep the
# activations in cache: docs/benchmarks.md); on a GPU, and as the CPU upper bound, 16 images
AUTO_BATCH_VOXELS = 1 << 17
AUTO_BATCH_MAX = 16


def check_batch_size(value, name: str = "batch_size") -> None:
    """``value`` must be ``"auto"`` or a positive integer."""
    if isinstance(value, str) and value == "auto":
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be 'auto' or a positive integer, got {value!r}")


def resolve_batch_size(batch_size, spatial: Sequence[int], device: str) -> int:
    """Images per inference call: ``batch_size`` itself, or for ``"auto"`` the largest count
    whose input voxels stay within ``AUTO_BATCH_VOXELS`` on a CPU (at least 1, at most
    ``AUTO_BATCH_MAX``) and ``AUTO_BATCH_MAX`` on a GPU.

    Examples
    --------
    >>> resolve_batch_size("auto", (128, 128), "cpu"), resolve_batch_size("auto", (96,) * 3, "cpu")
    (8, 1)
    >>> resolve_batch_size("auto", (128, 128), "cuda"), resolve_batch_size(4, (128, 128), "cpu")
    (16, 4)
    """
    if not (isinstance(batch_size, str) and batch_size == "auto"):
        return int(batch_size)
    if device != "cpu":
        return AUTO_BATCH_MAX
    voxels = int(np.prod([int(v) for v in spatial], dtype=np.int64))
    return int(max(1, min(AUTO_BATCH_MAX, AUTO_BATCH_VOXELS // max(voxels, 1))))


def by_shape(X: list, fn: Callable[[np.ndarray, np.ndarray], dict]) -> dict:
    """Run ``fn(stacked images, their indices)`` once per image size of the list ``X``;
    results (dicts of per-image arrays) go back in the caller's order, as lists."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(X):
        groups.setdefault(x.shape, []).append(i)
    result: dict[str, list] = {}
    for ids in groups.values():
        out = fn(np.stack([X[i] for i in ids]), np.asarray(ids))
        for key, val in out.items():
            slot = result.setdefault(key, [None] * len(X))
            for j, i in enumerate(ids):
                slot[i] = val[j]
    return result


def check_maps(maps, available: Sequence[str], who: str) -> tuple[str, ...]:
    """``maps`` as a tuple of names, each one ``available``."""
    maps = (maps,) if isinstance(maps, str) else tuple(maps)
    for m in maps:
        if m in available:
            continue
        if m in KINDS:
            raise ValueError(f"{m!r} needs several predictions per image (an EnsembleSegmenter "
                             f"with several members, MC dropout or flips); {who} gives "
                             f"{tuple(available)}")
        raise ValueError(f"unknown uncertainty map {m!r}; choose from {KINDS}")
    return maps


# ---------------------------------------------------------------------- the protocol
def is_protocol(est) -> bool:
    """Whether ``est`` implements the segmenter protocol itself."""
    return callable(getattr(est, "run", None)) and hasattr(est, "feature_layers_") \
        and hasattr(est, "MAPS")


def available_maps(est) -> tuple[str, ...]:
    """The uncertainty maps :func:`run` gives for ``est``."""
    if is_protocol(est):
        return tuple(est.MAPS)
    return KINDS if callable(getattr(est, "predict_members", None)) else ("entropy",)


def feature_segmenter(est, who: str):
    """``est`` when it gives feature maps through :func:`run`, else a ``TypeError``."""
    if not is_protocol(est):
        raise TypeError(
            f"{who} needs a segmenter with run(X, layers) and feature_layers_ (an "
            f"OnnxSegmenter or EnsembleSegmenter), got {type(est).__name__}")
    return est


def run(est, X, layers=(), maps=(), *, proba=True) -> dict:
    """What segmenter ``est`` gives for images ``X``, from one inference pass.

    Returns ``"proba"`` (when asked), one entry per uncertainty map and one per feature layer
    (see :meth:`uqseg.OnnxSegmenter.run`); arrays, or lists for list input.
    """
    if is_protocol(est):
        out = est.run(X, layers=layers, maps=maps, proba=proba)
        out.pop("logits", None)
        return out
    layers = (layers,) if isinstance(layers, str) else tuple(layers)
    if layers:
        feature_segmenter(est, "feature maps")
    maps = check_maps(maps, available_maps(est), type(est).__name__)
    if isinstance(X, list):
        return by_shape(X, lambda sub, _: _adapted(est, sub, maps))
    return _adapted(est, X, maps)


def _adapted(est, X: np.ndarray, maps: tuple[str, ...]) -> dict:
    """The protocol's result for a segmenter with only ``predict_proba``/``predict_members``."""
    members = None
    if callable(getattr(est, "predict_members", None)) and any(m != "entropy" for m in maps):
        members = np.asarray(est.predict_members(X), dtype=np.float32)
        p = members.mean(axis=0)
    else:
        p = np.asarray(est.predict_proba(X), dtype=np.float32)
    out = {"proba": p}
    compute = {"entropy": lambda: categorical_entropy(p),
               "mutual_information": lambda: mutual_information(members),
               "expected_entropy": lambda: expected_entropy(members),
               "variance": lambda: variance(members)}
    for m in maps:
        out[m] = np.asarray(compute[m](), dtype=np.float32)
    return out
