"""Native TensorRT backend (TensorRT 10+ API, named tensors, CuPy for device memory).

The engine is built from the ONNX graph with one optimisation profile for the batch axis,
serialised to disk under a key of model content, precision, profile, GPU, CUDA and TensorRT
versions (an engine is valid only for that exact combination), and reused on the next load.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx

from uqseg._optional import import_optional
from uqseg.backends._model import assert_self_contained, model_bytes
from uqseg.backends.base import Runner
from uqseg.backends.onnxruntime import _default_cache


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """fp16 graph with fp32 inputs/outputs kept (TensorRT 11 is strongly typed)."""
    f16 = import_optional(
        "onnxconverter_common.float16", extra="trt", purpose="fp16 conversion of the ONNX graph"
    )
    return f16.convert_float_to_float16(proto, keep_io_types=True)


def _trt_dtype_to_numpy(trt, dtype):
    table = {
        trt.float32: np.float32,
        trt.float16: np.float16,
        trt.int32: np.int32,
        trt.int8: np.int8,
        trt.bool: np.bool_,
    }
    if hasattr(trt, "int64"):
        table[trt.int64] = np.int64
    if dtype not in table:
        raise TypeError(f"TensorRT tensor type {getattr(dtype, 'name', dtype)} has no numpy "
                        f"equivalent here (supported: {[t.name for t in table]})")
    return table[dtype]


class TensorRTRunner(Runner):
    """Runs a TensorRT engine built from an ONNX model; inputs and outputs by tensor name."""

    backend = "tensorrt"

    def __init__(
        self,
        proto: onnx.ModelProto,
        *,
        fp16: bool = False,
        max_batch: int = 32,
        cache_dir: str | os.PathLike | None = None,
        device_id: int = 0,
        workspace_gib: float = 4.0,
    ) -> None:
        super().__init__()
        trt = import_optional("tensorrt", extra="trt", purpose="the native TensorRT backend")
        cp = import_optional("cupy", extra="trt", purpose="device buffers of the TensorRT backend")
        self._trt, self._cp = trt, cp
        self.device = "cuda"
        cp.cuda.Device(device_id).use()
        if fp16:
            proto = to_fp16(proto)
        self._logger = trt.Logger(trt.Logger.WARNING)
        # the parser gets these self-contained bytes and no path: external weights would be
        # resolved against the working directory (parse(data, path) or parse_from_file would
        # let the model name files); uqseg.backends._model embedded them already
        assert_self_contained(proto)
        data = model_bytes(proto)
        shapes = self._profile_shapes = self._profile(proto, max_batch)
        key = self._cache_key(data, fp16, shapes, device_id)
        cache = Path(cache_dir or _default_cache()) / "trt"
        cache.mkdir(parents=True, exist_ok=True)
        engine_path = cache / f"{key}.engine"
        runtime = trt.Runtime(self._logger)
        engine = None
        if engine_path.exists():
            engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        if engine is None:
            blob = self._build(data, shapes, fp16, cache / "timing.cache", workspace_gib)
            tmp = engine_path.with_suffix(".tmp")
            tmp.write_bytes(blob)
            tmp.replace(engine_path)
            engine = runtime.deserialize_cuda_engine(blob)
        if engine is None:
            raise RuntimeError("TensorRT could not deserialise the engine it built")
        self._engine = engine
        self._context = engine.create_execution_context()
        self._stream = cp.cuda.Stream(non_blocking=True)  # TRT warns on the default stream
        for i in range(engine.num_io_tensors):
            name = engine.get_tensor_name(i)
            dtype = np.dtype(_trt_dtype_to_numpy(trt, engine.get_tensor_dtype(name)))
            if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.input_names.append(name)
                self.input_dtypes[name] = dtype
                self.input_shapes[name] = tuple(
                    d if d >= 0 else None for d in engine.get_tensor_shape(name)
                )
            else:
                self.output_names.append(name)
        self.providers = ["TensorRT"]

    def _profile(self, proto, max_batch):
        init = {t.name for t in proto.graph.initializer}
        shapes = {}
        for inp in proto.graph.input:
            if inp.name in init:
                continue
            dims = [
                d.dim_value if d.HasField("dim_value") else -1
                for d in inp.type.tensor_type.shape.dim
            ]
            if any(d < 0 for d in dims[1:]):
                raise ValueError(
                    f"input {inp.name!r} has dynamic spatial axes {dims}; the native TensorRT "
                    "backend needs a fixed spatial size (export with dynamic_spatial=False) "
                    "or use backend='onnxruntime'"
                )
            tail = tuple(dims[1:])
            if dims and dims[0] > 0:  # static batch: TensorRT wants min = opt = max = it
                shapes[inp.name] = (tuple(dims),) * 3
                continue
            shapes[inp.name] = ((1, *tail), (max(1, max_batch // 2), *tail), (max_batch, *tail))
        return shapes

    def _cache_key(self, data, fp16, shapes, device_id):
        cp = self._cp
        props = cp.cuda.runtime.getDeviceProperties(device_id)
        ident = {
            "model": hashlib.sha256(data).hexdigest(),
            "fp16": fp16,
            "profile": {k: [list(s) for s in v] for k, v in shapes.items()},
            "trt": self._trt.__version__,
            "cuda": cp.cuda.runtime.runtimeGetVersion(),
            "gpu": props["name"].decode() if isinstance(props["name"], bytes) else props["name"],
            "cc": f"{props['major']}.{props['minor']}",
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def _build(self, data, shapes, fp16, timing_path, workspace_gib):
        trt = self._trt
        builder = trt.Builder(self._logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
            # the fp16 graph already carries its precision; TRT 11 has no FP16 builder flag
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, self._logger)
        if not parser.parse(data):
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ValueError("TensorRT could not parse the ONNX model: " + "; ".join(errors))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gib * (1 << 30)))
        profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes.items():
            profile.set_shape(name, lo, opt, hi)
        config.add_optimization_profile(profile)
        timing = config.create_timing_cache(
            timing_path.read_bytes() if timing_path.exists() else b""
        )
        config.set_timing_cache(timing, ignore_mismatch=False)
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise RuntimeError("TensorRT failed to build an engine for this model")
        timing_path.write_bytes(memoryview(config.get_timing_cache().serialize()))
        return bytes(blob)

    def _run_impl(self, feeds, outputs):
        cp, ctx = self._cp, self._context
        with self._stream:
            keep = {}
            for name, arr in feeds.items():
                dev = cp.asarray(arr)
                keep[name] = dev
                if not ctx.set_input_shape(name, arr.shape):
                    lo, _, hi = self._profile_shapes.get(name, ((), (), ()))
                    raise ValueError(
                        f"input {name!r} of shape {arr.shape} is outside the engine's "
                        f"optimisation profile (min {lo}, max {hi}); use a smaller batch_size "
                        "or a larger max_batch")
                ctx.set_tensor_address(name, dev.data.ptr)
            results = {}
            for name in self.output_names:
                shape = tuple(ctx.get_tensor_shape(name))
                dtype = _trt_dtype_to_numpy(self._trt, self._engine.get_tensor_dtype(name))
                dev = cp.empty(shape, dtype=dtype)
                results[name] = dev
                ctx.set_tensor_address(name, dev.data.ptr)
            if not ctx.execute_async_v3(self._stream.ptr):
                raise RuntimeError("TensorRT execution failed")
            out = {n: cp.asnumpy(results[n], stream=self._stream) for n in outputs}
            self._stream.synchronize()
        return out

    def close(self) -> None:
        self._context = None
        self._engine = None
