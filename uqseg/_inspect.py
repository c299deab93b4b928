"""``uqseg inspect``: what uqseg sees in an ONNX file, and writing its ``uqseg.*`` metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import onnx

from uqseg.backends import graph
from uqseg.backends._checks import (
    ACTIVATION_KEY,
    DIVISOR_KEY,
    FEATURE_LAYERS_KEY,
    MC_DROPOUT_KEY,
    N_CLASSES_KEY,
    PREPROCESSING_KEY,
    check_metadata,
)
from uqseg.backends._model import read_model

#: ``--set`` keys and the metadata they write
SETTABLE = {"activation": ACTIVATION_KEY, "n_classes": N_CLASSES_KEY,
            "spatial_divisor": DIVISOR_KEY, "feature_layers": FEATURE_LAYERS_KEY,
            "preprocessing": PREPROCESSING_KEY, "mc_dropout": MC_DROPOUT_KEY}
N_CANDIDATES = 12


def _dims(vi) -> list:
    t = vi.type.tensor_type
    if not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in t.shape.dim]


def _layer(struct, name) -> dict:
    out = {"name": name}
    if struct is not None and name in struct.shapes:
        out["shape_at_probe"] = list(struct.shapes[name])
    if struct is not None and name in struct.factors:
        out["resolution"] = graph.resolution(struct.factors[name])
    return out


def inspect_model(path) -> dict:
    """A JSON-serialisable description of the model as uqseg's estimators will use it."""
    from uqseg import KNNOODDetector, MahalanobisOODDetector, OnnxSegmenter, SpectralOODDetector
    from uqseg.quality_typicality import _typicality_layer

    proto, _ = read_model(path)
    seg = OnnxSegmenter(str(path), device="cpu", backend="onnxruntime").fit()
    meta = {p.key: p.value for p in proto.metadata_props}
    struct = graph.structure(proto, output=seg.output_name_ if any(
        o.name == seg.output_name_ for o in proto.graph.output) else None)
    inputs = [{"name": i.name, "shape": _dims(i),
               "dtype": onnx.TensorProto.DataType.Name(i.type.tensor_type.elem_type)}
              for i in proto.graph.input if i.name not in {t.name for t in proto.graph.initializer}]
    outputs = []
    for o in proto.graph.output:
        item = {"name": o.name, "shape": _dims(o)}
        f = struct.outputs.get(o.name) if struct is not None else None
        if f is not None:
            item["resolution"] = graph.resolution(f)
        outputs.append(item)
    divisor_source = ("metadata" if DIVISOR_KEY in meta else "graph"
                      if struct is not None and struct.divisor == seg.spatial_divisor_
                      and struct.divisor is not None else "default")
    named = graph.preferred_layers(proto)
    roles = {r: _layer(struct, n) for r, n in seg.layer_roles_.items()}
    cands = [_layer(struct, n) for n in seg.feature_layers_[:N_CANDIDATES]]
    defaults: dict = {"OnnxSegmenter": {
        "output": seg.output_name_, "activation": seg.activation_,
        "spatial_divisor": seg.spatial_divisor_}}
    for cls in (SpectralOODDetector, MahalanobisOODDetector, KNNOODDetector):
        det = cls(seg)
        det.estimator_ = seg
        try:
            det._setup()
            item = {"layers": list(det.layers_)}
            if hasattr(det, "descriptors_"):  # the default Spectrum and Layout
                spectrum, layout = det.descriptors_
                item = {"layers": spectrum.layers_, "layout_layer": layout.layers_[0]}
        except (ValueError, TypeError) as exc:
            item = {"error": str(exc)}
        defaults[cls.__name__] = item
    defaults["QualityRegressor"] = {"typicality_layer": _typicality_layer(seg)
                                    if seg.feature_layers_ else None}
    defaults["TemperatureCalibrator"] = {
        "temperature": "per channel (binary NLL)" if seg.activation_ == "sigmoid"
        else "global (multiclass NLL)" if seg.activation_ == "softmax"
        else "not applicable: the network outputs probabilities"}
    defaults["EnsembleSegmenter"] = {
        "mc_dropout": seg.mc_dropout_ is not None,
        "uncertainty": "Bernoulli entropy per channel" if seg.activation_ == "sigmoid"
        else "entropy over classes"}
    return {
        "model": str(path),
        "inputs": inputs,
        "outputs": outputs,
        "segmentation_output": seg.output_name_,
        "activation": seg.activation_,
        "n_classes": seg.n_classes_,
        "spatial_divisor": {"value": seg.spatial_divisor_, "source": divisor_source},
        "mc_dropout": seg.mc_dropout_,
        "preprocessing": json.loads(meta[PREPROCESSING_KEY]) if PREPROCESSING_KEY in meta
        else None,
        "metadata": {k: v for k, v in meta.items() if k.startswith("uqseg.")},
        "feature_layers": {"named": named, "roles": roles, "candidates": cands,
                           "n_candidates": len(seg.feature_layers_),
                           "probe": list(struct.probe) if struct is not None else None},
        "defaults": defaults,
    }


def format_report(info: dict) -> str:
    lines = [f"model: {info['model']}"]
    for key in ("inputs", "outputs"):
        lines.append(f"{key}:")
        for item in info[key]:
            res = f"  ({item['resolution']} resolution)" if "resolution" in item else ""
            lines.append(f"  {item['name']}: {item['shape']}{res}")
    div = info["spatial_divisor"]
    lines += [f"segmentation output: {info['segmentation_output']}",
              f"activation: {info['activation']}",
              f"classes: {info['n_classes']}",
              f"spatial divisor: {div['value']} (from {div['source']})",
              f"MC-dropout input: {info['mc_dropout']['input'] if info['mc_dropout'] else 'none'}",
              f"preprocessing: {'yes' if info['preprocessing'] else 'none'}"]
    fl = info["feature_layers"]
    lines.append(f"named feature layers (metadata): {fl['named'] or 'none'}")
    probe = fl["probe"]
    lines.append("layers found by structure" + (f" (shapes at a {probe} input)" if probe else "")
                 + ":" + ("" if fl["roles"] else " none"))
    for role, item in fl["roles"].items():
        lines.append(f"  {role}: {item['name']}  {item.get('shape_at_probe')}  "
                     f"{item.get('resolution', '?')}")
    lines.append(f"candidate feature layers ({fl['n_candidates']}, first {len(fl['candidates'])}):")
    for item in fl["candidates"]:
        lines.append(f"  {item['name']}  {item.get('shape_at_probe')}  "
                     f"{item.get('resolution', '?')}")
    lines.append("estimator defaults:")
    for name, d in info["defaults"].items():
        lines.append(f"  {name}: " + ", ".join(f"{k}={v}" for k, v in d.items()))
    return "\n".join(lines)


def parse_settings(pairs: list[str]) -> dict:
    """``["KEY=VALUE", ...]`` -> ``{metadata key: value}``; keys of :data:`SETTABLE`."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or key not in SETTABLE:
            raise ValueError(f"--set takes KEY=VALUE with KEY one of {sorted(SETTABLE)}; got "
                             f"{pair!r}")
        if key == "preprocessing":  # normalised (and validated) like set_preprocessing does
            from uqseg.preprocessing import Preprocessing

            value = Preprocessing.from_json(value).to_json()
        out[SETTABLE[key]] = value.strip() if key != "preprocessing" else value
    return out


def write_metadata(path, settings: dict, out, *, overwrite: bool = False) -> Path:
    """A copy of ``path`` with ``settings`` in its metadata (graph and weights untouched),
    written only when the metadata validates and the copy fits as an :class:`OnnxSegmenter`."""
    from uqseg import OnnxSegmenter

    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{str(out)!r} exists; pass --overwrite to replace it")
    if out.resolve() == Path(path).resolve():
        raise ValueError("--out must differ from the model: the original stays untouched")
    proto, _ = read_model(path)  # external data embedded: the copy stands alone
    keep = [(p.key, p.value) for p in proto.metadata_props if p.key not in settings]
    del proto.metadata_props[:]
    for k, v in keep + sorted(settings.items()):
        proto.metadata_props.add(key=k, value=v)
    check_metadata(proto, f"--set on {str(path)!r}")
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        onnx.save(proto, str(tmp))
        OnnxSegmenter(str(tmp), device="cpu", backend="onnxruntime").fit()  # e.g. n_classes
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
