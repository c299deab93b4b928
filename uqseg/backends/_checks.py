"""Checks of what a model file claims (``uqseg.*`` metadata) and of what a network returns.

A model is untrusted: its metadata is validated before any of it sizes an allocation or a
division, and every logits array an engine returns is checked (floating dtype, the padded
input's batch and spatial shape, the expected class count, finite values) before it becomes
probabilities.
"""

from __future__ import annotations

import json
import re

import numpy as np
import onnx

N_CLASSES_KEY = "uqseg.n_classes"
DIVISOR_KEY = "uqseg.spatial_divisor"
MC_DROPOUT_KEY = "uqseg.mc_dropout"
FEATURE_LAYERS_KEY = "uqseg.feature_layers"
ACTIVATION_KEY = "uqseg.activation"
ACTIVATIONS = ("softmax", "sigmoid", "none")
PREPROCESSING_KEY = "uqseg.preprocessing"
#: upper bounds of metadata values: far above any real network, low enough that sizes derived
#: from them (padding to the divisor, one output channel per class) stay allocatable
MAX_SPATIAL_DIVISOR = 4096
MAX_CLASSES = 1 << 16
MAX_MC_WIDTH = 1 << 20
_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16}


class ModelOutputError(ValueError):
    """A network returned something that cannot be logits of its input."""


def _positive_int(raw: str, key: str, upper: int, where: str) -> int:
    if not isinstance(raw, str) or not re.fullmatch(r"[0-9]{1,12}", raw.strip()):
        raise ValueError(f"{where}: metadata {key!r} must be a positive integer, got {raw!r}")
    value = int(raw)
    if not 1 <= value <= upper:
        raise ValueError(f"{where}: metadata {key!r} must lie in 1..{upper}, got {value}")
    return value


def _dims(vi: onnx.ValueInfoProto) -> list[int | None] | None:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def _mc_dropout(raw: str, proto: onnx.ModelProto, where: str) -> dict:
    key = MC_DROPOUT_KEY
    try:
        spec = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{where}: metadata {key!r} is not valid JSON: {raw[:80]!r}") from exc
    if not isinstance(spec, dict) or not set(spec) <= {"input", "p", "size"} \
            or not isinstance(spec.get("input"), str):
        raise ValueError(f"{where}: metadata {key!r} must be a JSON object with keys 'input' "
                         f"(an input name), 'p' and 'size'; got {raw[:80]!r}")
    inputs = {i.name: i for i in proto.graph.input}
    if spec["input"] not in inputs:
        raise ValueError(f"{where}: metadata {key!r} names the input {spec['input']!r}, which "
                         f"the model does not take (inputs: {sorted(inputs)})")
    p = spec.get("p")
    if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float))
                          or not 0 <= p < 1):
        raise ValueError(f"{where}: metadata {key!r} has p={p!r}; expected a dropout "
                         "probability in [0, 1) or null")
    size = spec.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int)
                             or not 1 <= size <= MAX_MC_WIDTH):
        raise ValueError(f"{where}: metadata {key!r} has size={size!r}; expected an integer "
                         f"in 1..{MAX_MC_WIDTH} or null")
    dims = _dims(inputs[spec["input"]])
    if dims is not None and (len(dims) != 2 or (size and dims[1] and dims[1] != size)):
        raise ValueError(f"{where}: metadata {key!r} (size={size!r}) does not match the mask "
                         f"input {spec['input']!r} of shape {dims}; expected (N, size)")
    return {"input": spec["input"], "p": p, "size": size}


def _feature_layers(raw: str, proto: onnx.ModelProto, where: str) -> list[str]:
    key = FEATURE_LAYERS_KEY
    try:
        names = json.loads(raw)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"{where}: metadata {key!r} is not valid JSON: {raw[:80]!r}") from exc
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{where}: metadata {key!r} must be a JSON list of names")
    known = {o for node in proto.graph.node for o in node.output if o}
    known.update(i.name for i in proto.graph.input)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"{where}: metadata {key!r} names {unknown[:5]}, which are not tensors "
                         "of the model's graph")
    return names


def check_metadata(proto: onnx.ModelProto, where: str = "the model") -> dict:
    """The validated ``uqseg.*`` metadata: ``n_classes`` (int or None), ``spatial_divisor``
    (int, default 1), ``mc_dropout`` (dict or None), ``feature_layers`` (list),
    ``activation`` (one of ``ACTIVATIONS`` or None), ``preprocessing`` (a
    :class:`uqseg.preprocessing.Preprocessing` or None)."""
    meta = {p.key: p.value for p in proto.metadata_props}
    out: dict = {"n_classes": None, "spatial_divisor": 1, "mc_dropout": None,
                 "feature_layers": [], "activation": None, "preprocessing": None}
    if DIVISOR_KEY in meta:
        out["spatial_divisor"] = _positive_int(meta[DIVISOR_KEY], DIVISOR_KEY,
                                               MAX_SPATIAL_DIVISOR, where)
    if N_CLASSES_KEY in meta:
        k = _positive_int(meta[N_CLASSES_KEY], N_CLASSES_KEY, MAX_CLASSES, where)
        outs = proto.graph.output
        vi = next((o for o in outs if o.name == "logits"), outs[0] if outs else None)
        dims = _dims(vi) if vi is not None else None
        if dims and len(dims) > 1 and dims[1] is not None and dims[1] != k:
            raise ValueError(f"{where}: metadata {N_CLASSES_KEY!r} says {k} classes but the "
                             f"output {vi.name!r} has {dims[1]} channels (shape {dims})")
        out["n_classes"] = k
    if MC_DROPOUT_KEY in meta:
        out["mc_dropout"] = _mc_dropout(meta[MC_DROPOUT_KEY], proto, where)
    if ACTIVATION_KEY in meta:
        act = meta[ACTIVATION_KEY]
        if act not in ACTIVATIONS:
            raise ValueError(f"{where}: metadata {ACTIVATION_KEY!r} must be one of "
                             f"{ACTIVATIONS}, got {act[:40]!r}")
        out["activation"] = act
    if meta.get(FEATURE_LAYERS_KEY):
        out["feature_layers"] = _feature_layers(meta[FEATURE_LAYERS_KEY], proto, where)
    if PREPROCESSING_KEY in meta:
        from uqseg.preprocessing import Preprocessing

        try:
            out["preprocessing"] = Preprocessing.from_json(meta[PREPROCESSING_KEY])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{where}: metadata {PREPROCESSING_KEY!r}: {exc}") from exc
    return out


def check_output_type(vi: onnx.ValueInfoProto, where: str) -> None:
    """The declared logits output must be floating point (integer "logits" are no logits)."""
    elem = vi.type.tensor_type.elem_type
    if vi.type.HasField("tensor_type") and elem and elem not in _FLOAT_TYPES:
        raise ValueError(f"{where}: the output {vi.name!r} is of type "
                         f"{onnx.TensorProto.DataType.Name(elem)}; a segmentation network must "
                         "output floating-point logits")


def check_logits(value: np.ndarray, *, n: int, n_classes: int | None,
                 spatial: tuple[int, ...], where: str, name: str = "logits") -> None:
    """Raise :class:`ModelOutputError` unless ``value`` is finite floating-point logits of
    shape ``(n, n_classes, *spatial)``."""
    if value.dtype.kind != "f":
        raise ModelOutputError(f"{where}: the network returned {name!r} of dtype {value.dtype}; "
                               "a segmentation network must output floating-point logits")
    k = n_classes if n_classes is not None else (value.shape[1] if value.ndim > 1 else -1)
    want = (n, k, *spatial)
    if value.shape != want:
        raise ModelOutputError(
            f"{where}: the network returned {name!r} of shape {value.shape} for an input of "
            f"{n} image(s) of spatial size {tuple(spatial)}; expected {want} (batch, classes, "
            "the input's spatial size)")
    # one vectorised pass, ~0.1% of an inference (see docs/security.md)
    if not np.isfinite(value).all():
        nan = int(np.isnan(value).sum())
        inf = int(np.isinf(value).sum())
        raise ModelOutputError(f"{where}: the network returned non-finite {name!r} ({nan} NaN "
                               f"and {inf} infinite of {value.size} values)")
