"""Static int8 quantisation for the CPU with ONNX Runtime's own tools, cached on disk.

QDQ format, per-channel symmetric int8 weights, activations calibrated (min/max) on images the
caller gives. The operators of ``QUANTIZED_OPS`` (convolutions and what lies between them in a
U-Net) are quantised; the rest (normalisation, softmax/sigmoid heads, exotic operators) keep
float32, where int8 costs accuracy and gains little time. The quantised model is written to
the cache folder under a key of everything it depends on (model bytes, calibration images,
settings, ONNX Runtime version), so a second ``fit`` on the same data reuses it.

Before quantising, 2-D ``ConvTranspose`` upsamplings whose kernel equals their stride (the
U-Net's) with at least ``DEPTH_TO_SPACE_MIN_CHANNELS`` input channels are rewritten as the
same 1x1 ``Conv`` followed by ``DepthToSpace``: ONNX Runtime has no int8 kernel for
``ConvTranspose`` and ran it in float32 between a dequantise and a quantise, 23% of a width-32
U-Net's int8 time (measured: ``benchmarks/bench_int8.py``). Operators that combine the image's
tensors with another input (an MC-dropout mask) stay float32.
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
# the rewrite turns float32 arithmetic (C_in MACs per output value) into int8 arithmetic plus
# a DepthToSpace that moves every output value once, so it pays on wide layers only. Measured
# (8 slices, blocks of calls, speed-up over float32): width-32 U-Net (upsamplings of 256, 128
# and 64 input channels) none 2.02x, C_in >= 128 2.13x, all 2.24-2.33x; the zoo's width-8
# members (64, 32, 16) none 1.11x / 1.03x, all 1.09x / 0.99x (member 0 / member 4)
DEPTH_TO_SPACE_MIN_CHANNELS = 64
MAX_CALIBRATION_IMAGES = 64  # min/max calibration saturates long before this


def _upsampling_as_depth_to_space(proto: onnx.ModelProto, min_channels: int = 0
                                  ) -> tuple[onnx.ModelProto, int]:
    """``proto`` with every 2-D ``ConvTranspose`` of kernel == stride (no padding, groups,
    dilation or output padding; constant weights; at least ``min_channels`` input channels)
    replaced by a 1x1 ``Conv`` and
    ``DepthToSpace`` (CRD) computing the same outputs under the same tensor names; and the
    number replaced. Output ``(co, s i + a, s j + b)`` is input channel ``co s^2 + a s + b`` of
    the 1x1 convolution whose weights are ``W[:, co, a, b]``."""
    from onnx import helper, numpy_helper

    model = onnx.ModelProto()
    model.CopyFrom(proto)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    nodes, count, replaced = [], 0, set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        w = inits.get(node.input[1]) if node.op_type == "ConvTranspose" else None
        weight = numpy_helper.to_array(w) if w is not None else None
        if weight is None or weight.ndim != 4:
            nodes.append(node)
            continue
        kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
        stride = list(attrs.get("strides", [1, 1]))
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        plain = (kernel == stride and kernel[0] == kernel[1] and kernel[0] > 1
                 and attrs.get("group", 1) == 1 and "output_shape" not in attrs
                 and not any(attrs.get("pads", [])) and not any(attrs.get("output_padding", []))
                 and all(d == 1 for d in attrs.get("dilations", [1, 1]))
                 and (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad)
                 in ("NOTSET", "VALID"))
        if not plain:
            nodes.append(node)
            continue
        s, (cin, cout) = kernel[0], weight.shape[:2]
        if cin < min_channels:
            nodes.append(node)
            continue
        out = node.output[0]
        w1 = weight.transpose(1, 2, 3, 0).reshape(cout * s * s, cin, 1, 1)
        graph.initializer.append(numpy_helper.from_array(w1, f"{out}/d2s_weight"))
        inputs = [node.input[0], f"{out}/d2s_weight"]
        if len(node.input) > 2 and node.input[2]:
            bias = numpy_helper.to_array(inits[node.input[2]])
            graph.initializer.append(numpy_helper.from_array(np.repeat(bias, s * s),
                                                             f"{out}/d2s_bias"))
            inputs.append(f"{out}/d2s_bias")
        nodes.append(helper.make_node("Conv", inputs, [f"{out}/d2s_channels"],
                                      name=f"{node.name or out}/d2s_conv", kernel_shape=[1, 1]))
        nodes.append(helper.make_node("DepthToSpace", [f"{out}/d2s_channels"], [out],
                                      name=f"{node.name or out}/d2s", blocksize=s, mode="CRD"))
        count += 1
        replaced.update(node.input[1:])
    if count:
        del graph.node[:]
        graph.node.extend(nodes)
        # the replaced weights, unless still read (by a node, or as graph inputs)
        used = {i for n in graph.node for i in n.input} | {i.name for i in graph.input}
        kept = [i for i in graph.initializer if i.name in used or i.name not in replaced]
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return model, count


def _fed_by_other_inputs(proto: onnx.ModelProto, input_name: str) -> list[str]:
    """Names of the nodes that combine the image's tensors with a tensor computed only from
    another graph input (an MC-dropout mask); unnamed nodes are named in place first. They
    stay float32: a quantised multiply by a broadcast mask took 3.9 ms where the float one
    takes 0.4 ms (8 slices of the zoo's MC-dropout member), making int8 slower than float32."""
    inits = {i.name for i in proto.graph.initializer}
    mask_only = {i.name for i in proto.graph.input} - {input_name} - inits
    names = []
    for k, node in enumerate(proto.graph.node):
        if not node.name:
            node.name = f"uqseg_node_{k}"
        inputs = [i for i in node.input if i and i not in inits]
        from_mask = [i in mask_only for i in inputs]
        if inputs and all(from_mask):
            mask_only.update(node.output)  # the mask's own slicing and reshaping
        elif any(from_mask):
            names.append(node.name)
    return names


def _key(model_bytes: bytes, calib: np.ndarray, input_name: str, extra: dict) -> str:
    import onnxruntime

    h = hashlib.sha256()
    h.update(model_bytes)
    h.update(np.ascontiguousarray(calib).tobytes())
    h.update(json.dumps({"input": input_name, "shape": list(calib.shape),
                         "ort": onnxruntime.__version__, "ops": QUANTIZED_OPS,
                         "depth_to_space": DEPTH_TO_SPACE_MIN_CHANNELS, **extra},
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
    proto, _ = _upsampling_as_depth_to_space(proto, DEPTH_TO_SPACE_MIN_CHANNELS)
    keep_float = _fed_by_other_inputs(proto, input_name)
    model_bytes = proto.SerializeToString()
    extra = {k: np.asarray(v).tolist() for k, v in (extra_inputs or {}).items()}
    folder = Path(cache_dir or _default_cache()) / "int8"
    key = _key(model_bytes, calib, input_name, {"extra": extra, "float_nodes": keep_float})
    target = folder / f"{key}.onnx"
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
            calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        # written under a temporary name, then renamed: readers never see half a file
        part = target.with_suffix(f".{os.getpid()}.part")
        part.write_bytes(dst.read_bytes())
        os.replace(part, target)
    return target, False
