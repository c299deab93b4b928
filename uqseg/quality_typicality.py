"""Typicality: how far an image's feature signature lies from those of reference images.

:class:`uqseg.QualityRegressor` adds two columns (``typicality=``): the distance of the image's
spectral signature (:func:`uqseg.ood.spectral_signature` of a feature layer pooled to
``TYPICALITY_GRID`` x ``TYPICALITY_GRID``, as :class:`uqseg.SpectralOODDetector` computes it) to
the nearest reference signature, and the mean distance to the ``TYPICALITY_K`` nearest.
"""

from __future__ import annotations

import numpy as np

from uqseg._inference import feature_segmenter, run
from uqseg._validation import check_images
from uqseg.quality_features import chunks

__all__ = ["TYPICALITY_GRID", "TYPICALITY_K", "TYPICALITY_NAMES", "typicality_distances",
           "typicality_layer", "typicality_signatures"]

TYPICALITY_GRID = 16  # pooling grid of the spectral signature (SpectralOODDetector's default)
TYPICALITY_K = 5  # the second typicality column averages the distances to this many neighbours
_SAME = 1e-4  # signature distance below which two images are the same image
TYPICALITY_NAMES = ("typicality_nn1", f"typicality_nn{TYPICALITY_K}")


def _feature_member(est):
    """``est``, checked to give feature maps (an ensemble gives its feature member's, as
    :class:`uqseg.SpectralOODDetector` takes them)."""
    seg = feature_segmenter(est, "typicality=True")
    if not list(seg.feature_layers_):
        raise ValueError("typicality=True needs a model that exposes a feature layer")
    return seg


def _typicality_layer(seg) -> str:
    layers = list(seg.feature_layers_)
    found = (getattr(seg, "layer_roles_", None) or {}).get("decoder_last")  # by structure
    return "decoder_last" if "decoder_last" in layers else found if found in layers \
        else layers[0]


def typicality_layer(est) -> str:
    """The feature layer whose signature typicality reads: ``decoder_last`` (by name, else by
    structure), else the segmenter's preferred layer.

    Parameters
    ----------
    est : fitted segmenter of the protocol (``run(X, layers)``, ``feature_layers_``)
        An ensemble gives its feature member's layers.

    Returns
    -------
    str

    Raises
    ------
    TypeError or ValueError
        When ``est`` gives no feature maps.
    """
    return _typicality_layer(_feature_member(est))


def resolve_typicality(typicality, est, reads_maps: bool) -> bool:
    """``typicality`` of :class:`uqseg.QualityRegressor` resolved: ``"auto"`` is on where it can
    apply, ``True`` raises where it cannot (a regressor reading maps, no feature layer)."""
    auto = isinstance(typicality, str)  # "auto", checked by the estimator
    if not auto and not typicality:
        return False
    if reads_maps:
        if auto:
            return False
        raise ValueError("typicality=True adds features: it needs the feature regressor "
                         "(regressor_input 'features' or 'auto', not an ONNX path)")
    try:
        _feature_member(est)
    except (TypeError, ValueError):
        if auto:
            return False
        raise
    return True


def signature(feature_maps) -> np.ndarray:
    """Spectral signatures ``(N, L)`` of feature maps ``(N, L, *spatial)``."""
    from uqseg.ood import spectral_signature

    return spectral_signature(np.asarray(feature_maps), TYPICALITY_GRID)


def typicality_signatures(est, X, layer: str | None = None) -> np.ndarray:
    """Signatures of images ``X`` from the segmenter's feature network alone (one pass).

    Parameters
    ----------
    est : fitted segmenter of the protocol
    X : array of shape (N, C, *spatial) or list of (C, *spatial) arrays
    layer : str, optional
        Default: :func:`typicality_layer` of ``est``.

    Returns
    -------
    ndarray of shape (N, L): reference signatures for :func:`typicality_distances`.
    """
    layer = typicality_layer(est) if layer is None else layer
    X = check_images(X)
    return np.concatenate([signature(run(est, xb, layers=[layer], proba=False)[layer])
                           for _, xb in chunks(X)])


def typicality_distances(sig: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Distances of signatures ``(n, L)`` to reference signatures ``(m, L)``.

    Returns ``(n, 2)``: Euclidean distance to the nearest reference signature and the mean
    distance to the ``TYPICALITY_K`` nearest. A reference signature equal to the query up to the
    float noise of batched inference (distance below ``1e-4``; signatures have unit norm and
    distinct images lie orders of magnitude further apart) is the image itself and is left out,
    so reference images get leave-one-out distances at fit and at predict time alike.

    Examples
    --------
    >>> import numpy as np
    >>> ref = np.eye(3)
    >>> typicality_distances(np.array([[1.0, 0.0, 0.0]]), ref).round(3)   # itself left out
    array([[1.414, 1.414]])
    """
    sig = np.asarray(sig, dtype=np.float64)
    ref = np.asarray(reference, dtype=np.float64)
    d2 = (np.einsum("ij,ij->i", sig, sig)[:, None] - 2.0 * sig @ ref.T
          + np.einsum("ij,ij->i", ref, ref)[None, :])
    d = np.sqrt(np.maximum(d2, 0.0))
    d[d < _SAME] = np.inf
    k = min(TYPICALITY_K, ref.shape[0])
    d.sort(axis=1)
    near = d[:, :k]
    finite = np.isfinite(near)
    nn1 = np.where(finite[:, 0], near[:, 0], 0.0)
    cnt = finite.sum(axis=1)
    mean_k = np.divide(np.where(finite, near, 0.0).sum(axis=1), cnt, out=np.zeros(len(sig)),
                       where=cnt > 0)
    return np.column_stack([nn1, mean_k])
