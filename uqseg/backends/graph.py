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
        raise ValueError(f"unknown layer(s) {missing}: no tensor of that name in the model. "
                         f"{layer_help(model)}")
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


# ---------------------------------------------------------------------- structure
#: roles found by structure: the zoo's named layers have the same meaning
#: (bottleneck; decoder blocks at 1/4 and 1/2 of the input resolution; last decoder block)
#: ``stem``: the first convolution's output, found only when the network normalises each image's
#: maps (instance or group normalisation), which removes its intensity scale from every later
#: tensor; the stem is the one tensor that keeps it
ROLES = ("bottleneck", "decoder_1/4", "decoder_1/2", "decoder_last", "stem")
# per-image normalisations (torch exports GroupNorm as a reshaped InstanceNormalization)
_PER_IMAGE_NORMS = {"InstanceNormalization", "GroupNormalization", "LayerNormalization"}
# spatial sizes the structure is probed at: two, to tell tensors whose size follows the
# input's (feature maps) from those that do not (global pooling, attention weights)
_PROBES = (768, 1536)
# a block's output is its activation / sum / concatenation, not the raw convolution before it
_RAW_OPS = {"Conv", "ConvTranspose", "Resize", "Upsample", "MaxPool", "AveragePool",
            "BatchNormalization", "InstanceNormalization", "GroupNormalization"}


@dataclass(frozen=True)
class Structure:
    """What the graph's shapes say about the network, probed at a fixed input size.

    ``shapes``: tensor -> shape at the probe input ``(1, C, *probe)``; ``factors``: tensor ->
    per-axis downsampling factor (input size / tensor size) for every float tensor whose
    spatial size follows the input's; ``roles``: :data:`ROLES` -> tensor; ``divisor``: the
    product of the strides and pooling on the path to the bottleneck (``None`` if unknown);
    ``outputs``: graph output -> factor (``None`` when not a map of the input's shape).
    """

    probe: tuple[int, ...]
    shapes: dict
    factors: dict
    roles: dict
    divisor: int | None
    outputs: dict
    output: str | None


def _probe_model(model: onnx.ModelProto, image: str, probe: int) -> dict | None:
    """Shapes of all tensors with the dynamic spatial axes of ``image`` set to ``probe``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.value_info[:]
    for vi in m.graph.input:
        dims = vi.type.tensor_type.shape.dim
        for i, d in enumerate(dims):
            if not d.HasField("dim_value"):
                d.ClearField("dim_param")
                d.dim_value = probe if (vi.name == image and i >= 2) else 1
    for vi in m.graph.output:
        vi.type.tensor_type.ClearField("shape")
    try:
        inferred = shape_inference.infer_shapes(m, data_prop=True)
    except Exception:  # custom ops or graphs inconsistent at the probe size
        return None
    out = {}
    for vi in [*inferred.graph.value_info, *inferred.graph.output]:
        t = vi.type.tensor_type
        if t.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                           onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE):
            s = _shape_of(vi)
            if s is not None:
                out[vi.name] = s
    return out


def _factors(shapes: list[dict], fixed: tuple, probes: tuple[int, ...]) -> dict:
    """Per-axis factor input/tensor for tensors of the image's rank whose size scales."""
    rank = len(fixed) + 2
    out = {}
    for name, s in shapes[0].items():
        if len(s) != rank or any(v is None or v < 1 for v in s[2:]):
            continue
        f = []
        for ax, (size, fx) in enumerate(zip(s[2:], fixed, strict=True)):
            if fx is not None:
                f.append(fx / size)
                continue
            if len(shapes) > 1:
                s2 = shapes[1].get(name)
                if s2 is None or len(s2) != rank or s2[2 + ax] is None:
                    break
                ratio = s2[2 + ax] / size
                if abs(ratio - probes[1] / probes[0]) > 0.05 * probes[1] / probes[0]:
                    break  # size does not follow the input (pooled, cropped): no feature map
            f.append(probes[0] / size)
        else:
            out[name] = tuple(f)
    return out


def _level(f: tuple) -> float:
    return max(f)


def structure(model: onnx.ModelProto, output: str | None = None) -> Structure | None:
    """Bottleneck, decoder tensors and spatial divisor found from the graph's shapes.

    ``output`` is the segmentation output (default: the first full-resolution graph output).
    ``None`` when the graph's shapes cannot be inferred at a probe size.
    """
    inputs = [n for n in image_input_names(model) if n != "mc_mask"]
    if not inputs:
        return None
    image = inputs[0]
    in_vi = next(i for i in model.graph.input if i.name == image)
    dims = _shape_of(in_vi)
    if dims is None or len(dims) not in (4, 5):
        return None
    fixed = tuple(dims[2:])
    probes = _PROBES if any(v is None for v in fixed) else _PROBES[:1]
    shapes = [_probe_model(model, image, p) for p in probes]
    if any(s is None for s in shapes):
        return None
    factors = _factors(shapes, fixed, probes)
    probe = tuple(fx if fx is not None else probes[0] for fx in fixed)
    outputs = {o.name: factors.get(o.name) for o in model.graph.output}
    if output is None:
        output = next((n for n, f in outputs.items() if f is not None and _level(f) == 1),
                      None)
    graph = model.graph
    producer = {o: (i, node) for i, node in enumerate(graph.node) for o in node.output if o}
    roles: dict[str, str] = {}
    if output is not None and output in producer:
        # ancestors of the segmentation output (deep-supervision heads are not)
        anc, stack = set(), [output]
        while stack:
            t = stack.pop()
            if t in anc or t not in producer:
                continue
            anc.add(t)
            stack.extend(i for i in producer[t][1].input if i)
        outs = {o.name for o in graph.output}

        def pool(names):
            cand = [n for n in names if n in factors and n in anc and n not in outs
                    and producer[n][1].op_type in _FEATURE_OPS
                    and (shapes[0][n][1] or 2) >= 2]
            block = [n for n in cand if producer[n][1].op_type not in _RAW_OPS]
            return sorted(block or cand, key=lambda n: producer[n][0])

        feats = pool(factors)
        if feats:
            deepest = max(_level(factors[n]) for n in feats)
            bottleneck = pool(n for n in feats if _level(factors[n]) == deepest)[-1]
            roles["bottleneck"] = bottleneck
            # decoder: tensors computed from the bottleneck (encoder skips are not)
            users: dict[str, list] = {}
            for node in graph.node:
                for i in node.input:
                    users.setdefault(i, []).append(node)
            desc, stack = set(), [bottleneck]
            while stack:
                t = stack.pop()
                for node in users.get(t, ()):
                    for o in node.output:
                        if o and o not in desc:
                            desc.add(o)
                            stack.append(o)
            for role, level in (("decoder_1/4", 4), ("decoder_1/2", 2), ("decoder_last", 1)):
                at = pool(n for n in feats if n in desc and _level(factors[n]) == level)
                pre = producer[output][1].input[0] if producer[output][1].op_type in (
                    "Softmax", "Sigmoid") else None
                at = [n for n in at if n != pre]
                if at and level < deepest:
                    roles[role] = at[-1]
            if any(producer[t][1].op_type in _PER_IMAGE_NORMS for t in anc):
                stem = next((n for node in graph.node if node.op_type == "Conv"
                             for n in node.output[:1] if n in anc and n in factors
                             and n not in roles.values() and (shapes[0][n][1] or 2) >= 2),
                            None)
                if stem is not None:
                    roles["stem"] = stem
    divisor = None
    if "bottleneck" in roles:
        per_axis = [f for f, fx in zip(factors[roles["bottleneck"]], fixed, strict=True)
                    if fx is None]
        if per_axis and all(abs(f - round(f)) < 1e-6 for f in per_axis):
            divisor = 1
            for f in per_axis:
                divisor = _lcm(divisor, int(round(f)))
    return Structure(probe, shapes[0], factors, roles, divisor, outputs, output)


def _lcm(a: int, b: int) -> int:
    from math import gcd

    return a * b // gcd(a, b)


def resolution(factor: tuple) -> str:
    """``"1/4"`` for a tensor at a quarter of the input resolution (``"full"`` for full)."""
    parts = {(f"1/{round(f)}" if abs(f - round(f)) < 1e-6 and round(f) > 1 else
              "full" if abs(f - 1) < 1e-6 else f"1/{f:.3g}") for f in factor}
    return parts.pop() if len(parts) == 1 else "(" + ", ".join(
        f"1/{f:.3g}" if f != 1 else "1" for f in factor) + ")"


def layer_help(model: onnx.ModelProto, limit: int = 8) -> str:
    """What to write instead of an unknown layer name: the structural candidates with their
    resolutions, and how to name layers."""
    s = structure(model)
    parts = []
    if s is not None and s.roles:
        parts.append("found by structure: " + "; ".join(
            f"{role} = {name!r} ({s.shapes[name][1]} channels at {resolution(s.factors[name])} "
            "resolution)" for role, name in s.roles.items()))
    cands = [c.name for c in candidate_layers(model)]
    if s is not None:
        roles = set(s.roles.values())
        others = [n for n in cands if n not in roles and n in s.factors][:limit]
        if others:
            parts.append("other candidates: " + "; ".join(
                f"{n!r} ({s.shapes[n][1]} ch at {resolution(s.factors[n])})" for n in others))
    elif cands:
        parts.append(f"candidate feature layers: {cands[:limit]}")
    parts.append("pass a tensor name or a role ('bottleneck', 'decoder_1/4', 'decoder_1/2', "
                 "'decoder_last', 'stem'); to name layers for good, write the metadata "
                 "(uqseg inspect MODEL.onnx --set 'feature_layers=[\"NAME\", ...]' --out "
                 "NEW.onnx) or add Identity nodes with readable output names "
                 "(docs/byo_network.md)")
    return ". ".join(parts)
