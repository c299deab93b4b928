"""Reading and checking ONNX model files before any engine sees them."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx

ModelLike = str | os.PathLike | bytes | onnx.ModelProto


def read_model(model: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    """Load an ONNX model from a path, bytes or a ModelProto.

    Returns the model and the folder it came from (for external data), raising
    FileNotFoundError for a missing file and ValueError for one that is not a valid model.
    """
    if isinstance(model, onnx.ModelProto):
        proto, folder = model, None
    elif isinstance(model, (bytes, bytearray)):
        proto, folder = _parse(bytes(model), "<bytes>"), None
    elif isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.exists():
            raise FileNotFoundError(f"model file not found: {str(path)!r}")
        if path.is_dir():
            raise ValueError(f"model must be an ONNX file, got a directory: {str(path)!r}")
        proto, folder = _parse(path.read_bytes(), str(path)), path.resolve().parent
    else:
        raise TypeError(
            f"model must be a path, bytes or onnx.ModelProto, got {type(model).__name__}"
        )
    check_structure(proto, folder)
    return proto, folder


def with_external_data(proto: onnx.ModelProto, folder: Path | None) -> onnx.ModelProto:
    """Pull vetted external weights into the proto: engines receive the model as bytes."""
    if folder is not None and any(True for _ in _external_tensors(proto)):
        onnx.load_external_data_for_model(proto, str(folder))
    return proto


def _parse(data: bytes, where: str) -> onnx.ModelProto:
    if not data:
        raise ValueError(f"model file {where} is empty")
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError, RuntimeWarning-free
        raise ValueError(f"{where} is not a valid ONNX model (corrupt or not ONNX): {exc}") from exc
    if not proto.graph.node and not proto.graph.output:
        raise ValueError(f"{where} is not a valid ONNX model: it has no graph")
    return proto


def check_structure(proto: onnx.ModelProto, folder: Path | None) -> None:
    """Refuse models that cannot be a segmentation network or that reach outside their folder."""
    graph = proto.graph
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if not inputs:
        raise ValueError("ONNX model has no input: a segmentation network needs an image input")
    if not graph.output:
        raise ValueError("ONNX model has no output: a segmentation network needs a logits output")
    for tensor in _external_tensors(proto):
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if location is None:
            raise ValueError(f"initializer {tensor.name!r} has external data without a location")
        if folder is None:
            raise ValueError(
                f"initializer {tensor.name!r} uses external data ({location!r}); load the model "
                "from its file path so the data can be found"
            )
        target = (folder / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(folder):
            raise ValueError(
                f"initializer {tensor.name!r} points to external data outside the model's folder "
                f"({location!r}); refusing to read it"
            )
        if not target.exists():
            raise FileNotFoundError(f"external data file {location!r} of the model is missing")


def _external_tensors(proto: onnx.ModelProto):
    for t in proto.graph.initializer:
        if t.data_location == onnx.TensorProto.EXTERNAL:
            yield t


def model_bytes(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString()


def content_hash(proto: onnx.ModelProto) -> str:
    return hashlib.sha256(model_bytes(proto)).hexdigest()


def image_input_names(proto: onnx.ModelProto) -> list[str]:
    init_names = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in init_names]


def metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}
