"""Hostile ONNX models for the security tests: external data hidden in every tensor slot."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx_models import make_unet_like

PLACEMENTS = ("initializer", "constant", "if", "loop", "scan", "function", "sparse",
              "sparse_constant")
SHAPE = [1, 3, 1, 1]  # added to the 3-class logits: leaked bytes show up in the output


def ext_tensor(name: str, location: str, dims=SHAPE, **entries) -> onnx.TensorProto:
    t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=dims)
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value=location)
    for key, value in entries.items():
        t.external_data.add(key=key, value=str(value))
    return t


def _sparse(name: str, values: onnx.TensorProto) -> onnx.SparseTensorProto:
    values.name = name
    values.ClearField("dims")
    values.dims.extend([3])
    idx = numpy_helper.from_array(np.arange(3, dtype=np.int64), name + "_idx")
    return helper.make_sparse_tensor(values, idx, SHAPE)


def _vi(name, elem=TensorProto.FLOAT, shape=SHAPE):
    return helper.make_tensor_value_info(name, elem, shape)


def carrier(placement: str, tensor: onnx.TensorProto | None = None, **kw) -> onnx.ModelProto:
    """The tiny 2-D U-Net whose logits get ``cst`` (shape (1, 3, 1, 1)) added, ``cst`` coming
    from ``tensor`` (external by default) placed as ``placement`` says."""
    if tensor is None:
        tensor = ext_tensor("cst", "secret.bin", **kw)
    model = make_unet_like(dims=2, **({"seed": 5}))
    g = model.graph
    g.node[-1].output[0] = "raw"
    zeros = numpy_helper.from_array(np.zeros(SHAPE, np.float32), "zeros")
    true = numpy_helper.from_array(np.array(True), "true")
    nodes = []
    if placement == "initializer":
        tensor.name = "cst"
        g.initializer.append(tensor)
    elif placement == "constant":
        nodes.append(helper.make_node("Constant", [], ["cst"], value=tensor))
    elif placement == "if":
        tensor.name = "t_then"
        then = helper.make_graph([helper.make_node("Identity", ["t_then"], ["a"])], "then", [],
                                 [_vi("a")], initializer=[tensor])
        other = helper.make_graph([helper.make_node("Identity", ["zeros"], ["b"])], "else", [],
                                  [_vi("b")], initializer=[zeros])
        g.initializer.append(true)
        nodes.append(helper.make_node("If", ["true"], ["cst"], then_branch=then,
                                      else_branch=other))
    elif placement == "loop":
        tensor.name = "t_loop"
        body = helper.make_graph(
            [helper.make_node("Identity", ["c"], ["c_out"]),
             helper.make_node("Add", ["v", "t_loop"], ["v_out"])], "body",
            [_vi("i", TensorProto.INT64, []), _vi("c", TensorProto.BOOL, []), _vi("v")],
            [_vi("c_out", TensorProto.BOOL, []), _vi("v_out")], initializer=[tensor])
        g.initializer.extend([numpy_helper.from_array(np.array(1, np.int64), "one"), true, zeros])
        nodes.append(helper.make_node("Loop", ["one", "true", "zeros"], ["cst"], body=body))
    elif placement == "scan":
        tensor.name = "t_scan"
        body = helper.make_graph(
            [helper.make_node("Add", ["s", "t_scan"], ["s_out"]),
             helper.make_node("Identity", ["x"], ["y"])], "body",
            [_vi("s"), _vi("x", shape=[1])], [_vi("s_out"), _vi("y", shape=[1])],
            initializer=[tensor])
        g.initializer.extend([zeros, numpy_helper.from_array(np.zeros((1, 1), np.float32), "xs")])
        nodes.append(helper.make_node("Scan", ["zeros", "xs"], ["cst", "ys"], body=body,
                                      num_scan_inputs=1))
    elif placement == "function":
        f = helper.make_function("evil.local", "leak", [], ["o"],
                                 [helper.make_node("Constant", [], ["o"], value=tensor)],
                                 [helper.make_opsetid("", 17)])
        model.functions.append(f)
        model.opset_import.append(helper.make_opsetid("evil.local", 1))
        nodes.append(helper.make_node("leak", [], ["cst"], domain="evil.local"))
    elif placement == "sparse":
        g.sparse_initializer.append(_sparse("cst", tensor))
    elif placement == "sparse_constant":
        nodes.append(helper.make_node("Constant", [], ["cst"],
                                      sparse_value=_sparse("sp", tensor)))
    else:
        raise ValueError(placement)
    nodes.append(helper.make_node("Add", ["raw", "cst"], ["logits"]))
    g.node.extend(nodes)
    return model


def embedded(placement: str, values: np.ndarray) -> onnx.ModelProto:
    """The same carrier with ``values`` stored inside the model (the reference)."""
    return carrier(placement, numpy_helper.from_array(values.reshape(SHAPE).astype(np.float32),
                                                      "cst"))
