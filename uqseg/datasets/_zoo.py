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


def reference_models() -> list[str]:
    """Paths of the shipped reference ONNX networks, sorted by file name.

    Returns
    -------
    list of str
        Absolute paths of ``uqseg/datasets/models/*.onnx``.

    Raises
    ------
    FileNotFoundError
        When the folder holds no ONNX file (e.g. a source checkout where the zoo has not
        been built yet).
    """
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
        The parsed JSON, or an empty dict when the file is absent.
    """
    path = MODELS_DIR / "zoo.json"
    if not path.exists():
        return {}
    with open(path, encoding="utf-8") as fh:
        info = json.load(fh)
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(info).__name__}")
    return info
