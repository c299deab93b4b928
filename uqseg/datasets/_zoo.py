"""The reference ONNX model zoo shipped in ``uqseg/datasets/models``."""

from __future__ import annotations

import json
from pathlib import Path

MODELS_DIR = Path(__file__).resolve().parent / "models"


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
