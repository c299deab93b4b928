"""ONNX graph surgery: find feature tensors and expose them as extra outputs.

Graph optimisers fuse intermediate tensors away; a tensor listed in ``graph.output`` before
the session is built survives, so features and logits come from one inference.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import onnx
from onnx import shape_inference

from uqseg.backends._model import image_input_names, metadata

FEATURE_LAYERS_KEY = "uqseg.feature_layers"

# Producers whose outputs are meaningful feature maps (not weights, shapes or indices).
_FEATURE_OPS = {
    "Relu",
    "LeakyRelu",
    "PRelu",
    "Elu",
    "Selu",
    "Gelu",
    "Sigmoid",
    "Tanh",
    "Clip",
    "HardSwish",
    "Mish",
    "Softplus",
    "Silu",
    "Add",
    "Concat",
    "MaxPool",
    "AveragePool",
    "BatchNormalization",
    "InstanceNormalization",
    "GroupNormalization",
    "Conv",
    "ConvTranspose",
    "Resize",
    "Mul",
    "Identity",
    "Dropout",
    "Upsample",
}


@dataclass(frozen=True)
class LayerInfo:
    """A candidate feature tensor: name, static shape (None for unknown dims), producer op."""

    name: str
    shape: tuple[int | None, ...] | None
    op_type: str
    order: int  # position of the producing node in the graph

    @property
    def channels(self) -> int | None:
        return self.shape[1] if self.shape and len(self.shape) > 1 else None


def _shape_of(vi: onnx.ValueInfoProto) -> tuple[int | None, ...] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)


def _infer(model: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return shape_inference.infer_shapes(model)
    except Exception:  # unknown custom ops: fall back to the declared value_info
        return model


def candidate_layers(model: onnx.ModelProto) -> list[LayerInfo]:
    """Intermediate float tensors shaped like the image ``(N, C, *spatial)``.

    Ordered with the layers named in the ``uqseg.feature_layers`` metadata first (in that
    order), then deepest first: smallest known spatial size, then most channels, then latest.
    """
    inferred = _infer(model)
    graph = inferred.graph
    inputs = image_input_names(model)
    in_vi = next(i for i in graph.input if i.name == inputs[0])
    rank = len(in_vi.type.tensor_type.shape.dim)
    shapes = {vi.name: (_shape_of(vi), vi.type.tensor_type.elem_type) for vi in graph.value_info}
    outputs = {o.name for o in graph.output}
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    found: dict[str, LayerInfo] = {}
    for order, node in enumerate(graph.node):
        for name in node.output:
            if not name or name in outputs or name in found:
                continue
            shape, elem = shapes.get(name, (None, None))
            named = name in preferred_layers(model)
            if not named:
                if node.op_type not in _FEATURE_OPS or elem not in floats:
                    continue
                if shape is None or len(shape) != rank:
                    continue
                if shape[1] is not None and shape[1] < 2:
                    continue
            found[name] = LayerInfo(name, shape, node.op_type, order)
    preferred = [found[n] for n in preferred_layers(model) if n in found]
    rest = [info for n, info in found.items() if n not in set(preferred_layers(model))]

    def depth_key(info: LayerInfo):
        spatial = info.shape[2:] if info.shape else ()
        size = 1
        for s in spatial:
            size = size * s if s is not None else size
        known = all(s is not None for s in spatial) and bool(spatial)
        return (not known, size if known else 0, -(info.channels or 0), -info.order)

    return preferred + sorted(rest, key=depth_key)


def preferred_layers(model: onnx.ModelProto) -> list[str]:
    """Feature layers the exporter recommended (``uqseg.feature_layers`` metadata)."""
    raw = metadata(model).get(FEATURE_LAYERS_KEY)
    if not raw:
        return []
    try:
        names = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"model metadata {FEATURE_LAYERS_KEY!r} is not valid JSON: {raw!r}"
        ) from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"model metadata {FEATURE_LAYERS_KEY!r} must be a JSON list of names")
    return names


def tensor_names(model: onnx.ModelProto) -> set[str]:
    names = {o for node in model.graph.node for o in node.output if o}
    names.update(i.name for i in model.graph.input)
    return names


def expose(model: onnx.ModelProto, names: list[str] | tuple[str, ...]) -> onnx.ModelProto:
    """Return a copy of ``model`` whose graph also outputs the tensors ``names``."""
    existing = {o.name for o in model.graph.output}
    missing = [n for n in names if n not in tensor_names(model)]
    if missing:
        cands = [c.name for c in candidate_layers(model)][:12]
        raise ValueError(
            f"unknown layer(s) {missing}: no tensor of that name in the model; "
            f"candidate feature layers are {cands}"
        )
    wanted = [n for n in names if n not in existing]
    if not wanted:
        return model
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inferred = {vi.name: vi for vi in _infer(model).graph.value_info}
    for name in wanted:
        vi = inferred.get(name)
        if vi is None:
            vi = onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None)
        new = out.graph.output.add()
        new.CopyFrom(vi)
    return out
