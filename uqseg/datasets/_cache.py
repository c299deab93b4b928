"""On-disk cache for generated data sets: versioned keys, atomic writes, corrupt files rebuilt."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

# bump whenever the generated arrays change for the same arguments
DATA_FORMAT_VERSION = 2


def cache_dir() -> Path:
    """Directory of the data cache: ``$UQSEG_DATA_DIR`` or ``~/.cache/uqseg``."""
    env = os.environ.get("UQSEG_DATA_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "uqseg"


def cache_key(name: str, **params: object) -> str:
    """Stable key from a data set name, its arguments and the data-format version."""
    spec = json.dumps(
        {"name": name, "format": DATA_FORMAT_VERSION, "params": params}, sort_keys=True
    )
    return spec


def cache_path(key: str) -> Path:
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    name = json.loads(key)["name"]
    return cache_dir() / f"{name}-v{DATA_FORMAT_VERSION}-{digest}.npz"


def _read(path: Path, key: str) -> dict[str, np.ndarray] | None:
    try:
        # own file handle: np.load leaks its handle when the file is not a valid archive
        with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
            if str(f["__key__"]) != key:
                return None
            return {k: f[k] for k in f.files if k != "__key__"}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        # a truncated or foreign file is never trusted: the caller rebuilds it
        return None


def _write(path: Path, key: str, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.stem, suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, __key__=np.array(key), **arrays)
        # rename is atomic: readers see the old file, no file or the complete new one
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached(key: str, build: Callable[[], dict[str, np.ndarray]],
           what: str | None = None) -> dict[str, np.ndarray]:
    """Return the arrays stored under ``key``, building and storing them when missing or bad.

    A build that takes more than a moment says so on stderr (``what`` names the data), once:
    later calls read the cache.
    """
    path = cache_path(key)
    if path.exists():
        arrays = _read(path, key)
        if arrays is not None:
            return arrays
    if what:
        print(f"uqseg: building {what} (first use only; cached in {cache_dir()})",
              file=sys.stderr, flush=True)
    arrays = build()
    try:
        _write(path, key, arrays)
    except OSError:
        # a read-only home must not stop the data from being returned
        pass
    return arrays
