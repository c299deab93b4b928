"""Score image datasets on a Ray cluster (Ray Data ``map_batches`` over an actor pool).

The estimator travels to the workers as files: it is written with :func:`uqseg.save` (or given
as such a folder), and every actor loads it once with :func:`uqseg.load`. What comes back through
Ray's object store is compact: uint8 labels (or per-class volumes), scalar summaries (mean
entropy, OOD score, predicted Dice) and, on request, float16 maps; ``write_maps_to`` writes the
full maps to disk on the workers and returns their paths instead. Needs the ``ray`` extra.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from uqseg._distributed_files import (  # noqa: F401  (public home: uqseg.distributed)
    _SUFFIXES,
    _absolute_stem,
    _stem,
    _suffix,
    _write_map,
    map_stems,
    read_image,
)
from uqseg._optional import import_optional
from uqseg._scan_scoring import ROLES, preprocessing_of, score_scan
from uqseg._validation import check_images

OUTPUTS = ("labels", "volumes", "uncertainty", "uncertainty_map", "ood", "quality")
DEFAULT_OUTPUTS = ("labels", "uncertainty", "ood", "quality")
_NEEDS = {"labels": "segmenter", "volumes": "segmenter", "uncertainty": "segmenter",
          "uncertainty_map": "segmenter", "ood": "ood", "quality": "quality"}
MAP_FORMATS = ("auto", "npy", "nifti")
ON_ERROR = ("raise", "record")

PREPROCESS = ("auto", True, False)

__all__ = ["DEFAULT_OUTPUTS", "OUTPUTS", "ImageScorer", "score_dataset", "score_images",
           "score_scan"]


# ---------------------------------------------------------------------------- roles and scoring
def roles_of(obj: Any) -> dict[str, Any]:
    """Map a fitted estimator (or a dict of them) to the roles segmenter / ood / quality.

    A single estimator takes the role its methods say: ``score_samples`` makes an OOD detector,
    ``flag`` a quality regressor, ``predict_proba`` a segmenter (also a Pipeline ending in one).
    """
    if isinstance(obj, dict):
        unknown = sorted(set(obj) - set(ROLES))
        if unknown or not obj:
            raise ValueError(f"estimator dict keys must be among {ROLES}, got {sorted(obj)}")
        return dict(obj)
    if hasattr(obj, "score_samples"):
        return {"ood": obj}
    if hasattr(obj, "flag"):
        return {"quality": obj}
    if hasattr(obj, "predict_proba"):
        return {"segmenter": obj}
    raise TypeError(f"estimator must be a segmenter (predict_proba), an OOD detector "
                    f"(score_samples), a quality regressor (flag) or a dict of them, got "
                    f"{type(obj).__name__}")


def _check_outputs(outputs: Any, roles: dict[str, Any]) -> tuple[str, ...]:
    if isinstance(outputs, str) or not isinstance(outputs, (list, tuple)) or not outputs:
        raise TypeError(f"outputs must be a non-empty tuple of names from {OUTPUTS}, "
                        f"got {outputs!r}")
    bad = [o for o in outputs if o not in OUTPUTS]
    if bad:
        raise ValueError(f"unknown outputs {bad}; choose from {OUTPUTS}")
    missing = [o for o in outputs if _NEEDS[o] not in roles]
    if tuple(outputs) == DEFAULT_OUTPUTS:
        # the default asks for everything the given estimators can produce
        outputs = tuple(o for o in outputs if o not in missing)
        if not outputs:
            raise ValueError(f"the estimator provides none of the default outputs {OUTPUTS}")
    elif missing:
        raise ValueError(f"outputs {missing} need a {sorted({_NEEDS[o] for o in missing})} "
                         f"estimator; the estimator given provides roles {sorted(roles)}")
    return tuple(dict.fromkeys(outputs))


def _assessable(seg) -> bool:
    from uqseg._inference import is_protocol

    return is_protocol(seg)


def _as_batch(images: list[np.ndarray]) -> np.ndarray | list[np.ndarray]:
    return np.stack(images) if len({im.shape for im in images}) == 1 else images


def score_images(roles: dict[str, Any], images: list[np.ndarray],
                 outputs: tuple[str, ...]) -> list[dict[str, Any]]:
    """Score a list of ``(C, *spatial)`` images locally; one dict per image.

    This is what every Ray actor runs on its batch. Keys: ``labels`` (uint8 map, uint16 for more
    than 256 classes), ``volumes`` (voxels per class), ``uncertainty`` (mean predictive
    entropy), ``uncertainty_map`` (float16 entropy map), ``ood`` (``score_samples``: higher =
    more in-distribution), ``quality`` (predicted Dice per foreground class).
    """
    from uqseg.uncertainty import entropy

    X = _as_batch(images)
    rows: list[dict[str, Any]] = [{} for _ in images]
    done: dict[str, Any] = {}
    seg = roles.get("segmenter")
    if any(_NEEDS[o] == "segmenter" for o in outputs) and _assessable(seg):
        # one inference pass for everything (uqseg.assess); estimators around other networks
        # run their own
        from uqseg._assess import assess

        done = assess(X, seg, ood=roles.get("ood") if "ood" in outputs else None,
                      quality=roles.get("quality") if "quality" in outputs else None,
                      maps=("entropy",))
    if any(_NEEDS[o] == "segmenter" for o in outputs):
        proba = done["proba"] if done else roles["segmenter"].predict_proba(X)
        ents = done.get("entropy")
        for i, (row, p) in enumerate(zip(rows, proba, strict=True)):
            n_classes = p.shape[0]
            labels = p.argmax(axis=0).astype(np.uint8 if n_classes <= 256 else np.uint16)
            if "labels" in outputs:
                row["labels"] = labels
            if "volumes" in outputs:
                row["volumes"] = np.bincount(labels.ravel(), minlength=n_classes).astype(np.int64)
            if "uncertainty" in outputs or "uncertainty_map" in outputs:
                h = ents[i] if ents is not None else entropy(p[None])[0]
                if "uncertainty" in outputs:
                    row["uncertainty"] = float(h.mean(dtype=np.float64))
                if "uncertainty_map" in outputs:
                    row["uncertainty_map"] = h.astype(np.float16)
    if "ood" in outputs:
        scores = done["ood_score"] if "ood_score" in done else roles["ood"].score_samples(X)
        for row, s in zip(rows, np.asarray(scores), strict=True):
            row["ood"] = float(s)
    if "quality" in outputs:
        qual = done["quality"] if "quality" in done else roles["quality"].predict(X)
        for row, q in zip(rows, np.asarray(qual), strict=True):
            row["quality"] = np.asarray(q, dtype=np.float32)
    return rows


def _describe(ident, path, exc: BaseException) -> str:
    where = f"{path!r}" if path is not None else f"id {ident!r}"
    return " ".join(f"{where}: {type(exc).__name__}: {exc}".split())


# ---------------------------------------------------------------------------- the actor
class ImageScorer:
    """Ray Data callable class: loads the saved estimator once, scores numpy batches.

    Batches hold ``id`` and either ``image`` (``(C, *spatial)`` arrays) or ``path`` (``.npy`` /
    NIfTI files read on the worker), optionally ``stem`` (where the maps go, relative to
    ``write_maps_to``). With ``on_error="record"`` a record that cannot be read or scored gets
    an ``error`` string (its path and the exception) and None outputs; the others are scored.
    With ``"raise"`` the first such record raises a ValueError naming it.
    """

    def __init__(self, saved: str, outputs: tuple[str, ...], write_maps_to: str | None = None,
                 map_format: str = "auto", on_error: str = "raise", preprocess="auto"):
        from uqseg.persistence import load

        self.roles = roles_of(load(saved))
        self.outputs = tuple(outputs)
        self.write_maps_to = None if write_maps_to is None else Path(write_maps_to)
        self.map_format = map_format
        self.on_error = on_error
        self.preprocess = preprocess
        self.preprocessing = None if preprocess is False else preprocessing_of(self.roles)
        if preprocess is True and self.preprocessing is None:
            raise ValueError("preprocess=True but the networks carry no preprocessing "
                             "description (set one with uqseg inspect --set)")

    def _keys(self) -> list[str]:
        maps = ("labels", "uncertainty_map") if self.write_maps_to is not None else ()
        keys = [f"{o}_path" if o in maps else o for o in self.outputs]
        return keys + ["n_scored"] if self.preprocessing is not None else keys

    def _is_scan(self, image, affine) -> bool:
        """Whether a record goes through the preprocessing: a 3-D single-channel scan with an
        affine (NIfTI, .npz with an affine) when the networks carry a description."""
        if self.preprocessing is None:
            return False
        scan = affine is not None and image.ndim == 4 and image.shape[0] == 1
        if self.preprocess is True and not scan:
            raise ValueError(
                "preprocess=True needs whole 3-D scans with an affine (NIfTI files or .npz "
                "files holding 'affine'); this record is an image of "
                f"shape {image.shape}{' without an affine' if affine is None else ''}")
        return scan

    def _score_scans(self, images, affines, scans, errors, ids, paths, rows):
        for i in scans:
            try:
                rows[i] = score_scan(self.roles, images[i], affines[i], self.outputs,
                                     self.preprocessing)
            except Exception as exc:
                self._fail(errors, i, ids[i], paths[i], exc)

    def _fail(self, errors, i, ident, path, exc) -> None:
        errors[i] = _describe(ident, path, exc)
        if self.on_error == "raise":
            raise ValueError(f"record {errors[i]}") from exc

    def _score(self, images, good, errors, ids, paths, rows):
        """Score images ``good`` together into ``rows``; on failure one by one to find the bad
        ones."""
        if not good:
            return rows
        try:
            for i, row in zip(good, score_images(self.roles, [images[i] for i in good],
                                                 self.outputs), strict=True):
                rows[i] = row
            return rows
        except Exception:
            if len(good) == 1 and self.on_error == "raise":
                i = good[0]
                self._fail(errors, i, ids[i], paths[i], sys.exc_info()[1])
        for i in good:
            try:
                rows[i] = score_images(self.roles, [images[i]], self.outputs)[0]
            except Exception as exc:
                self._fail(errors, i, ids[i], paths[i], exc)
        return rows

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = list(batch["id"])
        n = len(ids)
        paths = [str(p) for p in batch["path"]] if "path" in batch else [None] * n
        stems = [str(s) for s in batch["stem"]] if "stem" in batch else [
            _absolute_stem(p) if p is not None else str(i) for p, i in zip(paths, ids,
                                                                             strict=True)]
        images, affines, errors, scans = [None] * n, [None] * n, [None] * n, []
        for i in range(n):
            try:
                if "image" in batch:
                    images[i] = np.asarray(batch["image"][i], dtype=np.float32)
                else:
                    images[i], affines[i] = read_image(paths[i])
                if self._is_scan(images[i], affines[i]):
                    scans.append(i)
            except Exception as exc:
                self._fail(errors, i, ids[i], paths[i], exc)
        # model-space images together, whole scans one by one through the preprocessing
        rows: list[dict | None] = [None] * n
        self._score(images, [i for i in range(n) if errors[i] is None and i not in scans],
                    errors, ids, paths, rows)
        self._score_scans(images, affines, scans, errors, ids, paths, rows)
        if self.write_maps_to is not None:
            for i, row in enumerate(rows):
                if row is None:
                    continue
                fmt = self.map_format
                if fmt == "auto":
                    fmt = "nifti" if paths[i] is not None and _suffix(paths[i]) != ".npy" else "npy"
                try:
                    for key in ("labels", "uncertainty_map"):
                        if key in row:
                            row[f"{key}_path"] = _write_map(
                                row.pop(key), self.write_maps_to / f"{stems[i]}_{key}", fmt,
                                affines[i])
                except Exception as exc:
                    self._fail(errors, i, ids[i], paths[i], exc)
                    rows[i] = None
        out: dict[str, Any] = {"id": np.asarray(ids)}
        if "path" in batch:
            out["path"] = np.asarray(paths)
        for key in self._keys():
            values = [None if row is None else row.get(key) if key == "n_scored" else row[key]
                      for row in rows]
            out[key] = _column(values, ragged_ok=self.on_error == "raise")
        if self.on_error == "record":
            out["error"] = _column(errors, ragged_ok=False)
        return out


def _column(values: list, ragged_ok: bool) -> np.ndarray:
    """A batch column: typed when every value has one shape, else an object array (Ray keeps
    each value). ``ragged_ok=False`` always gives an object column (a schema that does not
    change between batches with and without failed records)."""
    if ragged_ok and not any(v is None for v in values):
        if not isinstance(values[0], np.ndarray) or len({v.shape for v in values}) == 1:
            return np.asarray(values)
    column = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):  # one by one: equal-shape arrays must not be stacked
        column[i] = v
    return column


# ---------------------------------------------------------------------------- the entry point
def _dataset_from(data: Any, ray_data: Any):
    """Build a Ray Dataset of rows ``{"id", "image"}`` or ``{"id", "path"}``."""
    if isinstance(data, ray_data.Dataset):
        names = data.schema().names
        if "image" not in names and "path" not in names:
            raise ValueError(f"the Ray Dataset needs an 'image' or a 'path' column; it has "
                             f"{names}")
        if "id" not in names:
            raise ValueError("the Ray Dataset needs an 'id' column (Ray Data does not keep row "
                             f"order); it has {names}")
        return data, None
    if isinstance(data, (list, tuple)) and data and all(
            isinstance(p, (str, os.PathLike)) for p in data):
        paths = [str(p) for p in data]
        for p in paths:
            if not _suffix(p):
                raise ValueError(f"image files must be {_SUFFIXES}, got {p!r}")
            if not os.path.isfile(p):
                raise FileNotFoundError(f"image file not found: {p!r}")
        stems = map_stems(paths)
        return ray_data.from_items([{"id": i, "path": p, "stem": s} for i, (p, s) in
                                    enumerate(zip(paths, stems, strict=True))]), len(paths)
    if isinstance(data, (np.ndarray, list, tuple)):
        X = check_images(data, name="data")
        return ray_data.from_items([{"id": i, "image": x} for i, x in enumerate(X)]), len(X)
    raise TypeError(f"data must be a Ray Dataset, an image array (N, C, *spatial), a list of "
                    f"(C, *spatial) arrays or a list of .npy/.nii.gz paths; got "
                    f"{type(data).__name__}")


def _check_int(name: str, value: Any, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


def score_dataset(estimator, data, *, batch_size=4, concurrency=1, num_gpus_per_actor=0,
                  outputs=DEFAULT_OUTPUTS, write_maps_to=None, map_format="auto",
                  staging_dir=None, return_dataset=False, on_error="raise", preprocess="auto"):
    """Score a dataset of images with Ray Data, one estimator load per actor.

    Parameters
    ----------
    estimator : fitted estimator, Pipeline, dict or path
        A segmenter (``OnnxSegmenter``, ``EnsembleSegmenter``, ``TemperatureCalibrator``, a
        Pipeline ending in one), an OOD detector, a quality regressor, a dict
        ``{"segmenter": ..., "ood": ..., "quality": ...}`` of them, or the path of a folder
        written by :func:`uqseg.save` holding any of these (required on a multi-node cluster:
        put it on storage every node can read).
    data : Ray Dataset, array, list of arrays or list of paths
        Images ``(N, C, *spatial)``, a list of ``(C, *spatial)`` arrays, ``.npy`` / ``.nii(.gz)``
        file paths (read on the workers), or a Ray Dataset with columns ``id`` and ``image`` or
        ``path``.
    batch_size : int, default=4
        Images per ``map_batches`` call.
    concurrency : int or (min, max), default=1
        Actors in the pool (each loads the estimator once).
    num_gpus_per_actor : float, default=0
        GPUs Ray reserves for each actor (the estimator's ``device="auto"`` then finds it).
    outputs : tuple of str, default=("labels", "uncertainty", "ood", "quality")
        From ``OUTPUTS``: ``labels``, ``volumes``, ``uncertainty``, ``uncertainty_map``, ``ood``,
        ``quality``. The default keeps those the estimator provides; names asked for
        explicitly must be available.
    write_maps_to : path, optional
        Folder the workers write ``labels`` / ``uncertainty_map`` to, NIfTI for NIfTI inputs
        (with their affine), else ``.npy``; results then hold ``labels_path`` /
        ``uncertainty_map_path`` instead of arrays. Names keep each input's folder relative to
        the inputs' common folder (``a/scan.nii.gz`` -> ``a/scan_labels.nii.gz``), so inputs
        with the same name in different folders never share a map; two inputs that would
        (``x.nii`` and ``x.npy`` side by side) are a ValueError before any work. Arrays are
        named by ``id``; a Ray Dataset's paths keep their whole absolute folder.
    map_format : {"auto", "npy", "nifti"}, default="auto"
    staging_dir : path, optional
        Where a fitted estimator is saved for the workers (default: a temporary folder, removed
        afterwards, which only works when all workers share this machine's disk).
    return_dataset : bool, default=False
        Return the materialised Ray Dataset instead of a list.
    on_error : {"raise", "record"}, default="raise"
        What a record that cannot be read or scored does. ``"raise"``: the job fails with a
        ValueError naming the record's path (or id) and the cause. ``"record"``: the job goes
        on; every result gets an ``error`` key (None, or the path and the cause) and a failed
        record's outputs are None, so the other results (and maps already written) are kept.
    preprocess : {"auto", True, False}, default="auto"
        Whole scans through the preprocessing description the networks carry (the zoo's do;
        see :mod:`uqseg.preprocessing`), each scored by :func:`score_scan`: labels and maps in
        the scan's own grid, ``ood`` and ``quality`` per volume from the images with
        foreground, and an ``n_scored`` key. ``"auto"``: records that are 3-D single-channel
        scans with an affine (NIfTI files, ``.npz`` files with an affine) when
        the networks carry a description; other records are taken as model-space images.
        ``True``: every record must be such a scan. ``False``: never.

    Returns
    -------
    list of dict
        One dict per image, ordered by ``id``: ``id`` (and ``path``) plus the outputs.
    """
    ray = import_optional("ray", "ray", purpose="uqseg.distributed")
    ray_data = import_optional("ray.data", "ray", purpose="uqseg.distributed")
    from uqseg.persistence import load, read_manifest, save

    _check_int("batch_size", batch_size, 1)
    if isinstance(concurrency, tuple):
        if len(concurrency) != 2:
            raise ValueError(f"concurrency must be an int or (min, max), got {concurrency!r}")
        for c in concurrency:
            _check_int("concurrency", c, 1)
    else:
        _check_int("concurrency", concurrency, 1)
    if isinstance(num_gpus_per_actor, bool) or not isinstance(
            num_gpus_per_actor, (int, float, np.integer, np.floating)) or num_gpus_per_actor < 0:
        raise ValueError(f"num_gpus_per_actor must be a number >= 0, got {num_gpus_per_actor!r}")
    if map_format not in MAP_FORMATS:
        raise ValueError(f"map_format must be one of {MAP_FORMATS}, got {map_format!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if not (preprocess is True or preprocess is False or (isinstance(preprocess, str)
                                                          and preprocess == "auto")):
        raise ValueError(f"preprocess must be 'auto', True or False, got {preprocess!r}")

    created = None
    if isinstance(estimator, (str, os.PathLike)):
        read_manifest(estimator)  # clear errors on the driver before any actor starts
        saved = str(Path(estimator).resolve())
        roles = roles_of(load(saved))
    else:
        roles = roles_of(estimator)
    outputs = _check_outputs(outputs, roles)
    ds, _ = _dataset_from(data, ray_data)
    if not isinstance(estimator, (str, os.PathLike)):
        if staging_dir is None:
            if ray.is_initialized() and len([n for n in ray.nodes() if n.get("Alive")]) > 1:
                raise ValueError("this Ray cluster has several nodes: pass staging_dir on shared "
                                 "storage, or a uqseg.save folder every node can read")
            created = Path(tempfile.mkdtemp(prefix="uqseg-ray-"))
            saved = str(save(estimator, created / "estimator"))
        else:
            saved = str(save(estimator, Path(staging_dir) / "estimator", overwrite=True))
    if write_maps_to is not None:
        Path(write_maps_to).mkdir(parents=True, exist_ok=True)
        write_maps_to = str(Path(write_maps_to).resolve())
    try:
        scored = ds.map_batches(
            ImageScorer,
            fn_constructor_kwargs={"saved": saved, "outputs": outputs,
                                   "write_maps_to": write_maps_to, "map_format": map_format,
                                   "on_error": on_error, "preprocess": preprocess},
            batch_size=int(batch_size), batch_format="numpy", concurrency=concurrency,
            num_gpus=float(num_gpus_per_actor) or None,
        )
        if return_dataset:
            return scored.materialize()
        rows = scored.take_all()
    finally:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
    rows.sort(key=lambda r: r["id"])
    return [{k: (v.item() if isinstance(v, np.generic) else v) for k, v in r.items()
             if k != "stem"} for r in rows]
