"""Whole scans through the models' preprocessing, scored in the scan's own grid.

The kernel of :func:`uqseg.distributed.score_dataset` for records that are whole scans (its
public home is :mod:`uqseg.distributed`): what ``uqseg predict`` does for one scan, with the
outputs in memory instead of files.
"""

from __future__ import annotations

from typing import Any

import numpy as np

ROLES = ("segmenter", "ood", "quality")
_SEGMENTER_OUTPUTS = ("labels", "volumes", "uncertainty", "uncertainty_map")


def preprocessing_of(roles: dict[str, Any]):
    """The preprocessing description the networks behind ``roles`` carry, or None.

    Looks through the segmenter (a Pipeline's first step, a calibrator's segmenter) and then
    the OOD and quality estimators' segmenters.
    """
    def find(obj, depth=0):
        if obj is None or depth > 4:
            return None
        try:
            prep = getattr(obj, "preprocessing_", None)
        except (AttributeError, ValueError):
            prep = None
        if prep is not None:
            return prep
        steps = getattr(obj, "steps", None)
        if isinstance(steps, list) and steps:
            return find(steps[0][1], depth + 1)
        return find(getattr(obj, "estimator_", None), depth + 1)

    for role in ROLES:
        prep = find(roles.get(role))
        if prep is not None:
            return prep
    return None


def score_scan(roles: dict[str, Any], data: np.ndarray, affine: np.ndarray,
               outputs: tuple[str, ...] = ("labels", "uncertainty", "ood", "quality"),
               preprocessing=None) -> dict[str, Any]:
    """Score one whole scan through the models' preprocessing; outputs in the scan's grid.

    The scan goes through :func:`uqseg.preprocessing.preprocess` (the description the models
    carry, or ``preprocessing``), the estimators run on the model-space images in one pass
    (:func:`uqseg.assess` when they share the segmenter's networks), and the maps are brought
    back with :class:`~uqseg.preprocessing.Inverse`: ``labels`` (argmax of the probabilities
    brought back, background outside the crop), ``uncertainty_map`` (entropy, zero outside),
    ``volumes`` (voxels per class in the scan's grid), ``uncertainty`` (mean entropy over the
    scan's voxels). As in ``uqseg predict``, OOD and quality estimators score only the images
    the description marks as scored (foreground after preprocessing): ``ood`` is the volume's
    score (the mean of its scored images' ``score_samples``; NaN when none is scored),
    ``quality`` the volume's predicted Dice per foreground class (the scored images' predicted
    Dice weighted by their predicted volume; without a segmenter role, their mean);
    ``n_scored`` says how many images were scored.

    Parameters
    ----------
    roles : dict
        ``{"segmenter": ..., "ood": ..., "quality": ...}`` (see :func:`score_dataset`).
    data : array (X, Y, Z)
        The scan's voxels, in its own orientation and spacing.
    affine : array (4, 4)
        Voxel index -> world mm (RAS+).
    outputs : tuple of str
        From ``OUTPUTS``.
    preprocessing : Preprocessing, dict or JSON str, optional
        Default: the description the networks carry (a ValueError when they carry none).
    """
    from uqseg._inference import is_protocol
    from uqseg._predict_volume import _volume_summary, image_class_voxels
    from uqseg.metrics.uncertainty import binary_entropy
    from uqseg.preprocessing import preprocess
    from uqseg.quality_features import is_sigmoid

    prep = preprocessing if preprocessing is not None else preprocessing_of(roles)
    if prep is None:
        raise ValueError("the networks carry no preprocessing description (uqseg inspect "
                         "--set, or uqseg.preprocessing.set_preprocessing); score images "
                         "already in the model's space with score_images")
    if data.ndim == 4 and data.shape[0] == 1:
        data = data[0]  # read_image's channel axis
    X, inv = preprocess(data, affine, prep)
    scored = inv.scored
    want_seg = any(o in _SEGMENTER_OUTPUTS for o in outputs)
    if want_seg and "segmenter" not in roles:
        raise ValueError("labels, volumes and uncertainty need a segmenter role")
    ood = roles.get("ood") if "ood" in outputs else None
    quality = roles.get("quality") if "quality" in outputs else None
    seg = roles.get("segmenter")
    done: dict[str, Any] = {}
    if want_seg and is_protocol(seg):
        from uqseg._assess import assess

        done = assess(X, seg, ood=ood if scored.any() else None,
                      quality=quality if scored.any() else None, maps=("entropy",))
    elif want_seg:
        done = {"proba": seg.predict_proba(X)}
    row: dict[str, Any] = {"n_scored": int(scored.sum())}
    slice_voxels = None
    # sigmoid outputs: independent channels, a mask and a map per channel (channels last)
    sig = is_sigmoid(seg)
    if want_seg:
        from uqseg.uncertainty import entropy

        proba = done["proba"]
        k = proba.shape[1]
        slice_voxels = image_class_voxels(proba, sig) if inv.two_d else None
        if sig:
            h = done["entropy"] if "entropy" in done else binary_entropy(proba)
            labels = (inv.invert(proba, "channels") >= 0.5).astype(np.uint8)
            volumes = labels.reshape(-1, k).sum(axis=0, dtype=np.int64)
        else:
            h = done["entropy"] if "entropy" in done else entropy(proba)
            p_scan = inv.invert(proba, "proba")
            labels = p_scan.argmax(axis=-1).astype(np.uint8 if k <= 256 else np.uint16)
            del p_scan
            volumes = np.bincount(labels.ravel(), minlength=k).astype(np.int64)
        if "labels" in outputs:
            row["labels"] = labels
        if "volumes" in outputs:
            row["volumes"] = volumes
        if "uncertainty" in outputs or "uncertainty_map" in outputs:
            h_scan = inv.invert(h, "channels" if sig else "map")
            if "uncertainty" in outputs:
                row["uncertainty"] = float(h_scan.mean(dtype=np.float64))
            if "uncertainty_map" in outputs:
                row["uncertainty_map"] = h_scan.astype(np.float16)
    if ood is not None:
        s = done["ood_score"][scored] if "ood_score" in done else (
            np.asarray(ood.score_samples(X[scored])) if scored.any() else np.zeros(0))
        row["ood"] = float(np.mean(s)) if len(s) else float("nan")
    if quality is not None:
        q = done["quality"][scored] if "quality" in done else (
            np.asarray(quality.predict(X[scored])) if scored.any() else None)
        if q is None or slice_voxels is None:
            # volume weighting needs the predicted labels per image; else the plain mean
            n_out = quality.n_classes_ - (0 if is_sigmoid(quality.estimator_) else 1)
            row["quality"] = (np.full(n_out, np.nan, np.float32)
                              if q is None else np.nanmean(q, axis=0).astype(np.float32))
        else:
            summary = _volume_summary(quality, "quality", [q], inv, slice_voxels,
                                      first=0 if sig else 1)
            row["quality"] = np.array([np.nan if v is None else v for v in
                                       summary["volume_predicted_quality"]], dtype=np.float32)
    return row
