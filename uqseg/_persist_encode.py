"""Encoding for :func:`uqseg.save`: an object tree to JSON nodes, ``.npz`` arrays, ONNX
files and skops files."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import numpy as np

from uqseg._persist_format import _TAG, _class_path, _is_native, _is_onnx_path, _sha256


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
