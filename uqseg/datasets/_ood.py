"""Out-of-distribution images: other modalities, other organs, non-medical images, and
acquisition faults applied to the brain test split."""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import numpy as np

from ._brain import PLANES, _check_size, load_brain_tissue
from ._cache import cache_key, cached
from ._corrupt import corrupt
from ._intensity import normalize_intensity, resize_image

OOD_KINDS = (
    "ct",
    "mri_other",
    "ultrasound",
    "natural",
    "noise",
    "ghosting",
    "bias",
    "blur",
    "orientation",
)
# severities of the faults applied to the test split: strong, clearly visible degradations
FAULT_SEVERITY = {"noise": 0.6, "ghosting": 0.8, "bias": 1.0, "blur": 0.75}
_FAULT_SEED = {"noise": 11, "ghosting": 12, "bias": 13, "blur": 14}
_N_VIEWS = 24

# windows (HU) under which the one CT slice is viewed: soft tissue, bone, lung, wide
_CT_WINDOWS = ((-160.0, 240.0), (-500.0, 1300.0), (-1000.0, 200.0), (-1024.0, 1500.0))
_NATURAL = (
    "camera",
    "moon",
    "coins",
    "brick",
    "grass",
    "gravel",
    "text",
    "page",
    "clock",
    "cell",
    "microaneurysms",
    "retina",
    "immunohistochemistry",
    "astronaut",
    "chelsea",
    "coffee",
    "rocket",
    "hubble_deep_field",
    "horse",
    "cat",
)


def _pydicom_file(name: str) -> Path:
    # read straight from the wheel: pydicom's get_testdata_file may try to download
    spec = importlib.util.find_spec("pydicom")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the DICOM test images ship with pydicom: pip install pydicom")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "test_files" / name
    if not path.exists():
        raise FileNotFoundError(f"pydicom test file missing from the installed wheel: {path}")
    return path


def _read_dicom(name: str) -> tuple[np.ndarray, object]:
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # test files are deliberately odd; the pixels are fine
        ds = pydicom.dcmread(_pydicom_file(name))
        arr = ds.pixel_array
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            from pydicom.pixels import apply_color_lut

            arr = apply_color_lut(arr, ds)
    return np.asarray(arr, dtype=np.float64), ds


def _gray(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return arr[..., :3] @ np.array([0.2125, 0.7154, 0.0721])  # luminance
    return arr


def _views(img: np.ndarray, n: int) -> list[np.ndarray]:
    """Deterministic crops and flips of one image (more OOD samples from few sources)."""
    h, w = img.shape
    out = []
    for i in range(n):
        frac = (1.0, 0.85, 0.7)[i % 3]
        ch, cw = max(8, int(h * frac)), max(8, int(w * frac))
        corner = (i // 3) % 4  # centre, then three off-centre positions
        r0 = ((h - ch) // 2, 0, h - ch, (h - ch) // 3)[corner]
        c0 = ((w - cw) // 2, w - cw, 0, (w - cw) * 2 // 3)[corner]
        v = img[r0 : r0 + ch, c0 : c0 + cw]
        if (i // 12) % 2:
            v = v[:, ::-1]
        out.append(v)
    return out


def _ct() -> list[np.ndarray]:
    arr, ds = _read_dicom("CT_small.dcm")
    hu = arr * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    views = _views(hu, _N_VIEWS // len(_CT_WINDOWS))
    return [np.clip(v, lo, hi) for lo, hi in _CT_WINDOWS for v in views]


def _mri_other() -> list[np.ndarray]:
    abdomen, _ = _read_dicom("examples_overlay.dcm")  # abdominal MR (liver)
    small, _ = _read_dicom("MR_small.dcm")  # 64 x 64 non-brain MR
    return _views(abdomen, _N_VIEWS // 2) + _views(small, _N_VIEWS // 2)


def _ultrasound() -> list[np.ndarray]:
    cine, _ = _read_dicom("examples_ybr_color.dcm")  # 30-frame echocardiography cine loop
    frames = [_gray(f) for f in cine[:: max(1, len(cine) // 18)][:18]]
    others = [
        _gray(_read_dicom(n)[0])
        for n in ("examples_palette.dcm", "examples_rgb_color.dcm", "ExplVR_BigEnd.dcm")
    ]
    extra = [v for o in others for v in _views(o, 2)]
    return frames + extra


def _natural() -> list[np.ndarray]:
    import skimage.data

    imgs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _NATURAL:
            img = getattr(skimage.data, name)()
            imgs.append(_gray(np.asarray(img, dtype=np.float64)))
    # a few centre crops of large images: textures at another scale
    imgs += [_views(imgs[i], 2)[1] for i in (0, 1, 3, 4)]
    return imgs


def _orientation(size: tuple[int, int], plane: str) -> np.ndarray:
    X, _ = load_brain_tissue("test", plane=plane, size=size)
    out = np.empty_like(X)
    others = [p for p in PLANES if p != plane]
    other = [load_brain_tissue("test", plane=p, size=size)[0] for p in others]
    for i in range(len(X)):
        mode = i % 4
        if mode == 0:
            out[i, 0] = np.rot90(X[i, 0], 1)
        elif mode == 1:
            out[i, 0] = np.rot90(X[i, 0], -1)
        elif mode == 2:
            out[i, 0] = X[i, 0][::-1]  # upside down
        else:
            src = other[(i // 4) % 2]
            out[i, 0] = src[i % len(src), 0]  # a slice in another plane
    return out


def _build(kind: str, size: tuple[int, int], plane: str) -> dict[str, np.ndarray]:
    if kind in FAULT_SEVERITY:
        X, _ = load_brain_tissue("test", plane=plane, size=size)
        return {"X": corrupt(X, kind, FAULT_SEVERITY[kind], seed=_FAULT_SEED[kind])}
    if kind == "orientation":
        return {"X": normalize_intensity(_orientation(size, plane))}
    images = {"ct": _ct, "mri_other": _mri_other, "ultrasound": _ultrasound, "natural": _natural}[
        kind
    ]()
    X = np.stack([normalize_intensity(resize_image(img, size)) for img in images])
    return {"X": X[:, None].astype(np.float32)}


def load_ood(kind: str, *, size: tuple[int, int] = (128, 128), plane: str = "axial") -> np.ndarray:
    """Real out-of-distribution images for the brain tissue task.

    All images are 2-D, resized to ``size`` (aspect ratio not kept, as for the brain data)
    and normalised with :func:`normalize_intensity`, so intensity range alone never gives
    them away. Every kind is deterministic.

    ============ =====================================================================
    kind         content (why it is out of distribution)
    ============ =====================================================================
    ct           the CT slice ``CT_small.dcm`` shipped with pydicom, in four HU windows
                 and six crops/flips (24): another modality and another body part
    mri_other    the abdominal MR ``examples_overlay.dcm`` and ``MR_small.dcm`` from
                 pydicom, 12 crops/flips each (24): same modality, other anatomy
    ultrasound   18 frames of the echocardiography cine ``examples_ybr_color.dcm`` and
                 crops of three other ultrasound DICOMs from pydicom (24), gray-scaled
    natural      24 gray-scaled scikit-image images: photographs, textures, text,
                 microscopy, histology and a fundus photograph: not radiology at all
    noise        brain test split with strong Rician noise (``corrupt`` severity 0.6)
    ghosting     brain test split with k-space motion ghosting (severity 0.8)
    bias         brain test split with a strong bias field (severity 1.0)
    blur         brain test split with strong Gaussian blur (severity 0.75)
    orientation  brain test split rotated by +-90 degrees, upside down, or sliced in
                 another plane: a wrong orientation or plane at inference
    ============ =====================================================================

    The faults mimic acquisition or pipeline errors on in-distribution anatomy; they are
    the hardest kinds to detect.

    Parameters
    ----------
    kind : str
        One of :data:`OOD_KINDS`.
    size : tuple of 2 ints, default (128, 128)
    plane : {"axial", "coronal", "sagittal"}, default "axial"
        Plane of the in-distribution data the faults start from.

    Returns
    -------
    numpy.ndarray
        float32 ``(N, 1, H, W)`` with values in ``[0, 1]``.

    Examples
    --------
    >>> from uqseg.datasets import load_ood
    >>> load_ood("ct").shape
    (24, 1, 128, 128)
    """
    if not isinstance(kind, str) or kind not in OOD_KINDS:
        raise ValueError(f"kind must be one of {OOD_KINDS}, got {kind!r}")
    if not isinstance(plane, str) or plane not in PLANES:
        raise ValueError(f"plane must be one of {PLANES}, got {plane!r}")
    size_t = _check_size(size, 2)
    params: dict[str, object] = {"kind": kind, "size": list(size_t)}
    if kind in FAULT_SEVERITY or kind == "orientation":
        params["plane"] = plane
    data = cached(cache_key("ood", **params), lambda: _build(kind, size_t, plane),
                  what=f"the {kind!r} out-of-distribution images")
    return data["X"]
