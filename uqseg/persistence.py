"""Save and load fitted estimators as a folder of JSON, ``.npz`` and ONNX files, without pickle.

Layout of a saved folder::

    manifest.json        format name + version, uqseg version, the encoded object tree,
                         and the sha256 of every other file in the folder
    arrays.npz           every numpy array of the tree (read with allow_pickle=False)
    models/<i>/<name>    ONNX files (and their external data) the tree refers to
    skops/<i>.skops      scikit-learn estimators that are not uqseg classes (skops format)

A saved folder is untrusted input. Only the classes named exactly in
:data:`uqseg._restore.CHECKS` are rebuilt field by field, each one's parameters and fitted state
checked there; other scikit-learn estimators come through skops with every type it does not
trust itself on an exact-name allowlist. No class named in a file is imported before it passes
the allowlist, no file outside the folder or its file list is opened (unless ``trusted_paths``
says so) and no parameter that writes files, unpickles or starts processes survives.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from uqseg._persist_decode import _Decoder
from uqseg._persist_encode import _Encoder
from uqseg._persist_format import (  # noqa: F401 - the format's names stay importable here
    _TAG,
    ARRAYS,
    FORMAT,
    FORMAT_VERSION,
    MANIFEST,
    MAX_DEPTH,
    SKOPS_TRUSTED_TYPES,
    _sha256,
    _uqseg_version,
)

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "save"]


def save(estimator: Any, path: str | os.PathLike, *, copy_models: bool = True,
         overwrite: bool = False) -> Path:
    """Save an estimator (fitted or not) to a folder, without pickle.

    Parameters
    ----------
    estimator : estimator, Pipeline, or a list/dict of them
        uqseg estimators and Pipelines are stored field by field (``get_params`` plus fitted
        attributes ending in ``_``); nested estimators recursively; other scikit-learn
        estimators through skops. Private attributes (``_runner`` …) are runtime caches and are
        not saved.
    path : str or path-like
        Folder to create. It must not exist unless ``overwrite=True`` and it holds a previous
        ``uqseg.save`` (a folder with a ``manifest.json``).
    copy_models : bool, default=True
        Copy every ONNX file the estimator refers to (with its external data) into the folder.
        ``False`` stores the absolute path and the file's sha256 instead; ``load`` checks it.
    overwrite : bool, default=False

    Returns
    -------
    pathlib.Path
        The folder written.

    Examples
    --------
    >>> import tempfile
    >>> import uqseg
    >>> seg = uqseg.OnnxSegmenter(uqseg.datasets.reference_models()[0]).fit()
    >>> folder = uqseg.save(seg, tempfile.mkdtemp() + "/seg_saved")
    >>> "manifest.json" in [p.name for p in folder.iterdir()]
    True
    >>> seg2 = uqseg.load(folder)              # its model is the copy inside the folder
    >>> X = uqseg.datasets.load_brain_tissue("test")[0][:2]
    >>> bool((seg2.predict_proba(X) == seg.predict_proba(X)).all())
    True
    """
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path (str or path-like), got {type(path).__name__}")
    if not isinstance(copy_models, bool):
        raise TypeError(f"copy_models must be True or False, got {copy_models!r}")
    target = Path(path)
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"path {str(target)!r} exists; pass overwrite=True to replace "
                                  "a previous uqseg.save folder")
        if not (target.is_dir() and (target / MANIFEST).is_file()):
            raise ValueError(f"overwrite=True replaces only a uqseg.save folder (with a "
                             f"{MANIFEST}); {str(target)!r} is not one")
    target.parent.mkdir(parents=True, exist_ok=True)
    # write next to the target, then rename: a crash never leaves a half-written folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        enc = _Encoder(tmp, copy_models)
        root = enc.encode(estimator, "estimator")
        with open(tmp / ARRAYS, "wb") as fh:
            np.savez(fh, **enc.arrays)
        files = {rel: _sha256(tmp / rel) for rel in [ARRAYS, *enc.files]}
        manifest = {"format": FORMAT, "format_version": FORMAT_VERSION,
                    "uqseg_version": _uqseg_version(), "root": root, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, allow_nan=False))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target



def _check_depth(obj: Any) -> None:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"{MANIFEST} nests deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
        elif isinstance(node, list):
            stack.extend((v, depth + 1) for v in node)


def _no_constant(name: str) -> None:
    raise ValueError(f"{MANIFEST} holds the non-standard JSON literal {name}")


def read_manifest(path: str | os.PathLike) -> dict:
    """Read and check the manifest of a saved folder (format, version, file hashes)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a folder path (str or path-like), got {type(path).__name__}")
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"no saved estimator at {str(folder)!r} (not a folder)")
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ValueError(f"{str(folder)!r} is not a uqseg.save folder: {MANIFEST} is missing")
    try:
        manifest = json.loads(mpath.read_text(), parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"{MANIFEST} in {str(folder)!r} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ValueError(f"{MANIFEST} nests deeper than {MAX_DEPTH} levels") from exc
    _check_depth(manifest)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{MANIFEST} has format {str(got)[:40]!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{MANIFEST} has an invalid format_version {str(version)[:20]!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"the folder was saved with format version {version} (uqseg "
            f"{str(manifest.get('uqseg_version'))[:20]}), newer than this uqseg "
            f"({_uqseg_version()}) reads (up to {FORMAT_VERSION}); upgrade uqseg"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or ARRAYS not in files:
        raise ValueError(f"{MANIFEST} has no valid file list")
    root = folder.resolve()
    for rel, digest in files.items():
        # lexical checks first: nothing outside the folder is touched, not even stat
        parts = PurePosixPath(rel).parts
        if (not rel or "\0" in rel or "\\" in rel or os.path.isabs(rel) or ".." in parts
                or rel == MANIFEST):
            raise ValueError(f"{MANIFEST} lists {rel[:80]!r}, which is outside the saved folder")
        target = (folder / rel).resolve()
        if not target.is_relative_to(root):  # a symlink out of the folder
            raise ValueError(f"{MANIFEST} lists {rel[:80]!r}, which is outside the saved folder")
        if not target.is_file():
            raise FileNotFoundError(f"{rel!r} listed in {MANIFEST} is missing from "
                                    f"{str(folder)!r}")
        if not isinstance(digest, str) or _sha256(target) != digest:
            raise ValueError(f"{rel!r} in {str(folder)!r} does not match the sha256 recorded in "
                             f"{MANIFEST}: the file was modified or corrupted")
    if "root" not in manifest:
        raise ValueError(f"{MANIFEST} has no 'root' entry")
    return manifest


def _trusted(trusted_paths: Any) -> list[Path] | None:
    if trusted_paths is None:
        return None
    if isinstance(trusted_paths, (str, os.PathLike)) or not isinstance(
            trusted_paths, (list, tuple)):
        raise TypeError("trusted_paths must be None or a list of folders, got "
                        f"{type(trusted_paths).__name__}")
    out = []
    for i, p in enumerate(trusted_paths):
        if not isinstance(p, (str, os.PathLike)):
            raise TypeError(f"trusted_paths[{i}] must be a folder path, got {type(p).__name__}")
        out.append(Path(os.path.normpath(os.path.abspath(p))))
    return out


def load(path: str | os.PathLike, *, trusted_paths: list | None = None) -> Any:
    """Load what :func:`save` wrote, treating the folder as untrusted input.

    Every file is checked against its sha256 first; only allowlisted classes are rebuilt; every
    parameter and fitted attribute is checked (type, shape, dtype, finite, range, consistency
    with the model files); nothing outside the folder is opened.

    Parameters
    ----------
    path : str or path-like
        A folder written by :func:`uqseg.save`.
    trusted_paths : list of str or path-like, optional
        Folders whose ONNX models a folder saved with ``copy_models=False`` may refer to.
        Without it (the default) such references are refused; with it, a referenced model must
        lie under one of them (after resolving links) and still match its recorded sha256.

    Returns
    -------
    estimator
        Model paths inside it point at the ONNX files in ``path`` (or the referenced originals
        for ``copy_models=False``).

    Raises
    ------
    ValueError, TypeError
        Unknown or newer format version, a file that does not match its recorded sha256, a
        class that is not on the allowlist, a model outside the folder, or a parameter or
        fitted attribute that fails its check; the message starts with the key path in the
        manifest (``estimator.steps[1][1].temperature_``).
    FileNotFoundError
        A missing folder or listed file, or a missing model under ``trusted_paths``.
    """
    trusted = _trusted(trusted_paths)
    manifest = read_manifest(path)
    folder = Path(path).resolve()
    try:
        arrays = np.load(folder / ARRAYS, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise ValueError(f"{ARRAYS} is not a valid npz file: {exc}") from exc
    if not hasattr(arrays, "files"):
        raise ValueError(f"{ARRAYS} is not an npz archive")
    with arrays:
        return _Decoder(folder, arrays, manifest["files"], trusted).decode(
            manifest["root"], "estimator")
