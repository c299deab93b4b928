"""Preprocessing that travels with a model: whole scans in, whole scans out.

A :class:`Preprocessing` describes how a scan becomes the images a network was trained on
(orientation, spacing, slicing plane, foreground crop, size, intensity normalisation). It is
stored in the ONNX file as the metadata ``uqseg.preprocessing`` (JSON), like MONAI bundles and
nnU-Net plans ship theirs. :func:`preprocess` applies it to a volume with its affine and
returns the model's input batch plus an :class:`Inverse`, which puts the network's outputs back
into the scan's own voxel grid (labels nearest-neighbour, probabilities and uncertainty maps
linearly; voxels outside the crop get background and zero uncertainty).

Every geometric step (reorientation, resampling, crop, resize) is axis-aligned, so the whole
chain is one affine map from model voxels to scan voxels: the scan is interpolated once
(linearly) and the outputs once on the way back. Core install only: numpy, scipy, nibabel.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from uqseg._preprocess_geometry import (
    Inverse,
    check_volume,
    foreground_bbox,
    foreground_threshold,
    otsu_threshold,
    reorientation,
    sampling,
)

__all__ = [
    "PREPROCESSING_KEY",
    "Inverse",
    "Preprocessing",
    "foreground_threshold",
    "otsu_threshold",
    "preprocess",
    "read_preprocessing",
    "set_preprocessing",
]

PREPROCESSING_KEY = "uqseg.preprocessing"
#: the axis codes whose axis a plane cuts (the slice normal)
PLANES = {"axial": "SI", "coronal": "AP", "sagittal": "LR"}
INTENSITY_METHODS = {
    "percentile": {"low": 1.0, "high": 99.0, "scope": "image"},
    "zscore": {"scope": "image", "foreground": False},
    "window": {"low": None, "high": None},
}
SCOPES = ("image", "volume")
CROP_METHODS = {"otsu": {"margin": 0.0, "min_area": 0.0},
                "threshold": {"threshold": None, "margin": 0.0, "min_area": 0.0}}
_KEYS = ("orientation", "spacing", "plane", "intensity", "crop", "size")
_MAX_JSON = 1 << 14  # a description is a few hundred bytes; refuse anything huge
MAX_SIZE = 8192  # per axis of a model input: far above any network, refuses allocation bombs
#: a description may upsample a scan, but not beyond this many times its voxels (or 2**24)
MAX_UPSAMPLING = 27


def _where(key: str) -> str:
    return f"preprocessing {key!r}"


def _number(value, what: str, *, positive=False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"{what} must be a finite number, got {value!r}")
    if positive and value <= 0:
        raise ValueError(f"{what} must be > 0, got {value!r}")
    return float(value)


def _check_options(raw, methods: dict, key: str) -> dict | None:
    if raw is None:
        return None
    if isinstance(raw, str):
        raw = {"method": raw}
    if not isinstance(raw, dict):
        raise TypeError(f"{_where(key)} must be a dict with a 'method' (or null), got "
                        f"{type(raw).__name__}")
    method = raw.get("method")
    if method not in methods:
        raise ValueError(f"{_where(key)}: method must be one of {tuple(methods)}, got {method!r}")
    allowed = methods[method]
    unknown = sorted(set(raw) - {"method", *allowed})
    if unknown:
        raise ValueError(f"{_where(key)}: unknown key(s) {unknown} for method {method!r}; "
                         f"allowed: {sorted(allowed)}")
    out = {"method": method, **allowed, **{k: v for k, v in raw.items() if k != "method"}}
    return out


def _check_intensity(raw) -> dict | None:
    out = _check_options(raw, INTENSITY_METHODS, "intensity")
    if out is None:
        return None
    w = _where("intensity")
    if "scope" in out and out["scope"] not in SCOPES:
        raise ValueError(f"{w}: scope must be one of {SCOPES}, got {out['scope']!r}")
    if out["method"] == "percentile":
        lo = _number(out["low"], f"{w} low")
        hi = _number(out["high"], f"{w} high")
        if not 0 <= lo < hi <= 100:
            raise ValueError(f"{w}: need 0 <= low < high <= 100, got low={lo}, high={hi}")
        out["low"], out["high"] = lo, hi
    elif out["method"] == "window":
        if out["low"] is None or out["high"] is None:
            raise ValueError(f"{w}: method 'window' needs 'low' and 'high' (e.g. a CT window "
                             "in HU: low -1000, high 400)")
        lo, hi = _number(out["low"], f"{w} low"), _number(out["high"], f"{w} high")
        if lo >= hi:
            raise ValueError(f"{w}: need low < high, got low={lo}, high={hi}")
        out["low"], out["high"] = lo, hi
    elif not isinstance(out["foreground"], bool):
        raise ValueError(f"{w}: foreground must be true or false, got {out['foreground']!r}")
    return out


def _check_crop(raw) -> dict | None:
    out = _check_options(raw, CROP_METHODS, "crop")
    if out is None:
        return None
    w = _where("crop")
    out["margin"] = _number(out["margin"], f"{w} margin (mm)")
    if out["margin"] < 0:
        raise ValueError(f"{w}: margin must be >= 0 mm, got {out['margin']}")
    out["min_area"] = _number(out["min_area"], f"{w} min_area")
    if not 0 <= out["min_area"] <= 1:
        raise ValueError(f"{w}: min_area (a fraction of the largest slice's foreground) must "
                         f"lie in [0, 1], got {out['min_area']}")
    if out["method"] == "threshold":
        if out["threshold"] is None:
            raise ValueError(f"{w}: method 'threshold' needs a 'threshold' (intensity above "
                             "which a voxel is foreground)")
        out["threshold"] = _number(out["threshold"], f"{w} threshold")
    return out


def _check_orientation(raw) -> str | None:
    if raw is None:
        return None
    if not isinstance(raw, str) or len(raw) != 3:
        raise ValueError(f"{_where('orientation')} must be 3 axis codes such as 'RAS' or 'LPS', "
                         f"got {raw!r}")
    codes = raw.upper()
    pairs = ["LR", "PA", "IS"]
    used = [next((p for p in pairs if c in p), None) for c in codes]
    if None in used or len(set(used)) != 3:
        raise ValueError(f"{_where('orientation')} must take one code of each pair L/R, P/A, "
                         f"I/S, got {raw!r}")
    return codes


@dataclass(frozen=True)
class Preprocessing:
    """How a scan becomes a model's input (and how the outputs go back).

    Parameters
    ----------
    orientation : str or None
        Axis codes of the volume the model sees (nibabel's convention: the direction in which
        each voxel index grows), e.g. ``"RAS"``, ``"LPS"`` or ``"PRS"``. ``None`` keeps the
        scan's voxel axes.
    spacing : tuple of 3 (float or None), or None
        Voxel size in mm along each axis of the reoriented volume; ``None`` (or a ``None``
        entry) keeps the scan's. An axis resized by ``size`` must have ``None`` here.
    plane : {"axial", "coronal", "sagittal"} or None
        For 2-D models: the volume is cut into slices across the axis whose code is S/I
        (axial), A/P (coronal) or L/R (sagittal); each slice's rows and columns are the other
        two axes in ``orientation`` order. ``None``: a 3-D model takes the volume whole.
    intensity : dict or None
        ``{"method": "percentile", "low": 1, "high": 99, "scope": "image"}`` (map those
        percentiles to 0 and 1, clip to [0, 1]); ``{"method": "zscore", "scope": ...,
        "foreground": bool}`` (zero mean, unit variance, over the foreground voxels when
        true); ``{"method": "window", "low": L, "high": H}`` (clip to a CT window, scale to
        [0, 1]). ``scope`` "image" normalises each model input image (each slice of a 2-D
        model) on its own, "volume" the whole preprocessed volume at once. ``None``: as is.
    crop : dict or None
        ``{"method": "otsu" | "threshold", "threshold": T, "margin": mm, "min_area": f}``:
        foreground = voxels above Otsu's threshold (or ``T``); the volume is cut to the
        foreground's bounding box grown by ``margin`` mm (clipped to the scan). Slices whose
        foreground covers less than ``min_area`` times the largest slice's are segmented but
        not scored by OOD detectors and quality regressors (nor are slices with none).
    size : tuple of int, or None
        Size of the model input: 2 ints (rows, columns) for a 2-D model, 3 for a 3-D one. The
        cropped field of view is resampled to exactly this size (its bounds are the outer
        edges of the first and last pixel). ``None`` keeps the sampling that ``spacing`` gives.

    Examples
    --------
    >>> p = Preprocessing(orientation="RAS", plane="axial", size=(128, 128),
    ...                   intensity={"method": "percentile"})
    >>> Preprocessing.from_json(p.to_json()) == p
    True
    """

    orientation: str | None = None
    spacing: tuple | None = None
    plane: str | None = None
    intensity: dict | None = None
    crop: dict | None = None
    size: tuple | None = None

    def __post_init__(self):
        set_ = object.__setattr__
        set_(self, "orientation", _check_orientation(self.orientation))
        if self.plane is not None and self.plane not in PLANES:
            raise ValueError(f"{_where('plane')} must be one of {tuple(PLANES)} or null, got "
                             f"{self.plane!r}")
        if self.plane is not None and self.orientation is None:
            raise ValueError(f"{_where('plane')} needs an 'orientation': the axis a plane cuts "
                             "is found from its codes")
        if self.spacing is not None:
            sp = self.spacing
            if isinstance(sp, (str, bytes)) or not hasattr(sp, "__len__") or len(sp) != 3:
                raise ValueError(f"{_where('spacing')} must be 3 values (mm, or null to keep "
                                 f"the scan's), got {sp!r}")
            set_(self, "spacing", tuple(
                None if s is None else _number(s, f"{_where('spacing')} entry", positive=True)
                for s in sp))
            if all(s is None for s in self.spacing):
                set_(self, "spacing", None)
        n_size = 2 if self.plane is not None else 3
        if self.size is not None:
            sz = self.size
            if isinstance(sz, (str, bytes)) or not hasattr(sz, "__len__") or len(sz) != n_size \
                    or any(isinstance(s, bool) or not isinstance(s, numbers.Integral)
                           or not 1 <= s <= MAX_SIZE for s in sz):
                what = "rows, columns for a 2-D model" if n_size == 2 else "a 3-D model"
                raise ValueError(f"{_where('size')} must be {n_size} integers in 1..{MAX_SIZE} "
                                 f"({what}), got {sz!r}")
            set_(self, "size", tuple(int(s) for s in sz))
        set_(self, "intensity", _check_intensity(self.intensity))
        set_(self, "crop", _check_crop(self.crop))
        if self.size is not None and self.spacing is not None:
            resized = set(self.model_axes()[-len(self.size):])
            both = [a for a in sorted(resized) if self.spacing[a] is not None]
            if both:
                raise ValueError(f"preprocessing gives both 'spacing' and 'size' for axis "
                                 f"{both}; give one per axis (null spacing where size rules)")

    # ------------------------------------------------------------------ structure
    def slice_axis(self) -> int | None:
        """Axis of the reoriented volume a 2-D model's slices cut across (None for 3-D)."""
        if self.plane is None:
            return None
        if self.orientation is None:
            raise ValueError("preprocessing 'plane' needs an 'orientation' (the axis to cut "
                             "is found from its codes)")
        return next(i for i, c in enumerate(self.orientation) if c in PLANES[self.plane])

    def model_axes(self) -> tuple[int, int, int]:
        """Reoriented axes in model order: (slice axis, rows, columns) or (D, H, W)."""
        s = self.slice_axis()
        if s is None:
            return (0, 1, 2)
        return (s, *(a for a in range(3) if a != s))  # type: ignore[return-value]

    # ------------------------------------------------------------------ (de)serialisation
    def to_dict(self) -> dict:
        """Plain-JSON dict (lists, not tuples)."""
        d = asdict(self)
        for k in ("spacing", "size"):
            if d[k] is not None:
                d[k] = list(d[k])
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        if not isinstance(d, dict):
            raise TypeError(f"a preprocessing description must be a JSON object, got "
                            f"{type(d).__name__}")
        unknown = sorted(set(d) - set(_KEYS))
        if unknown:
            raise ValueError(f"unknown preprocessing key(s) {unknown}; allowed: {list(_KEYS)}")
        return cls(**{k: d[k] for k in _KEYS if k in d})

    @classmethod
    def from_json(cls, text: str) -> Preprocessing:
        if not isinstance(text, str):
            raise TypeError(f"expected a JSON string, got {type(text).__name__}")
        if len(text) > _MAX_JSON:
            raise ValueError(f"preprocessing JSON is {len(text)} characters; at most "
                             f"{_MAX_JSON}")
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"preprocessing is not valid JSON: {text[:80]!r}") from exc
        return cls.from_dict(d)


Inverse.__module__ = __name__  # its public home (the docs name uqseg.preprocessing.Inverse)


# ---------------------------------------------------------------------- applying
def _normalise(x: np.ndarray, spec: dict | None, fg: np.ndarray | None) -> np.ndarray:
    """Intensity normalisation of one image (or the whole volume) ``x`` (float32)."""
    if spec is None:
        return x
    m = spec["method"]
    if m == "window":
        lo, hi = spec["low"], spec["high"]
        return np.clip((x.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if m == "zscore":
        vals = x[fg] if spec["foreground"] and fg is not None and fg.any() else x
        mu, sd = float(vals.mean(dtype=np.float64)), float(vals.std(dtype=np.float64))
        return ((x - mu) / (sd if sd > 0 else 1.0)).astype(np.float32)
    flat = x.ravel()
    # "lower"/"higher" pick actual values: the mapping equals datasets.normalize_intensity's
    lo = float(np.percentile(flat, spec["low"], method="lower"))
    hi = float(np.percentile(flat, spec["high"], method="higher"))
    if hi <= lo:
        lo, hi = float(flat.min()), float(flat.max())
    if hi <= lo:
        return np.zeros_like(x, dtype=np.float32)
    return np.clip((x.astype(np.float64) - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def preprocess(data, affine, preprocessing: Preprocessing | dict | str):
    """Apply ``preprocessing`` to a scan: the model's input batch and its :class:`Inverse`.

    Parameters
    ----------
    data : array (X, Y, Z)
        The scan's voxels (any real dtype; not copied).
    affine : array (4, 4)
        Voxel index -> world mm (RAS+, nibabel's convention).
    preprocessing : Preprocessing, dict or JSON str

    Returns
    -------
    X : ndarray float32
        ``(n_slices, 1, H, W)`` for a 2-D model (``plane`` set), ``(1, 1, D, H, W)`` else.
    inverse : Inverse
        Puts outputs back (:meth:`Inverse.invert`) and tells which slices to score.

    Raises
    ------
    ValueError
        A 4-D series, a zero spacing, a singular affine, an empty foreground crop.
    """
    p = _as_preprocessing(preprocessing)
    arr, aff, spacing = check_volume(data, affine)
    ornt, r, rshape, codes = reorientation(aff, arr.shape, p.orientation)
    rspacing = np.empty(3)
    for i, (ax, _) in enumerate(ornt):
        rspacing[int(ax)] = spacing[i]
    threshold = foreground_threshold(arr, p.crop)
    box = np.array([[0.0, 0.0, 0.0], [s - 1.0 for s in rshape]])
    if threshold is not None:
        bb = foreground_bbox(arr, threshold)
        if bb is None:
            raise ValueError(f"the scan has no foreground above the crop threshold "
                             f"{threshold:.6g} ({p.crop['method']}): the crop is empty "
                             f"(a blank scan?)")
        # scan voxel bbox -> reoriented coordinates (a flip maps i to n - 1 - i)
        rb = np.empty((2, 3))
        for i, (ax, flip) in enumerate(ornt):
            lo, hi = bb[0, i], bb[1, i]
            if flip < 0:
                lo, hi = arr.shape[i] - 1 - hi, arr.shape[i] - 1 - lo
            rb[:, int(ax)] = lo, hi
        margin = p.crop["margin"] / rspacing
        box = np.stack([np.maximum(rb[0] - margin, 0.0),
                        np.minimum(rb[1] + margin, np.array(rshape) - 1.0)])
    axes = p.model_axes()
    sizes = [None] * 3
    if p.size is not None:
        for a, s in zip(axes[-len(p.size):], p.size, strict=True):
            sizes[a] = s
    mr = np.zeros((4, 4))
    mr[3, 3] = 1.0
    model_shape = []
    for k, a in enumerate(axes):
        step = None if p.spacing is None or p.spacing[a] is None else p.spacing[a] / rspacing[a]
        first, st, n = sampling(box[0, a], box[1, a], sizes[a], step)
        mr[a, k], mr[a, 3] = st, first
        model_shape.append(n)
    n_model = float(np.prod(model_shape, dtype=np.float64))
    if n_model > max(MAX_UPSAMPLING * float(arr.size), 2.0**24):
        raise ValueError(f"the preprocessing would resample the scan ({arr.shape}) to "
                         f"{tuple(model_shape)} voxels, over {MAX_UPSAMPLING} times as many: "
                         "check its spacing against the scan's")
    matrix = r @ mr
    raw = ndimage.affine_transform(arr, matrix[:3, :3], offset=matrix[:3, 3],
                                   output_shape=tuple(model_shape), order=1, mode="nearest",
                                   output=np.float32)
    fg = raw > threshold if threshold is not None else None
    two_d = p.plane is not None
    if fg is not None:
        frac = fg.mean(axis=(1, 2)) if two_d else np.array([fg.mean()])
        scored = (frac > 0) & (frac >= p.crop["min_area"] * frac.max())
    else:
        frac = np.ones(model_shape[0] if two_d else 1)
        scored = np.ones(len(frac), dtype=bool)
    scope = (p.intensity or {}).get("scope", "volume")
    if two_d and scope == "image":
        for s in range(len(raw)):
            raw[s] = _normalise(raw[s], p.intensity, None if fg is None else fg[s])
    else:
        raw = _normalise(raw, p.intensity, fg)
    X = raw[:, None] if two_d else raw[None, None]
    inverse = Inverse(shape=tuple(int(s) for s in arr.shape), affine=aff, matrix=matrix,
                      model_shape=tuple(model_shape), two_d=two_d, threshold=threshold,
                      box=None if threshold is None else box, foreground=frac,
                      scored=scored, orientation=codes)
    return np.ascontiguousarray(X, dtype=np.float32), inverse


def _as_preprocessing(p) -> Preprocessing:
    if isinstance(p, Preprocessing):
        return p
    if isinstance(p, dict):
        return Preprocessing.from_dict(p)
    if isinstance(p, str):
        return Preprocessing.from_json(p)
    raise TypeError(f"preprocessing must be a Preprocessing, dict or JSON string, got "
                    f"{type(p).__name__}")


# ---------------------------------------------------------------------- ONNX metadata
def read_preprocessing(model) -> Preprocessing | None:
    """The ``uqseg.preprocessing`` description of an ONNX model (path or ModelProto), or None."""
    import onnx

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(
        str(model), load_external_data=False)
    raw = next((p.value for p in proto.metadata_props if p.key == PREPROCESSING_KEY), None)
    if raw is None:
        return None
    try:
        return Preprocessing.from_json(raw)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"metadata {PREPROCESSING_KEY!r}: {exc}") from exc


def set_preprocessing(model: str | os.PathLike, preprocessing, out=None) -> Path:
    """Store ``preprocessing`` in an ONNX file's metadata (weights and graph untouched).

    Parameters
    ----------
    model : path
        The ONNX file (a foreign model or one exported without a description).
    preprocessing : Preprocessing, dict, JSON str or None
        None removes the description.
    out : path, optional
        Where to write (default: replace ``model`` in place, atomically).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    import onnx

    src = Path(model)
    proto = onnx.load(str(src), load_external_data=False)
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key != PREPROCESSING_KEY]
    del proto.metadata_props[:]
    for k, v in keep:
        proto.metadata_props.add(key=k, value=v)
    if preprocessing is not None:
        proto.metadata_props.add(key=PREPROCESSING_KEY,
                                 value=_as_preprocessing(preprocessing).to_json())
    dst = Path(out) if out is not None else src
    tmp = dst.with_name(f".{dst.name}.tmp")
    try:
        onnx.save(proto, str(tmp))
        os.replace(tmp, dst)
    finally:
        tmp.unlink(missing_ok=True)
    return dst
