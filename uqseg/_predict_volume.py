"""``uqseg predict`` for models that carry a preprocessing description: whole scans in and out.

The scan goes through :func:`uqseg.preprocessing.preprocess` (one interpolation into the
model's space), the ensemble runs on the model-space batch chunk by chunk, and its outputs
are kept in disk-backed model-space arrays in the run's temporary folder. Each map is then
inverted into the scan's grid slab by slab (:meth:`Inverse.invert_volume`) and streamed to
its NIfTI file, so memory holds the scan, the (small) model-space input and one slab.

OOD detectors and quality regressors score only the slices the description marks as scored
(foreground after preprocessing; see ``crop.min_area``); the others are reported. A conformal
risk controller's masks cover every slice, like the segmentation, and are brought back
nearest-neighbour (empty outside the crop).
"""

from __future__ import annotations

import json
import sys

import numpy as np

from uqseg._predict import (
    MAP_NAMES,
    SLAB_VOXELS,
    UsageError,
    _risk_masks,
    _risk_summary,
    _slab_ranges,
    assess_batch,
    mask_key,
)
from uqseg.quality_features import is_sigmoid


def _scan(source, vol, spacing):
    """The scan's 3-D array and affine, or a one-line error naming the file."""
    data = vol.data
    if data.ndim == 4:
        raise ValueError(f"input {str(source)!r} is a 4-D series (shape {data.shape}); the "
                         "models' preprocessing takes one 3-D volume per input: split it first")
    if data.ndim != 3:
        raise ValueError(f"input {str(source)!r} has shape {data.shape}; the models' "
                         "preprocessing takes a 3-D volume (or pass --no-preprocess)")
    affine = vol.affine
    if vol.kind == "numpy" and not vol.meta.get("affine_given", True):
        if spacing is None:
            raise UsageError(f"input {str(source)!r} is a NumPy array without an affine: give "
                             "its voxel size with --spacing SX SY SZ (mm; axes taken as R, A, "
                             "S) or store a 4x4 'affine' in an .npz")
        affine = np.diag([*map(float, spacing), 1.0])
    return data, affine


def image_class_voxels(proba, sig: bool) -> np.ndarray:
    """Predicted voxels per class of each image ``(N, K)``: argmax labels, or the masks
    ``p >= 0.5`` of independent (sigmoid) channels."""
    n, k = proba.shape[:2]
    if sig:
        return (proba >= 0.5).reshape(n, k, -1).sum(axis=2)
    return np.stack([np.bincount(p.argmax(0).ravel(), minlength=k) for p in proba])


def _scratch(work, name, shape, dtype):
    return np.lib.format.open_memmap(work / f"{name}.npy", mode="w+", dtype=dtype,
                                     shape=tuple(shape))


def predict_preprocessed(plan, ens, prep, source, work, *, spacing=None, progress=True):
    """Segment one scan through ``prep``; returns ``(staged, final)`` path pairs."""
    from tqdm.auto import tqdm

    from uqseg._slabwriter import SlabWriter
    from uqseg.io import read_image
    from uqseg.preprocessing import preprocess

    vol = read_image(source)
    data, affine = _scan(source, vol, spacing)
    try:
        X, inv = preprocess(data, affine, prep)
    except ValueError as exc:
        raise ValueError(f"input {str(source)!r}: {exc}") from exc
    finals = plan.outputs(source)
    k_cls = ens.n_classes_
    kinds = ("entropy", "mutual_information") if ens.n_samples_ > 1 else ("entropy",)
    # sigmoid outputs: independent channels, a mask and maps per channel, nothing outside
    sig = is_sigmoid(ens)
    chan = (k_cls,) if sig else ()
    # model-space outputs, disk-backed: (K, *model_shape) and ([K,] *model_shape) per map
    proba_m = _scratch(work, "proba_model", (k_cls, *inv.model_shape), np.float32)
    maps_m = {k: _scratch(work, f"{MAP_NAMES[k]}_model", (*chan, *inv.model_shape), np.float32)
              for k in kinds}
    n_img = X.shape[0]
    per = max(1, SLAB_VOXELS // max(1, int(np.prod(X.shape[2:])))) if inv.two_d else 1
    slice_voxels = np.zeros((n_img, k_cls), dtype=np.int64)  # predicted, per model image
    scores = {d.name: [] for d, _, _ in plan.estimators}
    risks = [(d, est) for d, est, kind in plan.estimators if kind == "risk"]
    masks_m = {d.name: _scratch(work, f"mask_{i}_model", (len(est.classes_), *inv.model_shape),
                                np.uint8) for i, (d, est) in enumerate(risks)}
    for s0, s1 in tqdm(_slab_ranges(n_img, per), desc=f"segment {source.name}", unit="chunk",
                       disable=not progress or n_img <= per, file=sys.stderr, leave=False):
        xb = X[s0:s1]
        scored = inv.scored[s0:s1]
        # one pass for the maps and the estimators (scores of unscored slices are dropped)
        proba, maps, shared = assess_batch(ens, xb, kinds, plan.estimators if scored.any()
                                           else [])
        slice_voxels[s0:s1] = image_class_voxels(proba, sig)
        if inv.two_d:
            proba_m[:, s0:s1] = np.moveaxis(proba, 0, 1)
            for k in kinds:
                if sig:
                    maps_m[k][:, s0:s1] = np.moveaxis(maps[k], 0, 1)
                else:
                    maps_m[k][s0:s1] = maps[k]
        else:
            proba_m[:] = proba[0]
            for k in kinds:
                maps_m[k][:] = maps[k][0]
        for d, est in risks:  # masks everywhere, as the segmentation
            mask = _risk_masks(est, xb, proba).astype(np.uint8)
            if inv.two_d:
                masks_m[d.name][:, s0:s1] = np.moveaxis(mask, 0, 1)
            else:
                masks_m[d.name][:] = mask[0]
        if scored.any():
            for d, est, kind in plan.estimators:
                if kind == "risk":
                    continue
                if d.name in shared:
                    scores[d.name].append(shared[d.name][scored])
                    continue
                fn = est.score_samples if kind == "ood" else est.predict
                scores[d.name].append(np.asarray(fn(xb[scored])))
        del proba, maps
    keys = ["seg", "proba", *(MAP_NAMES[k] for k in kinds)]
    dtypes = {"seg": np.uint8, "proba": np.float32, "entropy": np.float32, "mi": np.float32}
    channels = {"proba": k_cls}
    for d, est in risks:
        keys.append(mask_key(d))
        dtypes[mask_key(d)] = np.uint8
        channels[mask_key(d)] = len(est.classes_)
    shape = inv.shape
    out_affine = np.asarray(affine, dtype=np.float64)
    if sig:
        channels.update({k: k_cls for k in ("seg", *(MAP_NAMES[k] for k in kinds))})
    writers = {k: SlabWriter(work / f"{k.replace(':', '_')}.nii.gz", shape, dtypes[k],
                             out_affine, axis=2, n_classes=channels.get(k),
                             scratch=work / f"{k.replace(':', '_')}.raw") for k in keys}
    mask_voxels = {d.name: np.zeros(len(est.classes_), dtype=np.int64) for d, est in risks}
    class_voxels = np.zeros(k_cls, dtype=np.int64)
    entropy_sum = 0.0
    per_in = max(1, SLAB_VOXELS // max(1, shape[0] * shape[1]))
    try:
        for z0, z1 in _slab_ranges(shape[2], per_in):
            p = inv.invert_volume(proba_m, "channels" if sig else "proba", start=z0, stop=z1,
                                  axis=2)
            # labels = argmax (masks: p >= 0.5) of the probabilities brought back: seg and
            # proba agree voxel by voxel (nearest-neighbour labels would step at pixel edges)
            if sig:
                seg = (p >= 0.5).astype(np.uint8)
                class_voxels += seg.reshape(-1, k_cls).sum(axis=0, dtype=np.int64)
            else:
                seg = p.argmax(axis=-1).astype(np.uint8)
                class_voxels += np.bincount(seg.ravel(), minlength=k_cls)
            writers["seg"].write(z0, z1, seg)
            writers["proba"].write(z0, z1, p)
            del p, seg
            for k in kinds:
                m = inv.invert_volume(maps_m[k], "channels" if sig else "map", start=z0,
                                      stop=z1, axis=2)
                if k == "entropy":
                    entropy_sum += float(m.sum(dtype=np.float64))
                writers[MAP_NAMES[k]].write(z0, z1, m)
            for d, _ in risks:  # nearest neighbour: masks stay masks; outside the crop: empty
                m = np.stack([inv.invert_volume(c, "labels", start=z0, stop=z1, axis=2)
                              for c in masks_m[d.name]], axis=-1).astype(np.uint8)
                mask_voxels[d.name] += m.reshape(-1, m.shape[-1]).sum(axis=0, dtype=np.int64)
                writers[mask_key(d)].write(z0, z1, m)
        staged = [(writers[k].finish(), finals[k]) for k in keys]
    finally:
        for w in writers.values():
            w.close()
    del proba_m, maps_m, masks_m
    # mean entropy over voxels (and, for sigmoid outputs, channels)
    n_vox = int(np.prod(shape)) * (k_cls if sig else 1)
    not_scored = np.flatnonzero(~inv.scored)
    report = {
        "input": str(source), "input_kind": vol.kind, "models": [str(m) for m in plan.models],
        "n_samples": int(ens.n_samples_), "layout": "preprocessed", "axis": None,
        "activation": getattr(ens, "activation_", "softmax"),
        "normalized": True, "shape": list(vol.data.shape),
        "class_voxels": class_voxels.tolist(), "mean_entropy": entropy_sum / max(n_vox, 1),
        "outputs": [str(final) for _, final in staged],
        "preprocessing": prep.to_dict(),
        "model_space": {
            "shape": list(inv.model_shape), "orientation": inv.orientation,
            "affine": np.round(inv.model_affine, 6).tolist(),
            "crop_threshold": inv.threshold,
        },
        "slices": {
            "n": int(n_img), "n_scored": int(inv.scored.sum()),
            "scored": np.flatnonzero(inv.scored).tolist(), "not_scored": not_scored.tolist(),
            "foreground_fraction": np.round(inv.foreground, 4).tolist(),
            "why_not_scored": _why_not_scored(prep),
        },
    }
    if plan.estimators:
        report["estimators"] = {
            d.name: _risk_summary(est, mask_voxels[d.name], finals[mask_key(d)])
            if kind == "risk" else _volume_summary(est, kind, scores[d.name], inv, slice_voxels,
                                                   first=0 if sig else 1)
            for d, est, kind in plan.estimators}
    (work / "scores.json").write_text(json.dumps(report, indent=2))
    staged.append((work / "scores.json", finals["scores"]))
    return staged


def _why_not_scored(prep) -> str:
    if prep.crop is None:
        return "every image is scored (no crop in the preprocessing)"
    return (f"foreground (above the {prep.crop['method']} threshold) under "
            f"{prep.crop['min_area']:g} x the largest slice's, or none: unlike the training "
            "images, so OOD and quality estimators do not score them")


def _volume_summary(est, kind, chunks, inv, slice_voxels, first=1) -> dict:
    """Per-slice scores of the scored slices plus per-volume figures; ``slice_voxels`` columns
    ``first:`` are the scored classes (1: softmax, background first; 0: sigmoid channels)."""
    base = {"type": type(est).__name__, "n_scored": int(inv.scored.sum())}
    if not chunks:
        return {**base, "note": "no slice has foreground to score"}
    values = np.concatenate(chunks)
    if kind == "ood":
        margin = values - est.offset_
        mean = float(values.mean())
        return {**base, "score_samples": values.tolist(), "inlier": (margin >= 0).tolist(),
                "fraction_outlier": float(np.mean(margin < 0)),
                "min_score": float(values.min()), "offset": float(est.offset_),
                # per volume: the mean score of its scored slices against the same offset
                "volume_score": mean, "volume_inlier": bool(mean >= est.offset_)}
    values = np.asarray(values, dtype=np.float64)
    cols = slice(first, first + values.shape[1])
    weights = slice_voxels[inv.scored][:, cols].astype(np.float64)
    fg_all = slice_voxels[:, cols].sum(axis=0).astype(np.float64)
    ok = np.isfinite(values) & (weights > 0)
    w = np.where(ok, weights, 0.0)
    # a volume's Dice = 2 TP / (|pred| + |truth|); with |truth| ~ |pred| per slice,
    # TP_s ~ d_s |pred_s|: the slice Dice weighted by predicted volume
    vol_q = np.where(w.sum(0) > 0, (np.where(ok, values, 0.0) * w).sum(0)
                     / np.maximum(w.sum(0), 1e-12), np.nan)
    return {**base, "target": getattr(est, "target", "dice"),
            "predicted_quality": values.tolist(),
            "mean_predicted_quality": np.nanmean(values, axis=0).tolist(),
            "volume_predicted_quality": [None if np.isnan(v) else float(v) for v in vol_q],
            # share of each class's predicted volume that lies in scored slices
            "volume_coverage": (weights.sum(0) / np.maximum(fg_all, 1)).tolist()}
