"""The reference ONNX model zoo shipped in ``uqseg/datasets/models``."""

from __future__ import annotations

import json
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"

#: What the zoo's training slices had (see ``_brain.py``), as a ``uqseg.preprocessing``
#: description: axial slices of the 1 mm template (native slice spacing), rows anterior ->
#: posterior and columns left -> right ("PRS" cut across S), the brain's bounding box grown
#: by 6 mm resized to 128 x 128 (aspect not kept), 1st/99th percentile to [0, 1] per slice.
#: Training slices covered the slices with at least 30 % of the largest slice's brain area;
#: scans are scored on those only. The brain box came from the tissue maps; a scan has only
#: its intensities, and Otsu's threshold on the template finds the same box within a voxel.
ZOO_PREPROCESSING = {
    "orientation": "PRS",
    "plane": "axial",
    "spacing": None,
    "crop": {"method": "otsu", "margin": 6.0, "min_area": 0.3},
    "size": [128, 128],
    "intensity": {"method": "percentile", "low": 1.0, "high": 99.0, "scope": "image"},
}

#: The 3-D member (``benchmarks/train_zoo3d.py``), relative to ``MODELS_DIR``; kept in its own
#: folder so that the 2-D zoo stays ``models/*.onnx``.
ZOO3D_FILE = "3d/unet3d.onnx"
#: What its training volumes had (``load_brain_tissue(dims=3)``): the 1 mm template's brain
#: box grown by 6 mm, resized to 64^3 (aspect not kept), axes (S, P, R) = the template's
#: z, y flipped and x; 1st/99th percentile to [0, 1] over the volume.
ZOO3D_PREPROCESSING = {
    "orientation": "SPR",
    "plane": None,
    "spacing": None,
    "crop": {"method": "otsu", "margin": 6.0, "min_area": 0.0},
    "size": [64, 64, 64],
    "intensity": {"method": "percentile", "low": 1.0, "high": 99.0, "scope": "image"},
}


def reference_models(dims: int = 2) -> list[str]:
    """Paths of the shipped reference ONNX networks.

    Parameters
    ----------
    dims : {2, 3}, default 2
        2: the 2-D U-Net ensemble (``models/*.onnx``, sorted by file name). 3: the 3-D
        U-Net member (``models/3d/unet3d.onnx``, one path), trained on
        ``load_brain_tissue(dims=3)`` by ``benchmarks/train_zoo3d.py``; it takes 64^3
        volumes (larger ones through a sliding window) and carries the preprocessing that
        makes them from a whole scan.

    Returns
    -------
    list of str
        Absolute paths.

    Raises
    ------
    ValueError
        ``dims`` is not 2 or 3.
    FileNotFoundError
        When the model files are absent (e.g. a source checkout where the zoo has not
        been built yet).

    Examples
    --------
    >>> from uqseg import datasets
    >>> len(datasets.reference_models()), len(datasets.reference_models(dims=3))
    (5, 1)
    """
    if isinstance(dims, bool) or dims not in (2, 3):
        raise ValueError(f"dims must be 2 (the 2-D zoo) or 3 (the 3-D member), got {dims!r}")
    if dims == 3:
        path = MODELS_DIR / ZOO3D_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"the 3-D reference member is missing: {path}. Build it with `python "
                "benchmarks/train_zoo3d.py` (needs the train extra: pip install "
                "'uqseg[train]')")
        return [str(path)]
    paths = sorted(MODELS_DIR.glob("*.onnx"), key=lambda p: p.name)
    if not paths:
        raise FileNotFoundError(
            f"the reference model zoo is missing: no *.onnx file in {MODELS_DIR}. Build it "
            "with `python benchmarks/train_zoo.py` (needs the train extra: "
            "pip install 'uqseg[train]')"
        )
    return [str(p) for p in paths]


def reference_model_info() -> dict:
    """Contents of ``uqseg/datasets/models/zoo.json`` (written by the zoo script).

    Returns
    -------
    dict
        The parsed JSON, or an empty dict when the file is absent. The 2-D members are
        under ``"members"``, the 3-D member under ``"member_3d"``.
    """
    path = MODELS_DIR / "zoo.json"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        info = json.load(fh)
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(info).__name__}")
    return info
