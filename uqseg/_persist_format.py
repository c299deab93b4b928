"""The saved-folder format of :mod:`uqseg.persistence`: names, limits and small helpers."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

FORMAT = "uqseg-estimator"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
_TAG = "__uqseg__"
# types a skops file may hold beyond those skops trusts itself (exact names: the trees of the
# default quality regressor)
SKOPS_TRUSTED_TYPES = frozenset({"sklearn.tree._tree.Tree", "sklearn.utils._bunch.Bunch"})
MAX_DEPTH = 100  # nesting of the manifest's JSON; real trees stay far below


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _uqseg_version() -> str:
    from uqseg import __version__

    return __version__


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _is_native(cls: type) -> bool:
    """Classes whose params and fitted attributes are stored field by field (and checked)."""
    from uqseg._restore import CHECKS

    return _class_path(cls) in CHECKS


def _is_onnx_path(value: Any) -> bool:
    return (isinstance(value, (str, os.PathLike)) and str(value).lower().endswith(".onnx")
            and os.path.isfile(value))
