"""Decoding for :func:`uqseg.load`: JSON nodes back to objects, every class checked against
the allowlist of :mod:`uqseg._restore` before it is imported."""

from __future__ import annotations

import importlib
import inspect
import os
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from uqseg._persist_format import (
    _TAG,
    ARRAYS,
    SKOPS_TRUSTED_TYPES,
    _class_path,
    _sha256,
    _uqseg_version,
)


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
