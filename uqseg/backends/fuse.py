"""Fuse the members of an ensemble into one ONNX graph (one session runs the whole ensemble).

Every member's tensors are renamed with a prefix ``m<i>__`` so the graphs cannot collide; all
members read one shared image input. A member's ``mc_mask`` input (MC dropout) is fed ones built
inside the graph, i.e. deterministic eval mode.

The fused graph returns either each member's logits (``logits_0..M-1``) or, computed in the graph,
the ensemble statistics: weighted mean softmax, expected entropy, mean squared probability,
entropy of the mean and mutual information. The statistics avoid copying ``M`` logit tensors
out of the engine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from uqseg.backends._checks import MAX_SPATIAL_DIVISOR, check_metadata, check_output_type
from uqseg.backends._model import (
    ModelLike,
    describe,
    image_input_names,
    read_model,
    with_external_data,
)

__all__ = ["STATS", "fuse_members"]

MC_MASK = "mc_mask"
IMAGE = "image"
#: Ensemble statistics a fused graph can output (besides per-member ``logits_<i>``).
STATS = ("proba", "expected_entropy", "mean_sq", "entropy", "mutual_information")
_MIN_OPSET = 13  # Softmax/LogSoftmax act on one axis and ReduceSum takes axes as input from 13


def _load(model: ModelLike, index: int) -> onnx.ModelProto:
    try:
        proto, folder = read_model(model)
    except (ValueError, FileNotFoundError) as exc:
        raise type(exc)(f"member {index}: {exc}") from exc
    proto_copy = onnx.ModelProto()
    proto_copy.CopyFrom(proto)
    # every external tensor (initializers, attributes, subgraphs, functions) embedded from the
    # member's own folder: the fused graph is self-contained, whatever the working directory
    proto = with_external_data(proto_copy, folder, f"member {index} ({describe(model)})")
    if proto.functions:  # dynamo exports may hold local functions: inline them
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    problem = _unfusable(proto)
    if problem is not None:
        raise ValueError(f"member {index} {problem}")
    return proto


def _unfusable(proto: onnx.ModelProto) -> str | None:
    """Why this (function-inlined) graph cannot be renamed into a fused one, or None."""
    if proto.graph.sparse_initializer:
        return "has sparse initializers, which fuse_members does not support"
    for node in proto.graph.node:
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for a in node.attribute):
            return (f"has a control-flow node {node.op_type!r} ({node.name!r}) with a "
                    "subgraph; fuse_members cannot rename it")
    return None


def fuse_problem(model: ModelLike, output: str | None = None) -> str | None:
    """Why ``model`` cannot take part in :func:`fuse_members` (None when it can).

    Checked when an ensemble decides whether to fuse, so that ``fuse="auto"`` falls back to
    running members separately instead of failing at inference. ``output``: the tensor the
    member's segmenter uses as logits (the fused graph takes ``"logits"`` or the first output).
    """
    proto, _ = read_model(model)
    outs = [o.name for o in proto.graph.output]
    if output is not None and output != ("logits" if "logits" in outs else outs[0]):
        return f"segments with the output {output!r}, not its first output"
    if proto.functions:
        from onnx import inliner

        proto = inliner.inline_local_functions(proto)
    return _unfusable(proto)


def _default_opset(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def _convert(proto: onnx.ModelProto, target: int, index: int) -> onnx.ModelProto:
    if _default_opset(proto) == target:
        return proto
    from onnx import version_converter

    try:
        return version_converter.convert_version(proto, target)
    except Exception as exc:
        raise ValueError(
            f"member {index} uses opset {_default_opset(proto)} and could not be "
            f"converted to opset {target} to match the others: {exc}"
        ) from exc


def _scalar(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def fuse_members(
    members: Sequence[ModelLike],
    weights: Sequence[float] | None = None,
    outputs: Sequence[str] = ("proba", "expected_entropy"),
) -> onnx.ModelProto:
    """Fuse segmentation networks into one ONNX model sharing a single image input.

    Parameters
    ----------
    members : sequence of path, bytes or onnx.ModelProto
        Networks mapping ``image (N, C, *spatial)`` (plus an optional ``mc_mask``) to logits
        ``(N, K, *spatial)``; they must take the same number of input channels and spatial axes.
    weights : sequence of float, optional
        Member weights for the statistics (normalised to sum 1); default equal weights.
    outputs : sequence of str, default=("proba", "expected_entropy")
        ``"logits"`` for one output ``logits_<i>`` per member, and/or statistics from
        :data:`STATS`: ``"proba"`` (weighted mean softmax ``(N, K, *spatial)``),
        ``"expected_entropy"`` (weighted mean of the members' entropies ``(N, *spatial)``),
        ``"mean_sq"`` (weighted mean of squared probabilities, for the variance),
        ``"entropy"`` (entropy of ``proba``), ``"mutual_information"`` (``entropy`` minus
        ``expected_entropy``, clipped at 0). Natural logarithms.

    Returns
    -------
    onnx.ModelProto
        Input ``image``; the requested outputs. ``metadata_props`` carry ``uqseg.n_members``,
        ``uqseg.spatial_divisor`` (least common multiple of the members') and ``uqseg.n_classes``.

    Examples
    --------
    >>> from uqseg import datasets
    >>> from uqseg.backends import load
    >>> paths = datasets.reference_models()[:2]
    >>> X = datasets.load_brain_tissue("test")[0][:8]
    >>> fused = fuse_members(paths, outputs=("proba", "mutual_information"))
    >>> load(fused, device="cpu").run({"image": X})["proba"].shape
    (8, 3, 128, 128)
    """
    if isinstance(members, (str, bytes, onnx.ModelProto)) or not isinstance(members, Sequence):
        raise TypeError(f"members must be a sequence of ONNX models, got {type(members).__name__}")
    if len(members) == 0:
        raise ValueError("members is empty: at least one model is required")
    outputs = (outputs,) if isinstance(outputs, str) else tuple(outputs)
    bad = [o for o in outputs if o not in (*STATS, "logits")]
    if bad or not outputs:
        raise ValueError(f"outputs must be taken from {('logits', *STATS)}, got {outputs!r}")
    m = len(members)
    if weights is None:
        w = np.full(m, 1.0 / m)
    else:
        w = np.asarray(weights, dtype=np.float64).ravel()
        if w.shape != (m,) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise ValueError(f"weights must be {m} positive finite numbers, got {weights!r}")
        w = w / w.sum()

    protos = [_load(model, i) for i, model in enumerate(members)]
    target = max(_MIN_OPSET, *(_default_opset(p) for p in protos))
    protos = [_convert(p, target, i) for i, p in enumerate(protos)]

    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    value_info: list[onnx.ValueInfoProto] = []
    logits: list[str] = []
    image_vi = None
    divisor, n_classes = 1, None
    for i, proto in enumerate(protos):
        g = proto.graph
        inputs = image_input_names(proto)
        image_names = [n for n in inputs if n != MC_MASK]
        if len(image_names) != 1:
            raise ValueError(
                f"member {i} must take one image input (plus an optional "
                f"{MC_MASK!r}); it takes {inputs}"
            )
        vi = next(v for v in g.input if v.name == image_names[0])
        if vi.type.tensor_type.elem_type != TensorProto.FLOAT:
            raise ValueError(f"member {i} takes a non-float32 image input; fuse float32 models")
        dims = [
            (d.dim_value if d.HasField("dim_value") else None)
            for d in vi.type.tensor_type.shape.dim
        ]
        if image_vi is None:
            image_vi, first_dims = vi, dims
        elif len(dims) != len(first_dims) or dims[1] != first_dims[1]:
            raise ValueError(
                f"member {i} takes input shape {dims}, member 0 takes {first_dims}: "
                "fused members need the same channels and spatial axes"
            )
        prefix = f"m{i}__"

        def rename(name: str, image=image_names[0], prefix=prefix) -> str:
            if name == "":
                return name  # an omitted optional input stays omitted
            return IMAGE if name == image else prefix + name

        where = f"member {i}"
        meta = check_metadata(proto, where)
        out_name = "logits" if any(o.name == "logits" for o in g.output) else g.output[0].name
        check_output_type(next(o for o in g.output if o.name == out_name), where)
        if MC_MASK in inputs:  # ones of shape (N, D): deterministic eval mode
            mask_vi = next(v for v in g.input if v.name == MC_MASK)
            mdims = mask_vi.type.tensor_type.shape.dim
            size = mdims[1].dim_value if len(mdims) == 2 else 0
            if not size and meta["mc_dropout"] is not None:
                size = meta["mc_dropout"]["size"] or 0
            if not size:
                raise ValueError(f"member {i} takes an {MC_MASK!r} of unknown width")
            inits += [
                numpy_helper.from_array(np.array([0], np.int64), prefix + "_mask_s0"),
                numpy_helper.from_array(np.array([1], np.int64), prefix + "_mask_s1"),
                numpy_helper.from_array(np.array([size], np.int64), prefix + "_mask_d"),
            ]
            nodes += [
                helper.make_node("Shape", [IMAGE], [prefix + "_ishape"]),
                helper.make_node(
                    "Slice",
                    [prefix + "_ishape", prefix + "_mask_s0", prefix + "_mask_s1"],
                    [prefix + "_n"],
                ),
                helper.make_node(
                    "Concat", [prefix + "_n", prefix + "_mask_d"], [prefix + "_mshape"], axis=0
                ),
                helper.make_node(
                    "ConstantOfShape",
                    [prefix + "_mshape"],
                    [prefix + MC_MASK],
                    value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
                ),
            ]
        for t in g.initializer:
            t2 = onnx.TensorProto()
            t2.CopyFrom(t)
            t2.name = rename(t.name)
            inits.append(t2)
        for j, node in enumerate(g.node):
            n2 = onnx.NodeProto()
            n2.CopyFrom(node)
            n2.name = prefix + (node.name or f"{node.op_type}_{j}")
            n2.input[:] = [rename(x) for x in node.input]
            n2.output[:] = [rename(x) for x in node.output]
            nodes.append(n2)
        for v in g.value_info:
            v2 = onnx.ValueInfoProto()
            v2.CopyFrom(v)
            v2.name = rename(v.name)
            value_info.append(v2)
        logits.append(rename(out_name))
        d = meta["spatial_divisor"]
        divisor = divisor * d // math.gcd(divisor, d)
        if divisor > MAX_SPATIAL_DIVISOR:
            raise ValueError(f"member {i}: the members' spatial divisors have a least common "
                             f"multiple of {divisor}, above {MAX_SPATIAL_DIVISOR}")
        if n_classes is None and meta["n_classes"] is not None:
            n_classes = str(meta["n_classes"])

    graph_outputs: list[onnx.ValueInfoProto] = []

    def out(name: str, rank_k: bool) -> None:
        shape = [
            first_dims[0] or "N",
            *(["K"] if rank_k else []),
            *[s or f"s{j}" for j, s in enumerate(first_dims[2:])],
        ]
        graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))

    if "logits" in outputs:
        for i, name in enumerate(logits):
            nodes.append(helper.make_node("Identity", [name], [f"logits_{i}"]))
            out(f"logits_{i}", True)
    want = set(outputs)
    need_p = bool(want & {"proba", "mean_sq", "entropy", "mutual_information"})
    need_h = bool(want & {"expected_entropy", "mutual_information"})
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "_axis1"))
    parts: dict[str, list[str]] = {"proba": [], "mean_sq": [], "ee": []}
    for i, z in enumerate(logits):
        pre = f"s{i}__"
        inits.append(_scalar(pre + "w", w[i]))
        if need_p or need_h:
            nodes.append(helper.make_node("Softmax", [z], [pre + "p"], axis=1))
        if need_p:
            nodes.append(helper.make_node("Mul", [pre + "p", pre + "w"], [pre + "wp"]))
            parts["proba"].append(pre + "wp")
        if "mean_sq" in want:
            nodes.append(helper.make_node("Mul", [pre + "wp", pre + "p"], [pre + "wp2"]))
            parts["mean_sq"].append(pre + "wp2")
        if need_h:
            # entropy from log-softmax: no log(0) for saturated probabilities
            nodes += [
                helper.make_node("LogSoftmax", [z], [pre + "lp"], axis=1),
                helper.make_node("Mul", [pre + "p", pre + "lp"], [pre + "plp"]),
                helper.make_node("ReduceSum", [pre + "plp", "_axis1"], [pre + "nh"], keepdims=0),
                helper.make_node("Mul", [pre + "nh", pre + "w"], [pre + "wnh"]),
            ]
            parts["ee"].append(pre + "wnh")
    if need_p:
        nodes.append(helper.make_node("Sum", parts["proba"], ["proba"]))
        if "proba" in want:
            out("proba", True)
    if "mean_sq" in want:
        nodes.append(helper.make_node("Sum", parts["mean_sq"], ["mean_sq"]))
        out("mean_sq", True)
    if need_h:
        nodes += [
            helper.make_node("Sum", parts["ee"], ["_neg_ee"]),
            helper.make_node("Neg", ["_neg_ee"], ["expected_entropy"]),
        ]
        if "expected_entropy" in want:
            out("expected_entropy", False)
    if want & {"entropy", "mutual_information"}:
        inits += [_scalar("_tiny", float(np.finfo(np.float32).tiny)), _scalar("_zero", 0.0)]
        nodes += [
            helper.make_node("Max", ["proba", "_tiny"], ["_pc"]),
            helper.make_node("Log", ["_pc"], ["_logp"]),
            helper.make_node("Mul", ["proba", "_logp"], ["_plogp"]),
            helper.make_node("ReduceSum", ["_plogp", "_axis1"], ["_neg_h"], keepdims=0),
            helper.make_node("Neg", ["_neg_h"], ["_h"]),
            helper.make_node("Max", ["_h", "_zero"], ["entropy"]),
        ]
        if "entropy" in want:
            out("entropy", False)
        if "mutual_information" in want:
            nodes += [
                helper.make_node("Sub", ["entropy", "expected_entropy"], ["_mi"]),
                helper.make_node("Max", ["_mi", "_zero"], ["mutual_information"]),
            ]
            out("mutual_information", False)

    image = onnx.ValueInfoProto()
    image.CopyFrom(image_vi)
    image.name = IMAGE
    graph = helper.make_graph(
        nodes,
        "uqseg_fused_ensemble",
        [image],
        graph_outputs,
        initializer=inits,
        value_info=value_info,
    )
    opsets: dict[str, int] = {}
    for p in protos:
        for o in p.opset_import:
            dom = "" if o.domain == "ai.onnx" else o.domain
            opsets[dom] = max(opsets.get(dom, 0), o.version)
    opsets[""] = max(opsets.get("", 0), target)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())]
    )
    model.ir_version = max(p.ir_version for p in protos)
    props = {"uqseg.n_members": str(m), "uqseg.spatial_divisor": str(divisor)}
    if n_classes is not None:
        props["uqseg.n_classes"] = n_classes
    helper.set_model_props(model, props)
    return model
