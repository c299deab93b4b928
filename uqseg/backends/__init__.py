"""Inference backends behind one tiny interface.

``load(model, backend="auto", device="auto", precision="fp32", outputs=None)`` returns a
:class:`Runner` with ``input_names``, ``output_names`` and ``run(feeds) -> dict``. The
estimators never know which engine runs.
"""

from __future__ import annotations

import os

from uqseg._optional import is_available
from uqseg.backends import graph
from uqseg.backends._model import ModelLike, describe, read_model, with_external_data
from uqseg.backends.base import Runner

BACKENDS = ("auto", "onnxruntime", "tensorrt")
DEVICES = ("auto", "cpu", "cuda", "tensorrt")
PRECISIONS = ("fp32", "fp16")

__all__ = ["BACKENDS", "DEVICES", "PRECISIONS", "Runner", "available_backends", "graph", "load",
           "resolve"]


def _ort_providers() -> list[str]:
    from uqseg.backends.onnxruntime import available_providers

    return available_providers()


def _has_cuda_gpu() -> bool:
    if not is_available("cupy"):
        return False
    import cupy

    try:
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def available_backends() -> list[tuple[str, str]]:
    """(backend, device) pairs usable here, fastest first."""
    found = []
    if is_available("tensorrt") and _has_cuda_gpu():
        found.append(("tensorrt", "cuda"))
    providers = _ort_providers()
    if "TensorrtExecutionProvider" in providers:
        found.append(("onnxruntime", "tensorrt"))
    if "CUDAExecutionProvider" in providers:
        found.append(("onnxruntime", "cuda"))
    found.append(("onnxruntime", "cpu"))
    return found


def resolve(backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """Turn ``auto`` choices into a concrete (backend, device) pair, checking availability."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    dev, _ = _split_device(device)
    if dev not in DEVICES:
        raise ValueError(f"unknown device {device!r}; choose one of {DEVICES} (or 'cuda:N')")
    options = available_backends()
    if backend == "auto" and dev == "auto":
        return options[0]
    if backend == "auto":
        if dev == "cpu":
            return ("onnxruntime", "cpu")
        for b, d in options:
            if d == dev or (dev == "cuda" and d in ("cuda", "tensorrt")):
                return (b, d)
        raise RuntimeError(
            f"device {device!r} is not available here (usable: {options}); install "
            "'uqseg[gpu]' (onnxruntime-gpu) or 'uqseg[trt]' (TensorRT) on a machine with a GPU"
        )
    if backend == "tensorrt":
        if dev == "cpu":
            raise ValueError("backend='tensorrt' runs on a GPU only; use device='cuda' or 'auto'")
        if not is_available("tensorrt"):
            raise ImportError("backend='tensorrt' needs TensorRT; run: pip install 'uqseg[trt]'")
        return ("tensorrt", "cuda")
    # onnxruntime
    if dev == "auto":
        return next((b, d) for b, d in options if b == "onnxruntime")
    return ("onnxruntime", dev)


def cached_runner(cache: dict, key, lock, build):
    """The runner ``cache[key]``, built by ``build()`` on first use; double-checked under
    ``lock`` so that concurrent callers build it once and hits take no lock."""
    runner = cache.get(key)
    if runner is None:
        with lock:
            runner = cache.get(key)
            if runner is None:
                runner = cache[key] = build()
    return runner


def _split_device(device: str) -> tuple[str, int]:
    if not isinstance(device, str):
        raise TypeError(f"device must be a string, got {type(device).__name__}")
    if device.startswith("cuda:"):
        idx = device.split(":", 1)[1]
        if not idx.isdigit():
            raise ValueError(f"unknown device {device!r}; expected 'cuda:N'")
        return "cuda", int(idx)
    return device, 0


def load(
    model: ModelLike,
    backend: str = "auto",
    device: str = "auto",
    precision: str = "fp32",
    outputs: list[str] | tuple[str, ...] | None = None,
    *,
    threads: int | None = None,
    max_batch: int = 32,
    cache_dir: str | os.PathLike | None = None,
) -> Runner:
    """Build a runner for an ONNX model.

    Parameters
    ----------
    model : path, bytes or onnx.ModelProto
    backend : {"auto", "onnxruntime", "tensorrt"}
        ``auto`` takes the fastest one present: native TensorRT, then ONNX Runtime with the
        TensorRT, CUDA or CPU provider.
    device : {"auto", "cpu", "cuda", "cuda:N", "tensorrt"}
        ``tensorrt`` with ``backend="onnxruntime"`` selects ONNX Runtime's TensorRT provider.
    precision : {"fp32", "fp16"}
        ``fp16`` converts the graph to float16 with fp32 inputs/outputs kept (GPU backends).
    outputs : list of str, optional
        Intermediate tensors to expose as extra outputs (see :mod:`uqseg.backends.graph`).
    threads : int, optional
        Intra-op threads on the CPU (default: the cores this process may use).

    Returns
    -------
    Runner
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; choose one of {PRECISIONS}")
    proto, folder = read_model(model)
    # every external tensor embedded: engines get self-contained bytes, never a path
    proto = with_external_data(proto, folder, describe(model))
    if outputs:
        proto = graph.expose(proto, list(outputs))
    name, dev = resolve(backend, device)
    _, device_id = _split_device(device)
    fp16 = precision == "fp16"
    if name == "tensorrt":
        from uqseg.backends.tensorrt import TensorRTRunner

        return TensorRTRunner(proto, fp16=fp16, max_batch=max_batch, cache_dir=cache_dir,
                              device_id=device_id)
    from uqseg.backends.onnxruntime import OnnxRuntimeRunner

    if fp16 and dev != "tensorrt":
        from uqseg.backends.tensorrt import to_fp16

        proto = to_fp16(proto)
    return OnnxRuntimeRunner(proto, dev, threads=threads, cache_dir=cache_dir,
                             max_batch=max_batch, fp16=fp16, device_id=device_id)
