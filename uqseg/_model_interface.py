"""What an ONNX segmentation network takes and gives, read from its file.

:class:`uqseg.OnnxSegmenter` records this at ``fit``: the image input, the output used as
logits (the tensor before a trailing ``Softmax``/``Sigmoid``), the activation, the MC-dropout
mask, the spatial divisor and the feature layers (exporter-named or found by the graph's
structure). Part of the inference layer: the estimator itself does not read graphs.
"""

from __future__ import annotations

from uqseg import backends
from uqseg.backends import graph
from uqseg.backends._checks import (
    ACTIVATIONS,
    DIVISOR_KEY,
    ModelOutputError,
    check_metadata,
    check_output_type,
)
from uqseg.backends._model import image_input_names, read_model

__all__ = ["ACTIVATIONS", "MC_MASK", "PRECISIONS", "ModelOutputError", "check_activation",
           "layer_help", "read_interface", "resolve_device"]

MC_MASK = "mc_mask"
PRECISIONS = (*backends.PRECISIONS, "int8")


def check_activation(value) -> None:
    """``activation=`` of a segmenter or an ensemble: "auto" or one of :data:`ACTIVATIONS`."""
    if not (isinstance(value, str) and value in ("auto", *ACTIVATIONS)):
        raise ValueError(f"activation must be one of {('auto', *ACTIVATIONS)}, got {value!r}")


def resolve_device(backend: str, device: str) -> str:
    """The device ``(backend, device)`` resolves to (``"cpu"``, ``"cuda"`` or ``"tensorrt"``);
    unknown names are a ValueError."""
    return backends.resolve(backend, device)[1]


def layer_help(model, available) -> str:
    """How to choose or name a feature layer of ``model`` (structural candidates)."""
    try:
        return graph.layer_help(read_model(model)[0])
    except Exception:  # no readable file behind the segmenter: the names alone
        return f"Choose from {list(available)[:12]}"


def read_interface(model, output, activation) -> tuple[dict, object, dict, list]:
    """What an ONNX segmentation network takes and gives, from its file (nothing is run).

    Returns ``(attributes, proto, metadata, output dims)``: the fitted attributes of
    :class:`uqseg.OnnxSegmenter` that the file decides (``input_name_``, ``input_shape_``,
    ``n_input_channels_``, ``spatial_dims_``, ``output_name_``, ``activation_``,
    ``mc_dropout_``, ``spatial_divisor_``, ``layer_roles_``, ``feature_layers_`` and the
    private ``_hidden_output``/``_preprocessing``), the model, its validated ``uqseg.*``
    metadata and the output's declared dims.
    """
    proto, _ = read_model(model)
    where = f"model {str(model)!r}"
    meta = check_metadata(proto, where)
    inputs = image_input_names(proto)
    image_inputs = [n for n in inputs if n != MC_MASK]
    if len(image_inputs) != 1:
        raise ValueError(f"{where}: the model must take exactly one image input (plus an "
                         f"optional {MC_MASK!r}); it takes {inputs}")
    input_name_ = image_inputs[0]
    in_vi = next(i for i in proto.graph.input if i.name == input_name_)
    dims = [d.dim_value if d.HasField("dim_value") else None
            for d in in_vi.type.tensor_type.shape.dim]
    if len(dims) not in (4, 5):
        raise ValueError(f"the model input {input_name_!r} has rank {len(dims)}; expected "
                         "(N, C, H, W) or (N, C, D, H, W)")
    if dims[1] is None:
        raise ValueError(f"the model input {input_name_!r} has no fixed channel count")
    input_shape_ = tuple(dims[1:])
    n_input_channels_ = int(dims[1])
    spatial_dims_ = len(dims) - 2
    out_names = [o.name for o in proto.graph.output]
    if output is not None and (not isinstance(output, str) or output not in out_names):
        raise ValueError(f"{where}: output={output!r} is not an output of the model; "
                         f"its outputs are {out_names}")
    struct = graph.structure(proto, output=output if output is not None
                             else "logits" if "logits" in out_names else None)
    if output is not None:
        output_name_ = output
    elif "logits" in out_names:
        output_name_ = "logits"
    else:  # deep supervision: the full-resolution head is the segmentation
        output_name_ = struct.output if struct is not None and struct.output else out_names[0]
    out_vi = next(o for o in proto.graph.output if o.name == output_name_)
    check_output_type(out_vi, where)
    out_dims = [d.dim_value if d.HasField("dim_value") else None
                for d in out_vi.type.tensor_type.shape.dim]
    if out_vi.type.tensor_type.HasField("shape") and len(out_dims) != len(dims):
        raise ValueError(
            f"{where}: the model output {output_name_!r} has rank {len(out_dims)} but "
            f"a segmentation network must output (N, K, *spatial) of rank {len(dims)}"
        )
    if len(out_dims) == len(dims) and any(
            a is not None and b is not None and a != b
            for a, b in zip(out_dims[2:], dims[2:], strict=True)):
        raise ValueError(f"{where}: the model output {output_name_!r} has spatial shape "
                         f"{out_dims[2:]} but its input has {dims[2:]}; segmentation logits "
                         "must have the input's spatial size")
    activation_, pre = _resolve_activation(proto, output_name_, activation, meta["activation"],
                                           out_dims)
    if pre is not None:  # the logits before the graph's own Softmax/Sigmoid
        output_name_ = pre
    _hidden_output = pre is not None
    mc_dropout_ = _mc_spec(proto, meta["mc_dropout"], inputs, where)
    named_divisor = any(p.key == DIVISOR_KEY for p in proto.metadata_props)
    spatial_divisor_ = meta["spatial_divisor"] if named_divisor or struct is None \
        or struct.divisor is None else struct.divisor
    _preprocessing = meta["preprocessing"]
    layer_roles_ = dict(struct.roles) if struct is not None else {}
    cands = [info.name for info in graph.candidate_layers(proto)]
    named = graph.preferred_layers(proto)
    first = named + [n for n in layer_roles_.values() if n not in named]
    feature_layers_ = first + [n for n in cands if n not in first]
    attrs = {
        "input_name_": input_name_,
        "input_shape_": input_shape_,
        "n_input_channels_": n_input_channels_,
        "spatial_dims_": spatial_dims_,
        "output_name_": output_name_,
        "activation_": activation_,
        "_hidden_output": _hidden_output,
        "mc_dropout_": mc_dropout_,
        "spatial_divisor_": spatial_divisor_,
        "_preprocessing": _preprocessing,
        "layer_roles_": layer_roles_,
        "feature_layers_": feature_layers_,
    }
    return attrs, proto, meta, out_dims


def _mc_spec(proto, spec, inputs, where):
    """``mc_dropout_``: the validated metadata, or the width of an ``mc_mask`` input."""
    if spec is None and MC_MASK not in inputs:
        return None
    spec = dict(spec) if spec is not None else {"input": MC_MASK, "p": None, "size": None}
    if spec["size"] is None:
        mask_vi = next(i for i in proto.graph.input if i.name == spec["input"])
        dims = mask_vi.type.tensor_type.shape.dim
        spec["size"] = dims[1].dim_value if len(dims) == 2 and dims[1].dim_value else None
    if spec["size"] is None:
        raise ValueError(f"{where}: the MC-dropout mask input {spec['input']!r} has no fixed "
                         "width (N, D) and the metadata 'uqseg.mc_dropout' gives no size")
    return spec


def _resolve_activation(proto, output: str, asked: str, meta: str | None, out_dims):
    """``(activation, pre-activation tensor or None)`` for the model output ``output``."""
    node = next((n for n in proto.graph.node if output in n.output), None)
    op = None
    if node is not None and node.op_type == "Sigmoid":
        op = "sigmoid"
    elif node is not None and node.op_type == "Softmax":
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
        if axis is None:
            axis = -1 if opset >= 13 else 1
        rank = len(out_dims) if out_dims else None
        if axis == 1 or (rank is not None and axis == 1 - rank):
            op = "softmax"
    pre = node.input[0] if op is not None and node.input and node.input[0] else None
    if asked == "none" or (asked == "auto" and meta == "none"):  # said to be probabilities
        return "none", None
    if asked in ("softmax", "sigmoid"):
        return asked, pre if op == asked else None
    if op is not None:
        return op, pre
    if meta is not None:
        return meta, None
    if out_dims and len(out_dims) > 1 and out_dims[1] == 1:
        return "sigmoid", None
    return "softmax", None
