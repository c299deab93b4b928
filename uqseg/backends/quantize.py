"""Static int8 quantisation for the CPU with ONNX Runtime's own tools, cached on disk.

QDQ format, per-channel symmetric int8 weights, activations calibrated (min/max) on images the
caller gives. The operators of ``QUANTIZED_OPS`` (convolutions and what lies between them in a
U-Net) are quantised; the rest (normalisation, softmax/sigmoid heads, exotic operators) keep
float32, where int8 costs accuracy and gains little time. The quantised model is written to
the cache folder under a key of everything it depends on (model bytes, calibration images,
settings, ONNX Runtime version), so a second ``fit`` on the same data reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

__all__ = ["QUANTIZED_OPS", "quantize_int8"]

# measured (benchmarks/bench_int8.py): quantising only the convolutions leaves a Q/DQ pair
# around every ReLU, pooling and concatenation and made the zoo's width-8 members 0.88x as
# fast as float32; with these the int8 chain runs through, 1.12x, and agrees better
QUANTIZED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Relu", "MaxPool", "Concat",
                 "Resize", "Add", "Mul")
MAX_CALIBRATION_IMAGES = 64  # min/max calibration saturates long before this


def _key(model_bytes: bytes, calib: np.ndarray, input_name: str, extra: dict) -> str:
    import onnxruntime

    h = hashlib.sha256()
    h.update(model_bytes)
    h.update(np.ascontiguousarray(calib).tobytes())
    h.update(json.dumps({"input": input_name, "shape": list(calib.shape),
                         "ort": onnxruntime.__version__, "ops": QUANTIZED_OPS, **extra},
                        sort_keys=True).encode())
    return h.hexdigest()[:32]


def quantize_int8(proto: onnx.ModelProto, calibration: np.ndarray, input_name: str, *,
                  extra_inputs: dict | None = None, cache_dir: str | os.PathLike | None = None
                  ) -> tuple[Path, bool]:
    """Quantise ``proto`` (self-contained: no external data) to int8 QDQ.

    Parameters
    ----------
    proto : onnx.ModelProto
    calibration : array ``(N, C, *spatial)`` float32
        Images the activation ranges are calibrated on (at most
        ``MAX_CALIBRATION_IMAGES``, taken evenly).
    input_name : str
        The image input.
    extra_inputs : dict, optional
        Constant feeds for other inputs (e.g. an all-ones MC-dropout mask, per image).
    cache_dir : path, optional
        Default ``$UQSEG_CACHE_DIR`` or ``~/.cache/uqseg``; the model goes to ``int8/``.

    Returns
    -------
    (path of the quantised model, whether it came from the cache)
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    from uqseg.backends.onnxruntime import _default_cache

    calib = np.asarray(calibration, dtype=np.float32)
    if calib.ndim < 4 or calib.shape[0] == 0:
        raise ValueError(f"int8 calibration needs images (N, C, *spatial) with N >= 1, got "
                         f"shape {calib.shape}")
    if not np.isfinite(calib).all():
        raise ValueError("int8 calibration images contain NaN or infinite values")
    if calib.shape[0] > MAX_CALIBRATION_IMAGES:
        idx = np.linspace(0, calib.shape[0] - 1, MAX_CALIBRATION_IMAGES).round().astype(int)
        calib = calib[idx]
    model_bytes = proto.SerializeToString()
    extra = {k: np.asarray(v).tolist() for k, v in (extra_inputs or {}).items()}
    folder = Path(cache_dir or _default_cache()) / "int8"
    target = folder / f"{_key(model_bytes, calib, input_name, {'extra': extra})}.onnx"
    if target.is_file():
        return target, True
    folder.mkdir(parents=True, exist_ok=True)

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._items = iter(range(calib.shape[0]))

        def get_next(self):
            i = next(self._items, None)
            if i is None:
                return None
            feeds = {input_name: calib[i:i + 1]}
            for k, v in (extra_inputs or {}).items():
                feeds[k] = np.asarray(v, dtype=np.float32)[None]
            return feeds

    with tempfile.TemporaryDirectory(prefix="uqseg-int8-") as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        src.write_bytes(model_bytes)
        quantize_static(
            str(src), str(dst), Reader(), quant_format=QuantFormat.QDQ,
            per_channel=True, weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
            op_types_to_quantize=list(QUANTIZED_OPS),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        # written under a temporary name, then renamed: readers never see half a file
        part = target.with_suffix(f".{os.getpid()}.part")
        part.write_bytes(dst.read_bytes())
        os.replace(part, target)
    return target, False
