"""``uqseg predict``: check everything, stream each volume slab by slab, publish at the end.

Guarantees (see docs/cli.md): every model, estimator folder, input and the output folder are
checked before anything is computed; outputs are written under temporary names inside the
output folder and renamed into place only after every input succeeded, so a failure (or
Ctrl-C) leaves the folder as it was; existing outputs are replaced only with ``overwrite``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

OUTPUT_SUFFIXES = {"seg": "_seg.nii.gz", "proba": "_proba.nii.gz", "entropy": "_entropy.nii.gz",
                   "mi": "_mi.nii.gz", "scores": "_scores.json"}
MAP_NAMES = {"entropy": "entropy", "mutual_information": "mi"}
SLAB_VOXELS = 1 << 20  # voxels per slab fed to the ensemble (4 slices of 512 x 512)


class UsageError(Exception):
    """A problem with the arguments (exit code 2)."""


@dataclass
class Plan:
    """What a ``predict`` run will read and write, all checked."""

    models: list[str]
    inputs: list[Path]
    out: Path
    estimators: list[tuple[Path, object, str]] = field(default_factory=list)
    overwrite: bool = False

    def outputs(self, source: Path) -> dict[str, Path]:
        from uqseg.io import image_stem

        stem = image_stem(source)
        outs = {k: self.out / f"{stem}{s}" for k, s in OUTPUT_SUFFIXES.items()}
        for d, _, kind in self.estimators:
            if kind == "risk":
                outs[mask_key(d)] = self.out / f"{stem}_{d.name}_mask.nii.gz"
        return outs


def mask_key(folder: Path) -> str:
    return f"mask:{folder.name}"


def estimator_kind(est) -> str | None:
    """``"ood"``, ``"quality"``, ``"risk"`` or None: what ``predict`` can do with ``est``."""
    from uqseg.conformal import ConformalRiskController

    if isinstance(est, ConformalRiskController):
        return "risk"
    if hasattr(est, "score_samples") and hasattr(est, "offset_"):
        return "ood"
    if hasattr(est, "flag") and hasattr(est, "predict"):
        return "quality"
    return None


def plan_predict(models, inputs, out, *, estimators=(), overwrite=False, risk=None,
                 alpha=None, delta=None) -> Plan:
    """Check every argument and input; raise before anything is written.

    ``risk``, ``alpha`` and ``delta`` (each None: as saved) choose the thresholds of every
    risk controller again from its stored calibration statistics
    (:meth:`ConformalRiskController.recalibrate`).
    """
    import uqseg
    from uqseg.backends._model import read_model
    from uqseg.io import check_image, image_stem
    from uqseg.persistence import read_manifest

    for m in models:
        if not Path(m).is_file():
            raise UsageError(f"model {m!r} is not an existing .onnx file")
        try:
            read_model(m)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"model {m!r}: {exc}") from exc
    for src in inputs:
        if not Path(src).exists():
            raise UsageError(f"input {str(src)!r} does not exist")
    stems: dict[str, list[str]] = {}
    for src in inputs:
        stems.setdefault(image_stem(src), []).append(str(src))
    clash = {s: srcs for s, srcs in stems.items() if len(srcs) > 1}
    if clash:
        raise UsageError("inputs would write to the same output names: " + "; ".join(
            f"{' and '.join(srcs)} -> {s}_*" for s, srcs in clash.items())
            + ". Run them with different --out folders")
    checked = []
    for d in estimators:
        d = Path(d)
        if not (d / "manifest.json").is_file():
            raise UsageError(f"--estimators {str(d)!r} is not a folder written by uqseg.save")
        read_manifest(d)
        est = uqseg.load(d)
        kind = estimator_kind(est)
        if kind is None:
            raise TypeError(f"--estimators {str(d)!r} holds a {type(est).__name__}; predict "
                            "scores OOD detectors (score_samples, offset_) and quality "
                            "regressors (predict, flag) and applies ConformalRiskControllers "
                            "only")
        checked.append((d, est, kind))
    new = {k: v for k, v in (("risk", risk), ("alpha", alpha), ("delta", delta))
           if v is not None}
    if new and not any(kind == "risk" for _, _, kind in checked):
        raise UsageError(f"--{'/--'.join(new)} set the level of a ConformalRiskController: "
                         "give its saved folder with --estimators")
    for d, est, kind in checked:
        if kind == "risk" and new:
            try:
                est.recalibrate(**new)
            except ValueError as exc:
                raise UsageError(f"--estimators {str(d)!r}: {exc}") from exc
    names = [d.name for d, _, _ in checked]
    if len(set(names)) < len(names):
        raise UsageError(f"--estimators folders must have distinct names (they key "
                         f"scores.json), got {names}")
    out = Path(out)
    _check_writable(out)
    plan = Plan(list(models), [Path(s) for s in inputs], out, checked, overwrite)
    if not overwrite:
        existing = [str(p) for src in plan.inputs for p in plan.outputs(src).values()
                    if p.exists() or p.is_symlink()]
        if existing:
            raise UsageError(f"refusing to overwrite {len(existing)} existing output file(s): "
                             f"{', '.join(existing[:4])}{' ...' if len(existing) > 4 else ''} "
                             "(pass --overwrite to replace them)")
    for src in plan.inputs:
        check_image(src)
    return plan


def _check_writable(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {str(out)!r} exists and is not a folder")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"--out {str(out)!r}: {str(probe)!r} is not a writable folder")


def run_predict(plan: Plan, *, tta=False, mc_samples=0, axis=None, normalize=True,
                backend="auto", device="auto", batch_size="auto", progress=True,
                preprocess=True, spacing=None, activation="auto") -> list[Path]:
    """Segment every input of ``plan``; returns the published paths.

    With ``preprocess`` (default) and models that carry a ``uqseg.preprocessing``
    description, every 3-D input goes through it and the maps come back in its grid;
    ``spacing`` (mm, 3 floats) gives the voxel size of NumPy inputs stored without an affine.
    ``activation`` is ``EnsembleSegmenter``'s.
    """
    from uqseg.ensemble import EnsembleSegmenter

    ens = EnsembleSegmenter(list(plan.models), tta="flips" if tta else None,
                            mc_samples=mc_samples, backend=backend, device=device,
                            batch_size=batch_size, activation=activation).fit()
    prep = ens.preprocessing_ if preprocess else None
    if prep is not None:
        if axis is not None:
            raise UsageError("--axis conflicts with the models' preprocessing (it sets the "
                             f"slicing plane: {prep.plane}); drop --axis or pass "
                             "--no-preprocess")
        if not normalize:
            raise UsageError("--no-normalize conflicts with the models' preprocessing (it sets "
                             "the intensity normalisation); pass --no-preprocess instead")
        if ens.n_input_channels_ != 1:
            raise ValueError(f"the models take {ens.n_input_channels_} input channels; "
                             "preprocessing descriptions cover single-channel scans only (pass "
                             "--no-preprocess and prepare the channels yourself)")
        if (prep.plane is not None) != (ens.spatial_dims_ == 2):
            raise ValueError(f"the models are {ens.spatial_dims_}-D but their preprocessing "
                             f"has plane={prep.plane!r}")
    axis = 2 if axis is None else axis
    created = not plan.out.exists()
    plan.out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".uqseg-predict-", dir=plan.out))
    staged: list[tuple[Path, Path]] = []
    try:
        for i, src in enumerate(plan.inputs):
            work = tmp / str(i)
            work.mkdir()
            if prep is not None:
                from uqseg._predict_volume import predict_preprocessed

                staged += predict_preprocessed(plan, ens, prep, src, work, spacing=spacing,
                                               progress=progress)
            else:
                staged += _predict_one(plan, ens, src, work, axis=axis, normalize=normalize,
                                       batch_size=batch_size, progress=progress)
        published = _publish(plan, staged)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not any(plan.out.iterdir()):
            plan.out.rmdir()  # a folder this run made goes too (only while it is empty)
        raise
    shutil.rmtree(tmp, ignore_errors=True)
    return published


def _publish(plan: Plan, staged: list[tuple[Path, Path]]) -> list[Path]:
    finals = {final for _, final in staged}
    if not plan.overwrite:
        appeared = [str(f) for f in finals if f.exists()]
        if appeared:  # written by someone else while this run was computing
            raise FileExistsError(f"output file(s) appeared during the run: {appeared[:4]}")
    for src in plan.inputs:  # --overwrite: no stale map of an earlier run stays beside ours
        for p in plan.outputs(src).values():
            if p not in finals and p.is_file():
                p.unlink()
    for tmp_path, final in staged:
        os.replace(tmp_path, final)
    return [final for _, final in staged]


# ---------------------------------------------------------------------- layouts
def _spatial_ndim(shape, channels: int) -> int:
    nd = len(shape)
    if channels > 1:
        if nd < 3 or shape[-1] != channels:
            raise ValueError(f"the model takes {channels} channels: the input needs them on its "
                             f"last axis, got shape {tuple(shape)}")
        return nd - 1
    if nd == 4 and shape[-1] == 1:
        return 3
    if nd == 4:
        raise ValueError(f"the model takes 1 channel, got a 4-D input of shape {tuple(shape)}")
    return nd


def layout_of(shape, *, dims: int, channels: int) -> str:
    """How a volume of ``shape`` goes through a ``dims``-D model (see :func:`to_model_batch`)."""
    spatial = _spatial_ndim(shape, channels)
    if spatial == dims:
        return "whole"
    if spatial == 3 and dims == 2:
        return "slices"
    if spatial == 2 and dims == 3:
        return "whole2d"
    raise ValueError(f"a {spatial}-D input cannot go through a {dims}-D model")


def to_model_batch(data, *, dims: int, channels: int, axis: int):
    """Arrange a volume ``data`` (spatial axes, channels last if any) as a model batch.

    Returns ``(X, layout)``: ``X`` is ``(N, C, *spatial)`` float32 and ``layout`` tells
    :func:`to_volume` how to put maps back: ``"whole"`` (one image), ``"slices"`` (a 3-D
    volume cut along ``axis`` for a 2-D model) or ``"whole2d"`` (a 2-D image as a one-slice
    volume for a 3-D model).
    """
    layout = layout_of(np.shape(data), dims=dims, channels=channels)
    arr = np.asarray(data, dtype=np.float32)
    if channels > 1:
        arr = np.moveaxis(arr, -1, 0)  # (C, *spatial)
    else:
        arr = (arr[..., 0] if arr.ndim == 4 else arr)[None]
    if layout == "whole":
        return arr[None], layout
    if layout == "slices":
        return np.ascontiguousarray(np.moveaxis(arr, axis + 1, 1).swapaxes(0, 1)), layout
    return arr[:, None][None], layout


def take_slab(data, layout: str, axis: int, s0: int, s1: int):
    """Slices ``[s0:s1]`` along ``axis`` of a volume cut into slices (a view); else ``data``."""
    if layout != "slices":
        return data
    return data[(slice(None),) * axis + (slice(s0, s1),)]


def to_volume(arr, layout: str, axis: int, classes: bool = False):
    """``(N, [K,] *spatial)`` model-batch maps -> the input's voxel grid (classes last)."""
    if classes:
        arr = np.moveaxis(arr, 1, -1)  # (N, *spatial, K)
    if layout == "slices":
        return np.ascontiguousarray(np.moveaxis(arr, 0, axis))
    vol = arr[0]
    if layout == "whole2d":
        vol = vol[0]
    return np.ascontiguousarray(vol)


def _slab_ranges(n: int, per: int):
    return [(s, min(n, s + per)) for s in range(0, n, per)]


def _predict_one(plan, ens, source, work, *, axis, normalize, batch_size, progress):
    """Stream one input through ``ens``; returns ``(staged, final)`` path pairs."""
    from tqdm.auto import tqdm

    from uqseg._slabwriter import SlabWriter
    from uqseg.datasets import normalize_intensity
    from uqseg.io import read_image, write_nifti
    from uqseg.quality_features import is_sigmoid

    vol = read_image(source)
    finals = plan.outputs(source)
    dims, channels = ens.spatial_dims_, ens.n_input_channels_
    layout = layout_of(vol.data.shape, dims=dims, channels=channels)
    kinds = ("entropy", "mutual_information") if ens.n_samples_ > 1 else ("entropy",)
    keys = ["seg", "proba", *(MAP_NAMES[k] for k in kinds)]
    dtypes = {"seg": np.uint8, "proba": np.float32, "entropy": np.float32, "mi": np.float32}
    risks = [(d, est) for d, est, kind in plan.estimators if kind == "risk"]
    for d, _ in risks:
        keys.append(mask_key(d))
        dtypes[mask_key(d)] = np.uint8
    channels_of = {"proba": ens.n_classes_, **{mask_key(d): len(est.classes_)
                                               for d, est in risks}}
    sig = is_sigmoid(ens)
    if sig:  # independent channels: a mask and uncertainty maps per channel
        channels_of.update({k: ens.n_classes_ for k in ("seg", *(MAP_NAMES[k] for k in kinds))})
    spatial = vol.data.shape[:3] if layout == "slices" else None
    n = spatial[axis] if layout == "slices" else 1
    if layout == "slices":
        per = max(1, SLAB_VOXELS // max(1, int(np.prod(spatial)) // n))
        writers = {k: SlabWriter(work / f"{k}.nii.gz", spatial, dtypes[k], vol.affine,
                                 axis=axis, n_classes=channels_of.get(k),
                                 scratch=work / f"{k}.raw") for k in keys}
    else:
        per, writers = 1, {}
    class_voxels = np.zeros(ens.n_classes_, dtype=np.int64)
    mask_voxels = {d.name: np.zeros(len(est.classes_), dtype=np.int64) for d, est in risks}
    entropy_sum, scores = 0.0, {d.name: [] for d, _, _ in plan.estimators}
    n_spatial = 0
    whole = {}
    try:
        for s0, s1 in tqdm(_slab_ranges(n, per), desc=f"segment {source.name}", unit="slab",
                           disable=not progress or n <= per, file=sys.stderr, leave=False):
            data = take_slab(vol.data, layout, axis, s0, s1)
            X, _ = to_model_batch(data, dims=dims, channels=channels, axis=axis)
            if normalize:
                X = normalize_intensity(X)
            proba, maps, shared = assess_batch(ens, X, kinds, plan.estimators)
            n_spatial += proba.size // proba.shape[1]
            if sig:  # masks as EnsembleSegmenter.predict gives them
                seg = (proba >= 0.5).astype(np.uint8)
                class_voxels += seg.sum(axis=tuple(i for i in range(seg.ndim) if i != 1),
                                        dtype=np.int64)
            else:
                seg = proba.argmax(axis=1).astype(np.uint8)
                class_voxels += np.bincount(seg.ravel(), minlength=ens.n_classes_)
            entropy_sum += float(maps["entropy"].sum(dtype=np.float64))
            arrays = {"seg": seg, "proba": proba, **{MAP_NAMES[k]: maps[k] for k in kinds}}
            for d, est, kind in plan.estimators:
                if kind == "risk":
                    mask = _risk_masks(est, X, proba)
                    mask_voxels[d.name] += mask.sum(axis=tuple(
                        i for i in range(mask.ndim) if i != 1))
                    arrays[mask_key(d)] = mask
                    continue
                scores[d.name].append(shared[d.name] if d.name in shared else np.asarray(
                    (est.score_samples if kind == "ood" else est.predict)(X)))
            for k in keys:
                block = to_volume(arrays[k].astype(dtypes[k], copy=False), layout,
                                  axis, classes=k in channels_of)
                if writers:
                    writers[k].write(s0, s1, block)
                else:
                    whole[k] = block
            del X, proba, maps, seg, arrays
        staged = []
        for k in keys:
            path = writers[k].finish() if writers else write_nifti(
                work / f"{k}.nii.gz", whole[k], vol.affine)
            staged.append((path, finals[k]))
    finally:
        for w in writers.values():
            w.close()
    # mean over voxels (and, for sigmoid outputs, over channels)
    n_vox = n_spatial * (ens.n_classes_ if sig else 1)
    report = {
        "input": str(source), "input_kind": vol.kind, "models": [str(m) for m in plan.models],
        "n_samples": int(ens.n_samples_), "layout": layout, "axis": axis,
        "normalized": bool(normalize), "shape": list(vol.data.shape),
        "activation": getattr(ens, "activation_", "softmax"),
        "class_voxels": class_voxels.tolist(), "mean_entropy": entropy_sum / max(n_vox, 1),
        "outputs": [str(final) for _, final in staged],
    }
    if plan.estimators:
        report["estimators"] = {
            d.name: _risk_summary(est, mask_voxels[d.name], finals[mask_key(d)])
            if kind == "risk" else _summary(est, kind, np.concatenate(scores[d.name]))
            for d, est, kind in plan.estimators}
    (work / "scores.json").write_text(json.dumps(report, indent=2))
    staged.append((work / "scores.json", finals["scores"]))
    return staged


def _summary(est, kind, values) -> dict:
    if kind == "ood":
        return {"type": type(est).__name__, "score_samples": values.tolist(),
                "inlier": (values - est.offset_ >= 0).tolist(),
                "fraction_outlier": float(np.mean(values - est.offset_ < 0)),
                "min_score": float(values.min()), "offset": float(est.offset_)}
    return {"type": type(est).__name__, "target": getattr(est, "target", "dice"),
            "predicted_quality": values.tolist(),
            "mean_predicted_quality": np.nanmean(values, axis=0).tolist()}


def _risk_masks(est, X, proba):
    """A controller's masks for a model batch: through its own estimator when it has one
    (the guarantee is about that estimator's probabilities), else on the ensemble's."""
    if est.estimator_ is not None:
        return np.asarray(est.predict(X))
    from uqseg.conformal import controlled_masks

    return controlled_masks(est, proba)


def _risk_summary(est, mask_voxels, output) -> dict:
    lam = [None if not np.isfinite(v) else float(v) for v in est.lambda_]
    return {"type": type(est).__name__, "risk": est.risk, "alpha": float(est.alpha),
            "delta": None if est.delta is None else float(est.delta), "method": est.method_,
            "classes": est.classes_.tolist(), "lambda": lam,
            "probabilities": "the controller's estimator" if est.estimator_ is not None
            else "the ensemble of the given models",
            "n_calibration": est.n_calibration_.tolist(),
            "mask_voxels": mask_voxels.tolist(), "output": str(output)}


def assess_batch(ens, X, kinds, estimators):
    """One :func:`uqseg.assess` pass: ``(proba, maps, {folder name: scores})`` for the first
    OOD detector and the first quality regressor of ``estimators`` (the others, if any, run
    their own networks as before)."""
    from uqseg._assess import assess

    ood = next(((d, e) for d, e, k in estimators if k == "ood"), None)
    qual = next(((d, e) for d, e, k in estimators if k == "quality"), None)
    res = assess(X, ens, ood=ood[1] if ood else None, quality=qual[1] if qual else None,
                 maps=kinds)
    shared = {}
    if ood:
        shared[ood[0].name] = np.asarray(res["ood_score"])
    if qual:
        shared[qual[0].name] = np.asarray(res["quality"])
    return res["proba"], {k: res[k] for k in kinds}, shared
