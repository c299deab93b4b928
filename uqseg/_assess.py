"""Every answer uqseg gives about a batch of images from one inference pass.

:func:`assess` runs the segmenter once (the fused ensemble graph gives the probabilities, the
uncertainty maps and the feature member's feature maps together) and hands the outputs to the
OOD detector and the quality regressor, instead of each of them running the networks again.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sklearn.utils.validation import check_is_fitted

from uqseg._inference import available_maps, check_maps, is_protocol, run
from uqseg._numeric import one_blas_thread
from uqseg._validation import check_images

__all__ = ["assess"]

DEFAULT_MAPS = ("entropy", "mutual_information")
_SINGLE_MAPS = ("entropy",)  # what one network (no samples to disagree) gives


def assess(X, segmenter, *, ood=None, quality=None, maps=DEFAULT_MAPS) -> dict:
    """Probabilities, uncertainty maps, OOD score and predicted quality in one pass.

    The results equal the separate calls (``segmenter.predict_with_uncertainty`` or
    ``predict_proba``, ``ood.score_samples``, ``quality.predict``) when ``ood`` and
    ``quality`` were fitted around the same networks as ``segmenter`` (the same object, or
    segmenters of the same ONNX files with the same settings, e.g. after ``uqseg.load``).
    Otherwise that estimator runs its own networks, as its own method would, and
    ``passes`` in the result says so.

    Parameters
    ----------
    X : array ``(N, C, *spatial)`` or list of ``(C, *spatial)`` arrays
    segmenter : fitted OnnxSegmenter or EnsembleSegmenter
    ood : fitted OOD detector, optional
        :class:`~uqseg.SpectralOODDetector`, its feature baselines or
        :class:`~uqseg.UncertaintyOODDetector`.
    quality : fitted QualityRegressor, optional
    maps : sequence of str, default=("entropy", "mutual_information")
        Uncertainty maps, as in ``EnsembleSegmenter.predict_with_uncertainty``. A single
        network gives ``"entropy"`` only: with the default, the mutual information is left
        out for it; asked for explicitly, it is an error.

    Returns
    -------
    dict
        ``"proba"`` ``(N, K, *spatial)``, one ``(N, *spatial)`` entry per map, and with
        ``ood``: ``"ood_score"`` ``(N,)`` (``score_samples``) and ``"is_outlier"`` ``(N,)``
        bool (score below ``offset_``); with ``quality``: ``"quality"`` ``(N, K - 1)``.
        ``"passes"``: inference passes run (1 when everything was shared). Lists for list
        input.

    Examples
    --------
    >>> import numpy as np
    >>> import uqseg
    >>> from uqseg import EnsembleSegmenter, SpectralOODDetector, datasets
    >>> X, _ = datasets.load_brain_tissue("val")
    >>> ens = EnsembleSegmenter(datasets.reference_models()[:2]).fit()
    >>> det = SpectralOODDetector(ens).fit(X[:40])
    >>> out = uqseg.assess(X[40:44], ens, ood=det)
    >>> sorted(out)
    ['entropy', 'is_outlier', 'mutual_information', 'ood_score', 'passes', 'proba']
    >>> bool(np.allclose(out["ood_score"], det.score_samples(X[40:44]), atol=1e-5))
    True
    """
    check_is_fitted(segmenter)
    if not is_protocol(segmenter):
        raise TypeError("segmenter must be a fitted OnnxSegmenter or EnsembleSegmenter, got "
                        f"{type(segmenter).__name__}")
    available = available_maps(segmenter)
    if isinstance(maps, tuple) and maps == DEFAULT_MAPS:  # the default: what it gives
        maps = tuple(m for m in DEFAULT_MAPS if m in available)
    kinds = check_maps(maps, available, type(segmenter).__name__)
    for est in (ood, quality):
        if est is not None:
            check_is_fitted(est)
    if isinstance(X, (list, tuple)):
        X = check_images(list(X))
        parts = [assess(x[None], segmenter, ood=ood, quality=quality, maps=maps) for x in X]
        return {k: (max(p[k] for p in parts) if k == "passes" else [p[k][0] for p in parts])
                for k in parts[0]}
    X = check_images(X)

    layers: list[str] = []
    need_kinds = list(kinds)
    plan_ood = _ood_plan(ood, segmenter)
    plan_q = _quality_plan(quality, segmenter)
    for plan in (plan_ood, plan_q):
        if plan is not None:
            layers += [ly for ly in plan[0] if ly not in layers]
            need_kinds += [k for k in plan[1] if k not in need_kinds]

    with one_blas_thread():  # BLAS workers spinning between batches slow the network
        out = run(segmenter, X, layers=layers, maps=need_kinds)
        result = {"proba": out["proba"], **{k: out[k] for k in kinds}}
        passes = 1
        if ood is not None:
            if plan_ood is None:
                score = np.asarray(ood.score_samples(X), dtype=np.float64)
                passes += 1
            else:
                score = np.asarray(ood._score(plan_ood[2](out)), dtype=np.float64)
            result["ood_score"] = score
            result["is_outlier"] = score - ood.offset_ < 0
        if quality is not None:
            if plan_q is None:
                result["quality"] = quality.predict(X)
                passes += 1
            else:
                result["quality"] = plan_q[2](X, out)
    result["passes"] = passes
    return result


def _is_ensemble(est) -> bool:
    return hasattr(est, "members_")


def _feature_net(seg):
    """The network whose features ``seg`` gives (an ensemble's feature member)."""
    return getattr(seg, "feature_network_", seg)


# ---------------------------------------------------------------------- sharing
def _model_key(seg) -> tuple:
    """What makes two OnnxSegmenters compute the same numbers: the model bytes and the
    precision (the execution provider only changes rounding)."""
    from uqseg.persistence import _sha256

    path = Path(os.fspath(seg.model)).resolve()
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = _DIGESTS[key] = _sha256(path)
    return digest, seg.precision


_DIGESTS: dict[tuple, str] = {}


def _same_network(a, b) -> bool:
    if a is b:
        return True
    if not (hasattr(a, "model") and hasattr(b, "model")):
        return False
    try:
        return _model_key(a) == _model_key(b)
    except (OSError, TypeError):
        return False


def _same_segmenter(a, b) -> bool:
    """Whether ``a`` and ``b`` give the same probabilities and maps for any input."""
    if a is b:
        return True
    if type(a) is not type(b):
        return False
    if _is_ensemble(a):
        if a.mc_samples and a.seed is None:
            return False  # unseeded MC dropout: no two passes agree
        same = (len(a.members_) == len(b.members_) and a.tta == b.tta
                and a.mc_samples == b.mc_samples and a.seed == b.seed
                and np.array_equal(a.sample_weights_, b.sample_weights_))
        return same and all(_same_network(m, n) for m, n in zip(a.members_, b.members_,
                                                                  strict=True)) \
            and _same_network(_feature_net(a), _feature_net(b))
    return (a.tta == b.tta and a.overlap == b.overlap and _same_network(a, b))


def _ood_plan(ood, segmenter):
    """``(layers, kinds, descriptors_from_outputs)``, or None when ``ood`` runs on its own."""
    if ood is None:
        return None
    from uqseg.ood import UncertaintyOODDetector

    if isinstance(ood, UncertaintyOODDetector):
        est = ood.estimator_
        if not _same_segmenter(est, segmenter):
            return None
        return [], [] if ood.score == "max_softmax" else [ood.score], \
            lambda out: ood._reduce_outputs(out)[:, None]
    if not hasattr(ood, "_describe"):
        return None
    if not is_protocol(ood.estimator_) or not _same_network(
            _feature_net(ood.estimator_), _feature_net(segmenter)):
        return None
    names = ood._feature_names()
    return names, [], lambda out: ood._describe({n: out[n] for n in names})


def _quality_plan(quality, segmenter):
    if quality is None:
        return None
    est = quality.estimator_
    if not _same_segmenter(est, segmenter):
        return None
    kind = quality.uncertainty_kind_
    layer = getattr(quality, "typicality_layer_", None)
    layers = [layer] if layer else []

    def predict(X, out):
        proba = np.asarray(out["proba"], dtype=np.float32)
        sig = quality._signature(out[layer]) if layer else None
        return quality._predict_outputs(X, proba, np.asarray(out[kind]), sig)

    return layers, [kind], predict
