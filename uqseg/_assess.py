"""Every answer uqseg gives about a batch of images from one inference pass.

:func:`assess` runs the segmenter once (the fused ensemble graph gives the probabilities, the
uncertainty maps and the first member's feature maps together) and hands the outputs to the
OOD detector and the quality regressor, instead of each of them running the networks again.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from sklearn.utils.validation import check_is_fitted

from uqseg._validation import check_images
from uqseg.uncertainty import KINDS, binary_entropy, entropy

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
    ensemble = _is_ensemble(segmenter)
    if not ensemble and not hasattr(segmenter, "feature_layers_"):
        raise TypeError("segmenter must be a fitted OnnxSegmenter or EnsembleSegmenter, got "
                        f"{type(segmenter).__name__}")
    kinds = _check_maps(maps, ensemble)
    for est in (ood, quality):
        if est is not None:
            check_is_fitted(est)
    if isinstance(X, (list, tuple)):
        X = check_images(list(X))
        parts = [assess(x[None], segmenter, ood=ood, quality=quality, maps=maps) for x in X]
        return {k: (max(p[k] for p in parts) if k == "passes" else [p[k][0] for p in parts])
                for k in parts[0]}
    X = check_images(X)

    feature_net = segmenter.members_[0] if ensemble else segmenter
    layers: list[str] = []
    need_kinds = list(kinds)
    plan_ood = _ood_plan(ood, segmenter, feature_net)
    plan_q = _quality_plan(quality, segmenter)
    for plan in (plan_ood, plan_q):
        if plan is not None:
            layers += [ly for ly in plan[0] if ly not in layers]
            need_kinds += [k for k in plan[1] if k not in need_kinds]

    out = _one_pass(segmenter, X, layers, need_kinds, ensemble)
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


# ---------------------------------------------------------------------- one pass
def _is_ensemble(est) -> bool:
    from uqseg.ensemble import EnsembleSegmenter

    return isinstance(est, EnsembleSegmenter)


def _check_maps(maps, ensemble: bool) -> tuple[str, ...]:

    kinds = (maps,) if isinstance(maps, str) else tuple(maps)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"maps must be taken from {KINDS}, got {bad[0]!r}")
    if not ensemble:
        if kinds == DEFAULT_MAPS:
            return _SINGLE_MAPS
        many = [k for k in kinds if k not in _SINGLE_MAPS]
        if many:
            raise ValueError(f"a single network gives the 'entropy' map only; {many} need "
                             "several samples per voxel (an EnsembleSegmenter of several "
                             "members, MC-dropout passes or test-time flips)")
    return kinds


def _one_pass(segmenter, X, layers, kinds, ensemble) -> dict:
    if ensemble:
        return segmenter.run(X, layers=layers, kinds=kinds)
    out = segmenter.run(X, layers=list(layers))
    proba = segmenter._proba(out.pop("logits"))
    out["proba"] = proba
    if "entropy" in kinds:
        binary = segmenter.activation_ == "sigmoid" or (segmenter.activation_ == "none"
                                                        and proba.shape[1] == 1)
        out["entropy"] = binary_entropy(proba) if binary else entropy(proba)  # binary: per channel
    return out


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
                                                                  strict=True))
    return (a.tta == b.tta and a.overlap == b.overlap and _same_network(a, b))


def _ood_plan(ood, segmenter, feature_net):
    """``(layers, kinds, descriptors_from_outputs)``, or None when ``ood`` runs on its own."""
    if ood is None:
        return None
    from uqseg.ood import UncertaintyOODDetector, _feature_segmenter

    if isinstance(ood, UncertaintyOODDetector):
        est = ood.estimator_
        if not _same_segmenter(est, segmenter):
            return None
        ensemble = _is_ensemble(segmenter)
        if ood.score == "max_softmax":
            if ensemble:
                return None  # the detector averages members unweighted for this score

            def describe(out):
                return ood._reduce(1.0 - out["proba"].max(axis=1), out["proba"])[:, None]
            return [], [], describe
        if not ensemble and ood.score != "entropy":
            return None

        def describe(out):
            return ood._reduce(np.asarray(out[ood.score], dtype=np.float64),
                               np.asarray(out["proba"], dtype=np.float64))[:, None]
        return [], [ood.score], describe
    if not hasattr(ood, "_describe"):
        return None
    try:
        net = _feature_segmenter(ood.estimator_)
    except (TypeError, ValueError):
        return None
    if not _same_network(net, feature_net):
        return None
    names = ood._feature_names()
    return names, [], lambda out: ood._describe({n: out[n] for n in names})


def _quality_plan(quality, segmenter):
    if quality is None:
        return None
    est = quality.estimator_
    if not _same_segmenter(est, segmenter):
        return None
    ensemble = _is_ensemble(segmenter)
    kind = quality.uncertainty_kind_
    layer = getattr(quality, "typicality_layer_", None)
    layers = [layer] if layer else []

    def predict(X, out):
        proba = np.asarray(out["proba"], dtype=np.float32)
        unc = np.asarray(out[kind]) if ensemble else entropy(proba)
        sig = quality._signature(out[layer]) if layer else None
        return quality._predict_outputs(X, proba, unc, sig)

    return layers, [kind] if ensemble else ["entropy"], predict
