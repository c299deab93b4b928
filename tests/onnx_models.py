"""Tiny ONNX segmentation networks built with onnx.helper (no torch needed)."""

from __future__ import annotations

import json

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def make_unet_like(
    *,
    dims: int = 2,
    in_channels: int = 1,
    n_classes: int = 3,
    width: int = 4,
    spatial: tuple[int, ...] | None = None,
    mc_mask: bool = False,
    fp16: bool = False,
    metadata: bool = True,
    seed: int = 0,
    opset: int = 17,
) -> onnx.ModelProto:
    """conv-relu (enc1) -> maxpool -> conv-relu (bottleneck) -> upsample -> concat -> conv-relu
    (decoder_last) [* mc_mask] -> 1x1 conv (logits). Spatial sizes must be even."""
    rng = np.random.default_rng(seed)
    k = [3] * dims
    pads = [1] * (2 * dims)
    inits, nodes = [], []

    def weight(name, shape):
        w = (rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))).astype(np.float32)
        inits.append(numpy_helper.from_array(w, name))
        return name

    def bias(name, n):
        inits.append(
            numpy_helper.from_array((0.1 * rng.standard_normal(n)).astype(np.float32), name)
        )
        return name

    f = width
    nodes += [
        helper.make_node(
            "Conv",
            ["image", weight("w1", (f, in_channels, *k)), bias("b1", f)],
            ["c1"],
            kernel_shape=k,
            pads=pads,
        ),
        helper.make_node("Relu", ["c1"], ["enc1"]),
        helper.make_node("MaxPool", ["enc1"], ["p1"], kernel_shape=[2] * dims, strides=[2] * dims),
        helper.make_node(
            "Conv",
            ["p1", weight("w2", (2 * f, f, *k)), bias("b2", 2 * f)],
            ["c2"],
            kernel_shape=k,
            pads=pads,
        ),
        helper.make_node("Relu", ["c2"], ["bottleneck"]),
    ]
    inits.append(
        numpy_helper.from_array(np.array([1.0, 1.0] + [2.0] * dims, dtype=np.float32), "scales")
    )
    nodes += [
        helper.make_node("Resize", ["bottleneck", "", "scales"], ["up"], mode="nearest"),
        helper.make_node("Concat", ["up", "enc1"], ["cat"], axis=1),
        helper.make_node(
            "Conv",
            ["cat", weight("w3", (f, 3 * f, *k)), bias("b3", f)],
            ["c3"],
            kernel_shape=k,
            pads=pads,
        ),
        helper.make_node("Relu", ["c3"], ["decoder_last"]),
    ]
    head_in = "decoder_last"
    if mc_mask:
        inits.append(
            numpy_helper.from_array(np.array([0, f] + [1] * dims, dtype=np.int64), "mask_shape")
        )
        nodes += [
            helper.make_node("Reshape", ["mc_mask", "mask_shape"], ["mask_b"]),
            helper.make_node("Mul", ["decoder_last", "mask_b"], ["dropped"]),
        ]
        head_in = "dropped"
    nodes.append(
        helper.make_node(
            "Conv",
            [head_in, weight("w4", (n_classes, f, *[1] * dims)), bias("b4", n_classes)],
            ["logits"],
            kernel_shape=[1] * dims,
        )
    )

    sp = list(spatial) if spatial is not None else [f"s{i}" for i in range(dims)]
    elem = TensorProto.FLOAT16 if fp16 else TensorProto.FLOAT
    inputs = [helper.make_tensor_value_info("image", elem, ["N", in_channels, *sp])]
    if mc_mask:
        inputs.append(helper.make_tensor_value_info("mc_mask", elem, ["N", f]))
    outputs = [helper.make_tensor_value_info("logits", elem, ["N", n_classes, *sp])]
    graph = helper.make_graph(nodes, "tiny_unet", inputs, outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    if fp16:
        _to_fp16_initializers(model)
    if metadata:
        props = {
            "uqseg.n_classes": str(n_classes),
            "uqseg.feature_layers": json.dumps(["bottleneck", "decoder_last", "enc1"]),
            "uqseg.spatial_divisor": "2",
        }
        if mc_mask:
            props["uqseg.mc_dropout"] = json.dumps({"input": "mc_mask", "p": 0.5, "size": f})
        helper.set_model_props(model, props)
    onnx.checker.check_model(model)
    return model


def _to_fp16_initializers(model):
    for i, t in enumerate(model.graph.initializer):
        arr = numpy_helper.to_array(t)
        if arr.dtype == np.float32 and t.name != "scales":  # Resize scales stay float32
            model.graph.initializer[i].CopyFrom(
                numpy_helper.from_array(arr.astype(np.float16), t.name)
            )


def make_wrong_rank() -> onnx.ModelProto:
    """A classifier-like model: (N, C, H, W) -> (N, K); not a segmentation network."""
    inits = [numpy_helper.from_array(np.ones((3, 1), np.float32), "w")]
    nodes = [
        helper.make_node("GlobalAveragePool", ["image"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("MatMul", ["f", "w"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "classifier",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def make_quality_net(in_channels: int, n_out: int, rank: int = 4, seed: int = 0):
    """A toy quality CNN: GlobalAveragePool -> Flatten -> MatMul -> Sigmoid over the stacked
    maps ``(N, in_channels, *spatial)``; returns the model and its weight matrix."""
    w = np.random.default_rng(seed).standard_normal((in_channels, n_out)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["maps"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["z"]),
             helper.make_node("Sigmoid", ["z"], ["quality"])]
    sp = [f"s{i}" for i in range(rank - 2)]
    graph = helper.make_graph(
        nodes, "quality", [helper.make_tensor_value_info("maps", TensorProto.FLOAT,
                                                         ["N", in_channels, *sp])],
        [helper.make_tensor_value_info("quality", TensorProto.FLOAT, ["N", n_out])],
        initializer=[numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model, w
