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

import hashlib
import importlib
import inspect
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
# types a skops file may hold beyond those skops trusts itself (exact names: the trees of the
# default quality regressor)
SKOPS_TRUSTED_TYPES = frozenset({"sklearn.tree._tree.Tree", "sklearn.utils._bunch.Bunch"})
MAX_DEPTH = 100  # nesting of the manifest's JSON; real trees stay far below

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
    """Classes whose params and fitted attributes are stored field by field (and checked)."""
    from uqseg._restore import CHECKS

    return _class_path(cls) in CHECKS


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
            if getattr(obj, "precision", None) == "int8":
                raise ValueError(
                    f"{where}: precision='int8' is calibrated on images at fit time and its "
                    "quantised graph is not stored; save the estimator with precision='fp32' "
                    "and refit with precision='int8' on your images after loading")
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
            if params.get("memory") is not None:
                raise ValueError(f"{where}.memory: a joblib cache is not saved (load refuses it: "
                                 "it unpickles files); set memory=None before saving")
            fitted = {k: v for k, v in vars(est).items()
                      if k.endswith("_") and not k.startswith("_") and k not in params}
            return {_TAG: "estimator", "id": ident, "class": name,
                    "params": {k: self.encode(v, f"{where}.{k}") for k, v in params.items()},
                    "fitted": {k: self.encode(v, f"{where}.{k}") for k, v in fitted.items()}}
        if cls.__module__.split(".")[0] != "sklearn":
            raise TypeError(
                f"{where}: {name} is neither a uqseg nor a scikit-learn estimator; only those "
                "can be saved (and loaded back safely)" + (
                    " (a uqseg class needs its restore checks in uqseg._restore.CHECKS)"
                    if cls.__module__.split(".")[0] == "uqseg" else ""))
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


# ---------------------------------------------------------------------------- decoding
def _import_allowed(name: Any, where: str) -> type:
    """Import a class named in a manifest only if its exact name is on the allowlist."""
    from sklearn.base import BaseEstimator

    from uqseg._restore import CHECKS

    if not isinstance(name, str) or name not in CHECKS:
        raise ValueError(f"{where}: the manifest names class {str(name)[:80]!r}, which is not on "
                         f"the allowlist ({', '.join(sorted(CHECKS))}); refusing to load it")
    module, _, qual = name.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), qual)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"{where}: class {name!r} does not exist in this uqseg version "
                         f"({_uqseg_version()})") from exc
    if not (isinstance(cls, type) and issubclass(cls, BaseEstimator) and cls.__module__ == module):
        raise ValueError(f"{where}: {name!r} is not an estimator class")
    return cls


def _kind(node: Any) -> str:
    """What a manifest node is, for the parameters that must be models or estimators."""
    if node is None:
        return "none"
    if isinstance(node, dict) and node.get(_TAG) == "model":
        return "model"
    if isinstance(node, dict) and node.get(_TAG) in ("estimator", "ref", "skops"):
        return "estimator"
    if isinstance(node, str):
        return "plain string"
    return type(node).__name__ if not isinstance(node, dict) else f"{node.get(_TAG)!r} entry"


def _check_kinds(raw: dict, kinds: dict, where: str) -> None:
    for name, allowed in kinds.items():
        if name not in raw:
            continue
        node, key = raw[name], f"{where}.{name}"
        if allowed[0] == "list":
            if isinstance(node, dict) and node.get(_TAG) == "tuple":
                node = node.get("items")
            if not isinstance(node, list):
                raise TypeError(f"{key}: expected a list in the manifest, got {_kind(node)}")
            items, allowed = [(f"{key}[{i}]", n) for i, n in enumerate(node)], allowed[1]
        else:
            items = [(key, node)]
        for k, n in items:
            if _kind(n) not in allowed:
                raise TypeError(f"{k}: expected {' or '.join(allowed)} in the manifest, got "
                                f"{_kind(n)} (a path is only read from the folder's model list)")


def _under(path: str, roots: list[str]) -> bool:
    return any(os.path.commonpath([path, r]) == r for r in roots)


class _Decoder:
    def __init__(self, folder: Path, arrays: Any, files: dict[str, str],
                 trusted: list[Path] | None):
        self.folder = folder
        self.arrays = arrays
        self.files = files
        self.trusted = trusted
        self.objects: dict[int, Any] = {}
        self.done: set[int] = set()  # estimators whose checks have passed

    @staticmethod
    def _get(node: dict, name: str, types: type | tuple, where: str) -> Any:
        value = node.get(name)
        if not isinstance(value, types) or isinstance(value, bool) and bool not in (
                types if isinstance(types, tuple) else (types,)):
            raise ValueError(f"{where}: malformed manifest entry (field {name!r} is "
                             f"{type(value).__name__})")
        return value

    def _file(self, rel: Any, where: str) -> Path:
        if not isinstance(rel, str) or rel not in self.files:
            raise ValueError(f"{where}: the manifest refers to {str(rel)[:80]!r}, which is not in "
                             "its file list")
        return self.folder / rel

    def decode(self, node: Any, where: str) -> Any:
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        if isinstance(node, list):
            return [self.decode(v, f"{where}[{i}]") for i, v in enumerate(node)]
        if not isinstance(node, dict) or not isinstance(node.get(_TAG), str):
            raise ValueError(f"{where}: malformed manifest entry {str(node)[:80]!r}")
        tag = node[_TAG]
        if tag == "float":
            value = self._get(node, "value", str, where)
            if value not in ("nan", "inf", "-inf"):
                raise ValueError(f"{where}: malformed float entry {value[:20]!r}")
            return float(value)
        if tag == "path":
            return Path(self._get(node, "value", str, where))
        if tag in ("ndarray", "npscalar"):
            return self._array(node, tag, where)
        if tag == "dtype":
            value = self._get(node, "value", str, where)
            try:
                dtype = np.dtype(value)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{where}: invalid dtype {value[:40]!r}") from exc
            if dtype.kind not in "biufcUS":
                raise ValueError(f"{where}: dtype {value[:40]!r} is not a plain number or text")
            return dtype
        if tag == "tuple":
            items = self._get(node, "items", list, where)
            return tuple(self.decode(v, f"{where}[{i}]") for i, v in enumerate(items))
        if tag == "dict":
            out = {}
            for item in self._get(node, "items", list, where):
                if not (isinstance(item, list) and len(item) == 2):
                    raise ValueError(f"{where}: malformed dict entry {str(item)[:80]!r}")
                key = _hashable(self.decode(item[0], f"{where} key"))
                if not _plain_key(key):
                    raise ValueError(f"{where}: dict key of type {type(key).__name__}")
                out[key] = self.decode(item[1], f"{where}[{key!r}]")
            return out
        if tag in ("generator", "randomstate"):
            return self._rng(node, tag, where)
        if tag == "model":
            return self._model(node, where)
        if tag == "ref":
            ident = self._get(node, "id", int, where)
            if ident not in self.done:
                raise ValueError(f"{where}: refers to estimator #{ident}, which is not defined "
                                 "before it (or contains this entry)")
            return self.objects[ident]
        if tag == "estimator":
            return self._estimator(node, where)
        if tag == "skops":
            return self._skops(node, where)
        raise ValueError(f"{where}: unknown manifest entry type {tag[:40]!r}")

    def _array(self, node: dict, tag: str, where: str) -> Any:
        key = self._get(node, "key", str, where)
        if key not in self.arrays.files:
            raise ValueError(f"{where}: array {key[:40]!r} is missing from {ARRAYS}")
        try:
            arr = self.arrays[key]
        except ValueError as exc:  # object arrays need pickle: refused
            raise ValueError(f"{where}: array {key!r} cannot be read without pickle") from exc
        if arr.dtype.kind not in "biufcUSmM":
            raise ValueError(f"{where}: array {key!r} has dtype {arr.dtype}, not plain data")
        if tag == "npscalar":
            if arr.ndim:
                raise ValueError(f"{where}: scalar {key!r} has shape {arr.shape}")
            return arr[()]
        return arr

    def _rng(self, node: dict, tag: str, where: str) -> Any:
        state = self.decode(node.get("state"), f"{where}.state")
        try:
            if tag == "randomstate":
                rs = np.random.RandomState()
                rs.set_state(state)
                return rs
            name = state.get("bit_generator") if isinstance(state, dict) else None
            if name not in ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64"):
                raise ValueError(f"unknown bit generator {str(name)[:40]!r}")
            gen = np.random.Generator(getattr(np.random, name)())
            gen.bit_generator.state = state
            return gen
        except (ValueError, TypeError, KeyError, IndexError, OverflowError) as exc:
            raise ValueError(f"{where}: invalid random generator state: {exc}") from exc

    def _model(self, node: dict, where: str) -> str | Path:
        kind = node.get("type", "str")
        if kind not in ("str", "path"):
            raise ValueError(f"{where}: malformed model entry (type {str(kind)[:20]!r})")
        if "file" in node:
            rel = self._get(node, "file", str, where)
            path = self._file(rel, where).resolve()
            self._external_data(path, rel, where)
        else:
            path = Path(self._reference(node, where))
        return path if kind == "path" else str(path)

    def _external_data(self, path: Path, rel: str, where: str) -> None:
        """Weights stored next to a model must be in the file list too (so hashed)."""
        from uqseg.backends._model import external_locations, read_model

        try:
            proto, _ = read_model(path)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: {rel!r} is not a valid ONNX model: {exc}") from exc
        base = PurePosixPath(rel).parent
        for loc in external_locations(proto):
            if str(base / PurePosixPath(Path(loc).as_posix())) not in self.files:
                raise ValueError(f"{where}: {rel!r} reads external data {loc[:80]!r}, which is "
                                 "not in the manifest's file list")

    def _reference(self, node: dict, where: str) -> str:
        """A model outside the folder (``copy_models=False``): only under ``trusted_paths``.

        Refusals say nothing about the outside file (not whether it exists, nor its hash)."""
        ref = self._get(node, "ref", str, where)
        digest = self._get(node, "sha256", str, where)
        if self.trusted is None:
            raise ValueError(f"{where}: refers to a model outside the saved folder ({ref[:200]!r}"
                             ", saved with copy_models=False); nothing outside the folder is "
                             "read unless you opt in: uqseg.load(path, trusted_paths=[folder "
                             "holding the model])")
        path = os.path.normpath(ref) if os.path.isabs(ref) and "\0" not in ref else None
        roots = [str(p) for p in self.trusted]
        if path is None or not _under(path, roots) or not _under(
                os.path.realpath(path), [os.path.realpath(r) for r in roots]):
            raise ValueError(f"{where}: refers to a model outside the saved folder "
                             f"({ref[:200]!r}) that is not under trusted_paths")
        real = os.path.realpath(path)
        if not os.path.isfile(real):
            raise FileNotFoundError(f"{where}: the referenced model {ref!r} (under "
                                    "trusted_paths) is missing")
        if _sha256(Path(real)) != digest:
            raise ValueError(f"{where}: the referenced model {ref!r} changed since it was saved "
                             "(its sha256 differs from the recorded one)")
        return real

    def _estimator(self, node: dict, where: str) -> Any:
        from uqseg import _restore

        cls = _import_allowed(node.get("class"), where)
        spec = _restore.CHECKS[_class_path(cls)]
        ident = self._get(node, "id", int, where)
        raw_params = self._get(node, "params", dict, where)
        raw_fitted = self._get(node, "fitted", dict, where)
        if spec.migrate is not None:  # parameters of a folder written by an earlier uqseg
            raw_params = spec.migrate(raw_params, where)
        if ident in self.objects:
            raise ValueError(f"{where}: estimator #{ident} is defined twice")
        names = set(cls._get_param_names())
        for name, par in inspect.signature(cls.__init__).parameters.items():
            if name in names and par.default is par.empty and name not in raw_params:
                raise ValueError(f"{where}.{name}: required parameter missing from the manifest")
        for key in raw_params:
            if key not in names:
                raise ValueError(f"{where}.{key}: not a parameter of {_class_path(cls)}")
        for key in raw_fitted:
            if key in names or not key.endswith("_") or not key[:1].isalpha() or not all(
                    c.isalnum() or c == "_" for c in key) or not key.isascii():
                raise ValueError(f"{where}.{key[:60]}: not a fitted attribute name")
        _check_kinds(raw_params, spec.node_kinds, where)
        _check_kinds(raw_fitted, spec.fitted_node_kinds, where)
        params = {k: self.decode(v, f"{where}.{k}") for k, v in raw_params.items()}
        _restore.check_side_effects(params, where)
        est = cls(**params)
        spec.params(est, where)
        self.objects[ident] = est
        fitted = {k: self.decode(v, f"{where}.{k}") for k, v in raw_fitted.items()}
        state = dict(vars(est))
        state.update(fitted)
        if cls.__module__.startswith("sklearn."):
            import sklearn

            state["_sklearn_version"] = sklearn.__version__  # else sklearn warns on setstate
        # the unpickling route: classes that rebuild caches in __setstate__ do so here too
        est.__setstate__(state)
        spec.fitted(est, fitted, where)
        self.done.add(ident)
        return est

    def _skops(self, node: dict, where: str) -> Any:
        import skops.io as sio
        from sklearn.base import BaseEstimator

        from uqseg import _restore

        ident = self._get(node, "id", int, where)
        name = self._get(node, "class", str, where)
        if ident in self.objects:
            raise ValueError(f"{where}: estimator #{ident} is defined twice")
        rel = self._get(node, "file", str, where)
        data = self._file(rel, where).read_bytes()
        try:
            untrusted = sio.get_untrusted_types(data=data)
        except Exception as exc:  # not a skops archive
            raise ValueError(f"{where}: {rel!r} is not a valid skops file: {exc}") from exc
        bad = [t for t in untrusted if t not in SKOPS_TRUSTED_TYPES]
        if bad:
            raise ValueError(f"{where}: {rel} holds types outside the allowlist "
                             f"{sorted(SKOPS_TRUSTED_TYPES)}: {bad}; refusing to load it")
        try:
            est = sio.loads(data, trusted=untrusted)
        except Exception as exc:  # skops raises many kinds on malformed archives
            raise ValueError(f"{where}: {rel!r} cannot be loaded: {exc}") from exc
        if not isinstance(est, BaseEstimator) or _class_path(type(est)) != name \
                or not name.startswith("sklearn."):
            raise ValueError(f"{where}: {rel} holds a {_class_path(type(est))}, but the manifest "
                             f"says {name[:80]}")
        _restore.check_side_effects(est.get_params(deep=True), where)
        self.objects[ident] = est
        self.done.add(ident)
        return est


def _plain_key(key: Any) -> bool:
    return isinstance(key, (str, int, float, bool, type(None))) or (
        isinstance(key, tuple) and all(_plain_key(k) for k in key))


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, list) else key


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
