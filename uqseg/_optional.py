"""Import optional dependencies with an error that names the extra to install."""

from __future__ import annotations

import importlib
from types import ModuleType

_EXTRA_OF = {
    "torch": "train",
    "onnxscript": "train",
    "matplotlib": "plot",
    "ray": "ray",
    "tensorrt": "trt",
    "cuda": "trt",
    "cupy": "gpu",
}


def import_optional(name: str, extra: str | None = None, purpose: str | None = None) -> ModuleType:
    """Import ``name`` or raise an ImportError that says how to install it."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        extra = extra or _EXTRA_OF.get(name.split(".")[0])
        hint = f"pip install 'uqseg[{extra}]'" if extra else f"pip install {name}"
        what = f" for {purpose}" if purpose else ""
        raise ImportError(f"{name!r} is required{what} but is not installed; run: {hint}") from exc


def is_available(name: str) -> bool:
    """True when ``name`` can be imported (without importing it twice)."""
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True
