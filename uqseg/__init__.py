"""uqseg: trustworthy medical image segmentation on top of ONNX networks.

Estimators are imported lazily so that ``import uqseg`` stays cheap and never pulls
in onnxruntime, torch or TensorRT before they are needed.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "OnnxSegmenter": "uqseg.segmenter",
    "EnsembleSegmenter": "uqseg.ensemble",
    "TemperatureCalibrator": "uqseg.calibration",
    "SpectralOODDetector": "uqseg.ood",
    "UncertaintyOODDetector": "uqseg.ood",
    "MahalanobisOODDetector": "uqseg.ood",
    "KNNOODDetector": "uqseg.ood",
    "QualityRegressor": "uqseg.quality",
    "QualityFeatures": "uqseg.quality_features",
    "QualityCNN": "uqseg.quality_cnn",
    "ConformalRiskController": "uqseg.conformal",
    "assess": "uqseg._assess",  # a private module: the name uqseg.assess is the function
    "save": "uqseg.persistence",
    "load": "uqseg.persistence",
}
_SUBMODULES = {"datasets", "metrics", "backends", "uncertainty", "training", "distributed"}

__all__ = sorted([*_LAZY, *_SUBMODULES, "__version__"])


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBMODULES:
        return importlib.import_module(f"uqseg.{name}")
    raise AttributeError(f"module 'uqseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
