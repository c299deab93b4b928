"""Save and load fitted estimators as a folder of JSON, ``.npz`` and ONNX files, without pickle.

Layout of a saved folder::

    manifest.json        format name + version, uqseg version, the encoded object tree,
                         and the sha256 of every other file in the folder
    arrays.npz           every numpy array of the tree (read with allow_pickle=False)
    models/<i>/<name>    ONNX files (and their external data) the tree refers to
    skops/<i>.skops      scikit-learn estimators that are not uqseg classes (skops format)

Only these classes are rebuilt: ``uqseg.*`` estimators, ``sklearn.pipeline.Pipeline``, and other
scikit-learn estimators through skops with every type checked against a prefix allowlist
(``sklearn``, ``numpy``, ``scipy``). No class named in a file is imported unless it passes the
allowlist first.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import numpy as np

FORMAT = "uqseg-estimator"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ARRAYS = "arrays.npz"
_TAG = "__uqseg__"
# types a skops file may hold: top-level package names
SKOPS_TRUSTED_PREFIXES = ("sklearn", "numpy", "scipy")
# packages whose estimators are stored field by field and may be imported back
_NATIVE_PACKAGES = ("uqseg",)

__all__ = ["FORMAT", "FORMAT_VERSION", "load", "save"]


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
    """Classes whose params and fitted attributes are stored field by field."""
    from sklearn.pipeline import Pipeline

    return cls is Pipeline or cls.__module__.split(".")[0] in _NATIVE_PACKAGES


def _is_onnx_path(value: Any) -> bool:
    return (isinstance(value, (str, os.PathLike)) and str(value).lower().endswith(".onnx")
            and os.path.isfile(value))


# ---------------------------------------------------------------------------- encoding
class _Encoder:
    def __init__(self, folder: Path, copy_models: bool):
        self.folder = folder
        self.copy_models = copy_models
        self.arrays: dict[str, np.ndarray] = {}
        self.files: list[str] = []
        self._memo: dict[int, dict] = {}  # id(obj) -> ref node: shared objects stay shared
        self._keep: list[Any] = []  # keeps memoised objects alive so ids are not reused
        self._models: dict[str, dict] = {}  # resolved source path -> stored model node
        self._n_est = 0

    def encode(self, obj: Any, where: str) -> Any:
        if obj is None or isinstance(obj, (bool, str)) and not _is_onnx_path(obj):
            return obj
        if isinstance(obj, int) and not isinstance(obj, bool):
            return obj
        if isinstance(obj, float):
            return obj if math.isfinite(obj) else {_TAG: "float", "value": repr(obj)}
        if _is_onnx_path(obj):
            return self._model(obj, where)
        if isinstance(obj, PurePath):
            return {_TAG: "path", "value": str(obj)}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise TypeError(f"{where}: object arrays cannot be saved without pickle; store "
                                "numbers, strings or lists instead")
            return self._array(obj, "ndarray")
        if isinstance(obj, np.generic):
            return self._array(np.asarray(obj), "npscalar")
        if isinstance(obj, np.dtype):
            return {_TAG: "dtype", "value": obj.str}
        if isinstance(obj, list):
            return [self.encode(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return {_TAG: "tuple", "items": [self.encode(v, f"{where}[{i}]")
                                            for i, v in enumerate(obj)]}
        if isinstance(obj, dict):
            return {_TAG: "dict", "items": [[self.encode(k, f"{where} key"),
                                             self.encode(v, f"{where}[{k!r}]")]
                                            for k, v in obj.items()]}
        if isinstance(obj, np.random.Generator):
            return {_TAG: "generator", "state": self.encode(obj.bit_generator.state, where)}
        if isinstance(obj, np.random.RandomState):
            return {_TAG: "randomstate", "state": self.encode(obj.get_state(legacy=False), where)}
        from sklearn.base import BaseEstimator

        if isinstance(obj, BaseEstimator):
            return self._estimator(obj, where)
        raise TypeError(
            f"{where}: cannot save a value of type {type(obj).__module__}.{type(obj).__qualname__}"
            "; uqseg.save stores numbers, strings, lists, tuples, dicts, numpy arrays, ONNX "
            "paths and scikit-learn/uqseg estimators"
        )

    def _array(self, arr: np.ndarray, tag: str) -> dict:
        key = f"a{len(self.arrays)}"
        self.arrays[key] = arr
        return {_TAG: tag, "key": key}

    def _estimator(self, est: Any, where: str) -> dict:
        if id(est) in self._memo:
            return self._memo[id(est)]
        cls = type(est)
        ident = self._n_est
        self._n_est += 1
        self._memo[id(est)] = {_TAG: "ref", "id": ident}
        self._keep.append(est)
        name = _class_path(cls)
        if _is_native(cls):
            params = est.get_params(deep=False)
            fitted = {k: v for k, v in vars(est).items()
                      if k.endswith("_") and not k.startswith("_") and k not in params}
            return {_TAG: "estimator", "id": ident, "class": name,
                    "params": {k: self.encode(v, f"{where}.{k}") for k, v in params.items()},
                    "fitted": {k: self.encode(v, f"{where}.{k}") for k, v in fitted.items()}}
        if cls.__module__.split(".")[0] != "sklearn":
            raise TypeError(
                f"{where}: {name} is neither a uqseg nor a scikit-learn estimator; only those "
                "can be saved (and loaded back safely)"
            )
        import skops.io as sio

        rel = f"skops/{ident}.skops"
        (self.folder / "skops").mkdir(exist_ok=True)
        (self.folder / rel).write_bytes(sio.dumps(est))
        self.files.append(rel)
        return {_TAG: "skops", "id": ident, "class": name, "file": rel}

    def _model(self, value: str | os.PathLike, where: str) -> dict:
        from uqseg.backends._model import external_locations, read_model

        src = Path(value).resolve()
        kind = "path" if isinstance(value, PurePath) else "str"
        key = str(src)
        if key not in self._models:
            # read_model refuses external data outside the model's folder before we copy any
            proto, _ = read_model(src)
            if not self.copy_models:
                self._models[key] = {_TAG: "model", "ref": key, "sha256": _sha256(src)}
            else:
                rel_dir = f"models/{len(self._models)}"
                (self.folder / rel_dir).mkdir(parents=True)
                # every external file, wherever the model refers to it (attributes, subgraphs)
                names = [src.name] + external_locations(proto)
                for rel in names:
                    dst = self.folder / rel_dir / rel
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src.parent / rel, dst)
                    self.files.append(f"{rel_dir}/{PurePosixPath(Path(rel).as_posix())}")
                self._models[key] = {_TAG: "model", "file": f"{rel_dir}/{src.name}"}
        return {**self._models[key], "type": kind}


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
    >>> import uqseg                                                  # doctest: +SKIP
    >>> uqseg.save(seg, "seg_saved/"); seg2 = uqseg.load("seg_saved/")  # doctest: +SKIP
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


# ---------------------------------------------------------------------------- decoding
def _import_allowed(name: str) -> type:
    """Import a class named in a manifest only if it is on the allowlist."""
    from sklearn.base import BaseEstimator

    if not isinstance(name, str) or "." not in name:
        raise ValueError(f"the manifest names an invalid class {name!r}")
    module, _, qual = name.rpartition(".")
    if name != "sklearn.pipeline.Pipeline" and module.split(".")[0] not in _NATIVE_PACKAGES:
        raise ValueError(f"the manifest names class {name!r}, which is not on the allowlist "
                         "(uqseg.* estimators and sklearn.pipeline.Pipeline); refusing to load it")
    try:
        cls = getattr(importlib.import_module(module), qual)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"class {name!r} named in the manifest does not exist in this uqseg "
                         f"version ({_uqseg_version()})") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseEstimator) and cls.__module__ == module):
        raise ValueError(f"{name!r} named in the manifest is not an estimator class")
    return cls


class _Decoder:
    def __init__(self, folder: Path, arrays: Any, files: dict[str, str]):
        self.folder = folder
        self.arrays = arrays
        self.files = files
        self.objects: dict[int, Any] = {}

    def _file(self, rel: Any) -> Path:
        if rel not in self.files:
            raise ValueError(f"the manifest refers to {rel!r}, which is not in its file list")
        return self.folder / rel

    def decode(self, node: Any) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v) for v in node]
        if not isinstance(node, dict) or _TAG not in node:
            raise ValueError(f"malformed manifest entry {str(node)[:80]!r}")
        tag = node[_TAG]
        if tag == "float":
            return float(node["value"])
        if tag == "path":
            return Path(node["value"])
        if tag in ("ndarray", "npscalar"):
            key = node["key"]
            if key not in self.arrays.files:
                raise ValueError(f"array {key!r} named in the manifest is missing from {ARRAYS}")
            arr = self.arrays[key]
            return arr[()] if tag == "npscalar" else arr
        if tag == "dtype":
            return np.dtype(node["value"])
        if tag == "tuple":
            return tuple(self.decode(v) for v in node["items"])
        if tag == "dict":
            return {_hashable(self.decode(k)): self.decode(v) for k, v in node["items"]}
        if tag == "generator":
            state = self.decode(node["state"])
            bitgen = getattr(np.random, str(state.get("bit_generator")), None)
            if not (isinstance(bitgen, type) and issubclass(bitgen, np.random.BitGenerator)):
                raise ValueError(f"unknown bit generator {state.get('bit_generator')!r}")
            gen = np.random.Generator(bitgen())
            gen.bit_generator.state = state
            return gen
        if tag == "randomstate":
            rs = np.random.RandomState()
            rs.set_state(self.decode(node["state"]))
            return rs
        if tag == "model":
            return self._model(node)
        if tag == "ref":
            if node["id"] not in self.objects:
                raise ValueError(f"manifest refers to estimator #{node['id']} before defining it")
            return self.objects[node["id"]]
        if tag == "estimator":
            return self._estimator(node)
        if tag == "skops":
            return self._skops(node)
        raise ValueError(f"unknown manifest entry type {tag!r}")

    def _model(self, node: dict) -> str | Path:
        if "file" in node:
            path = self._file(node["file"]).resolve()
        else:
            path = Path(node["ref"])
            if not path.is_file():
                raise FileNotFoundError(f"the ONNX model {str(path)!r} referenced by the saved "
                                        "estimator (copy_models=False) is missing")
            got = _sha256(path)
            if got != node["sha256"]:
                raise ValueError(f"the ONNX model {str(path)!r} changed since it was saved "
                                 f"(sha256 {got[:12]}…, expected {node['sha256'][:12]}…)")
        return path if node.get("type") == "path" else str(path)

    def _estimator(self, node: dict) -> Any:
        cls = _import_allowed(node["class"])
        params = {k: self.decode(v) for k, v in node["params"].items()}
        est = cls(**params)
        self.objects[node["id"]] = est  # before fitted state: cycles resolve to this object
        state = dict(vars(est))
        state.update({k: self.decode(v) for k, v in node["fitted"].items()})
        if cls.__module__.startswith("sklearn."):
            import sklearn

            state["_sklearn_version"] = sklearn.__version__  # else sklearn warns on setstate
        # the unpickling route: classes that rebuild caches in __setstate__ do so here too
        est.__setstate__(state)
        return est

    def _skops(self, node: dict) -> Any:
        import skops.io as sio

        data = self._file(node["file"]).read_bytes()
        untrusted = sio.get_untrusted_types(data=data)
        bad = [t for t in untrusted if t.split(".")[0] not in SKOPS_TRUSTED_PREFIXES]
        if bad:
            raise ValueError(f"{node['file']} holds types outside the allowlist "
                             f"{SKOPS_TRUSTED_PREFIXES}: {bad}; refusing to load it")
        est = sio.loads(data, trusted=untrusted)
        if _class_path(type(est)) != node["class"]:
            raise ValueError(f"{node['file']} holds a {_class_path(type(est))}, but the manifest "
                             f"says {node['class']}")
        self.objects[node["id"]] = est
        return est


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


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
        manifest = json.loads(mpath.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{MANIFEST} in {str(folder)!r} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        got = manifest.get("format") if isinstance(manifest, dict) else None
        raise ValueError(f"{MANIFEST} has format {got!r}, expected {FORMAT!r}")
    version = manifest.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ValueError(f"{MANIFEST} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"the folder was saved with format version {version} (uqseg "
            f"{manifest.get('uqseg_version')}), newer than this uqseg ({_uqseg_version()}) reads "
            f"(up to {FORMAT_VERSION}); upgrade uqseg"
        )
    files = manifest.get("files")
    if not isinstance(files, dict) or ARRAYS not in files:
        raise ValueError(f"{MANIFEST} has no valid file list")
    root = folder.resolve()
    for rel, digest in files.items():
        target = (folder / rel).resolve()
        if os.path.isabs(rel) or not target.is_relative_to(root) or target == root / MANIFEST:
            raise ValueError(f"{MANIFEST} lists {rel!r}, which is outside the saved folder")
        if not target.is_file():
            raise FileNotFoundError(f"{rel!r} listed in {MANIFEST} is missing from "
                                    f"{str(folder)!r}")
        if _sha256(target) != digest:
            raise ValueError(f"{rel!r} in {str(folder)!r} does not match the sha256 recorded in "
                             f"{MANIFEST}: the file was modified or corrupted")
    return manifest


def load(path: str | os.PathLike) -> Any:
    """Load what :func:`save` wrote; every file is checked against its sha256 first.

    Parameters
    ----------
    path : str or path-like
        A folder written by :func:`uqseg.save`.

    Returns
    -------
    estimator
        Model paths inside it point at the ONNX files in ``path`` (or the referenced originals
        for ``copy_models=False``).

    Raises
    ------
    ValueError
        Unknown or newer format version, a file that does not match its recorded sha256, or a
        class that is not on the allowlist.
    FileNotFoundError
        A missing folder, file or referenced ONNX model.
    """
    manifest = read_manifest(path)
    folder = Path(path).resolve()
    with np.load(folder / ARRAYS, allow_pickle=False) as arrays:
        return _Decoder(folder, arrays, manifest["files"]).decode(manifest["root"])
