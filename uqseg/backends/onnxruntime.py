"""ONNX Runtime backend: CPU, CUDA and TensorRT execution providers."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx

from uqseg.backends._model import assert_self_contained, content_hash, model_bytes
from uqseg.backends.base import Runner

_ONNX_TO_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32,
    onnx.TensorProto.FLOAT16: np.float16,
    onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64,
    onnx.TensorProto.INT32: np.int32,
}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


def _physical_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # macOS / Windows
        return max(1, os.cpu_count() or 1)


class OnnxRuntimeRunner(Runner):
    """Runs a model with an ONNX Runtime ``InferenceSession``.

    ``device='cpu'`` uses the CPU provider; ``'cuda'`` the CUDA provider with I/O binding;
    ``'tensorrt'`` the TensorRT provider (engines cached on disk, CUDA and CPU as fallbacks).
    """

    backend = "onnxruntime"

    def __init__(
        self,
        proto: onnx.ModelProto,
        device: str = "cpu",
        *,
        threads: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_batch: int = 32,
        fp16: bool = False,
        device_id: int = 0,
        spin: bool = True,
    ) -> None:
        super().__init__()
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        if threads:
            opts.intra_op_num_threads = int(threads)
        elif _physical_cores() < (os.cpu_count() or 1):
            opts.intra_op_num_threads = _physical_cores()  # restricted affinity: stay inside it
        # else ONNX Runtime's own pool: one thread per core, pinned (measured a few % faster)
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        if device == "cpu" and not spin:
            # busy-waiting workers steal cores from other busy processes; spinning (ONNX
            # Runtime's default) is faster on a machine of one's own (measured both ways)
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.device = device
        self._device_id = device_id
        providers = self._providers(proto, device, cache_dir, max_batch, fp16, device_id)
        available = set(ort.get_available_providers())
        needed = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
        if needed not in available:
            raise RuntimeError(
                f"onnxruntime has no {needed} here (available: {sorted(available)}); install "
                "'uqseg[gpu]' (onnxruntime-gpu) on a machine with an NVIDIA GPU"
            )
        # bytes with no external reference left: ONNX Runtime would resolve one against the
        # working directory (it has no model path); see uqseg.backends._model
        assert_self_contained(proto)
        try:
            self._session = ort.InferenceSession(model_bytes(proto), opts, providers=providers)
        except Exception as exc:
            raise ValueError(f"onnxruntime could not load the model: {exc}") from exc
        self.providers = self._session.get_providers()
        for inp in self._session.get_inputs():
            self.input_names.append(inp.name)
            self.input_shapes[inp.name] = tuple(
                d if isinstance(d, int) else None for d in inp.shape)
            self.input_dtypes[inp.name] = np.dtype(_ort_type(inp.type))
        self.output_names = [o.name for o in self._session.get_outputs()]
        self._use_binding = device in ("cuda", "tensorrt")

    @staticmethod
    def _providers(proto, device, cache_dir, max_batch, fp16, device_id):
        if device == "cpu":
            return ["CPUExecutionProvider"]
        cuda = ("CUDAExecutionProvider", {
            "device_id": device_id,
            # fp16 convolutions pick fast algorithms only with a large workspace
            "cudnn_conv_use_max_workspace": "1",
            "cudnn_conv_algo_search": "EXHAUSTIVE",
        })
        if device == "cuda":
            return [cuda, "CPUExecutionProvider"]
        if device == "tensorrt":
            cache = Path(cache_dir or _default_cache()) / "ort_trt" / content_hash(proto)[:16]
            cache.mkdir(parents=True, exist_ok=True)
            trt_opts = {
                "device_id": device_id,
                "trt_engine_cache_enable": True,
                "trt_engine_cache_path": str(cache),
                "trt_timing_cache_enable": True,
                "trt_timing_cache_path": str(cache),
                "trt_fp16_enable": bool(fp16),
            }
            profile = _trt_profile_shapes(proto, max_batch)
            if profile is not None:
                trt_opts.update(profile)
            return [("TensorrtExecutionProvider", trt_opts), cuda, "CPUExecutionProvider"]
        raise ValueError(
            f"unknown device {device!r} for onnxruntime; use 'cpu', 'cuda' or 'tensorrt'")

    def _run_impl(self, feeds, outputs):
        if not self._use_binding:
            values = self._session.run(outputs, feeds)
            return dict(zip(outputs, values, strict=True))
        binding = self._session.io_binding()
        for name, arr in feeds.items():
            binding.bind_cpu_input(name, arr)
        for name in outputs:
            binding.bind_output(name, "cuda", self._device_id)
        self._session.run_with_iobinding(binding)
        values = binding.copy_outputs_to_cpu()
        return dict(zip(outputs, values, strict=True))

    def close(self) -> None:
        self._session = None


def _ort_type(type_str: str):
    table = {
        "tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
        "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(uint8)": np.uint8,
        "tensor(bool)": np.bool_,
    }
    if type_str not in table:
        raise ValueError(f"unsupported model input type {type_str}")
    return table[type_str]


def _default_cache() -> Path:
    return Path(os.environ.get("UQSEG_CACHE_DIR", Path.home() / ".cache" / "uqseg"))


def _trt_profile_shapes(proto: onnx.ModelProto, max_batch: int) -> dict | None:
    """min/opt/max shapes so the TensorRT provider builds one engine for all batch sizes."""
    init = {t.name for t in proto.graph.initializer}
    mins, opts, maxs = [], [], []
    for inp in proto.graph.input:
        if inp.name in init:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else None for d in
                inp.type.tensor_type.shape.dim]
        if any(d is None for d in dims[1:]):
            return None  # dynamic spatial axes: let the provider profile what it sees
        tail = "x".join(str(d) for d in dims[1:])
        # a static batch is its own min, opt and max (TensorRT refuses any other profile)
        lo, mid, hi = (dims[0],) * 3 if dims and dims[0] else (1, max(1, max_batch // 2),
                                                               max_batch)
        mins.append(f"{inp.name}:{lo}x{tail}")
        opts.append(f"{inp.name}:{mid}x{tail}")
        maxs.append(f"{inp.name}:{hi}x{tail}")
    return {
        "trt_profile_min_shapes": ",".join(mins),
        "trt_profile_opt_shapes": ",".join(opts),
        "trt_profile_max_shapes": ",".join(maxs),
    }
