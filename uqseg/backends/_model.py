"""Reading and checking ONNX model files before any engine sees them.

A model file is untrusted input. Every tensor that keeps its bytes in an external file,
wherever it sits in the model (initializers, sparse initializers, node attributes, the
subgraphs of If/Loop/Scan, model-local functions, training graphs), is resolved here, against
the model's own folder only, and embedded into the model before an engine is built: ONNX
Runtime and TensorRT receive self-contained bytes, so neither ever opens a file on the model's
behalf (both would resolve a location against the process's working directory).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath

import onnx

from uqseg.backends._checks import check_metadata

ModelLike = str | os.PathLike | bytes | onnx.ModelProto

_EXTERNAL = onnx.TensorProto.EXTERNAL
# elements per byte of the packed sub-byte types (every other type: numpy's item size)
_PACKED = {onnx.TensorProto.INT4: 2, onnx.TensorProto.UINT4: 2,
           getattr(onnx.TensorProto, "FLOAT4E2M1", -1): 2,
           getattr(onnx.TensorProto, "INT2", -2): 4, getattr(onnx.TensorProto, "UINT2", -3): 4}
# ONNX Runtime's precompiled-engine node: its attributes name engine files to load
_FILE_READING_OPS = {"EPContext"}


def read_model(model: ModelLike) -> tuple[onnx.ModelProto, Path | None]:
    """Load an ONNX model from a path, bytes or a ModelProto.

    Returns the model and the folder it came from (for external data), raising
    FileNotFoundError for a missing file and ValueError for one that is not a valid model,
    that reaches outside its folder or whose ``uqseg.*`` metadata is malformed.
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
        proto, folder = _parse(path.read_bytes(), repr(str(path))), path.resolve().parent
    else:
        raise TypeError(
            f"model must be a path, bytes or onnx.ModelProto, got {type(model).__name__}"
        )
    check_structure(proto, folder, describe(model))
    return proto, folder


def describe(model: ModelLike) -> str:
    """How error messages name ``model``."""
    if isinstance(model, (str, os.PathLike)):
        return f"model {str(model)!r}"
    return "model <bytes>" if isinstance(model, (bytes, bytearray)) else "model <onnx.ModelProto>"


def with_external_data(proto: onnx.ModelProto, folder: Path | None,
                       where: str = "the model") -> onnx.ModelProto:
    """Embed every external tensor's bytes (read from ``folder`` after the checks of
    :func:`check_structure`) so that engines receive the model as self-contained bytes.

    ``proto`` is changed in place (it is the fresh copy :func:`read_model` parsed) and
    returned.
    """
    for here, tensor in iter_tensors(proto):
        if not is_external(tensor):
            continue
        if folder is None:
            raise ValueError(_no_folder(where, here, _location(tensor)))
        path, offset, length = _source(tensor, folder, where, here)
        data = _read_range(path, offset, length, where, here)
        tensor.ClearField("external_data")
        tensor.data_location = onnx.TensorProto.DEFAULT
        tensor.raw_data = data
    assert_self_contained(proto, where)
    return proto


def assert_self_contained(proto: onnx.ModelProto, where: str = "the model") -> None:
    """Raise unless no tensor of ``proto`` still refers to external data: the bytes handed to
    an engine must never make it open a file (it would resolve it against the working
    directory)."""
    for here, tensor in iter_tensors(proto):
        if is_external(tensor):
            raise ValueError(
                f"{where}: {here} still refers to external data ({_location(tensor)!r}); "
                "refusing to hand it to an inference engine")


def external_locations(proto: onnx.ModelProto) -> list[str]:
    """Sorted distinct external-data locations referenced anywhere in the model."""
    return sorted({loc for _, t in iter_tensors(proto) if is_external(t)
                   for loc in [_location(t)] if loc is not None})


def is_external(tensor: onnx.TensorProto) -> bool:
    # either marker counts: an engine may honour one without the other
    return tensor.data_location == _EXTERNAL or len(tensor.external_data) > 0


def iter_tensors(proto: onnx.ModelProto) -> Iterator[tuple[str, onnx.TensorProto]]:
    """Every TensorProto in the model with a description of where it sits.

    Graph initializers, sparse initializers (values and indices), node attributes (``t``,
    ``tensors``, ``sparse_tensor(s)``), subgraph attributes (``g``, ``graphs``) at any depth,
    model-local functions and training-info graphs.
    """
    graphs: list[tuple[str, onnx.GraphProto]] = [("main graph", proto.graph)]
    nodes: list[tuple[str, onnx.NodeProto]] = []
    for f in proto.functions:
        nodes += [(f"function {f.name!r}", n) for n in f.node]
    for i, info in enumerate(proto.training_info):
        graphs += [(f"training_info[{i}] initialization", info.initialization),
                   (f"training_info[{i}] algorithm", info.algorithm)]
    while graphs or nodes:  # explicit stack: nesting depth cannot exhaust Python's recursion
        if graphs:
            where, g = graphs.pop()
            for t in g.initializer:
                yield f"{where} initializer {t.name!r}", t
            for s in g.sparse_initializer:
                yield from _sparse(s, f"{where} sparse initializer {s.values.name!r}")
            nodes += [(where, n) for n in g.node]
            continue
        where, node = nodes.pop()
        label = node.name or node.op_type
        for a in node.attribute:
            here = f"{where} node {label!r} attribute {a.name!r}"
            if a.HasField("t"):
                yield here, a.t
            for t in a.tensors:
                yield here, t
            if a.HasField("sparse_tensor"):
                yield from _sparse(a.sparse_tensor, here)
            for s in a.sparse_tensors:
                yield from _sparse(s, here)
            if a.HasField("g"):
                graphs.append((f"{here} subgraph", a.g))
            graphs += [(f"{here} subgraph", g) for g in a.graphs]


def _sparse(s: onnx.SparseTensorProto, where: str):
    yield f"{where} (values)", s.values
    yield f"{where} (indices)", s.indices


def _iter_nodes(proto: onnx.ModelProto) -> Iterator[onnx.NodeProto]:
    stack = [proto.graph] + [i.initialization for i in proto.training_info] + \
        [i.algorithm for i in proto.training_info]
    pending = [n for f in proto.functions for n in f.node]
    while stack or pending:
        if stack:
            pending += list(stack.pop().node)
            continue
        node = pending.pop()
        yield node
        for a in node.attribute:
            if a.HasField("g"):
                stack.append(a.g)
            stack += list(a.graphs)


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


def check_structure(proto: onnx.ModelProto, folder: Path | None,
                    where: str = "the model") -> None:
    """Refuse models that cannot be a segmentation network, that reach outside their folder
    or whose ``uqseg.*`` metadata is malformed."""
    graph = proto.graph
    init_names = {t.name for t in graph.initializer}
    inputs = [i for i in graph.input if i.name not in init_names]
    if not inputs:
        raise ValueError(f"ONNX model has no input ({where}): a segmentation network needs an "
                         "image input")
    if not graph.output:
        raise ValueError(f"ONNX model has no output ({where}): a segmentation network needs a "
                         "logits output")
    for node in _iter_nodes(proto):
        if node.op_type in _FILE_READING_OPS:
            raise ValueError(
                f"{where} contains an {node.op_type!r} node ({node.name!r}), which makes the "
                "engine load precompiled files named in the model; refusing it")
    for here, tensor in iter_tensors(proto):
        if not is_external(tensor):
            continue
        if folder is None:
            raise ValueError(_no_folder(where, here, _location(tensor)))
        path, offset, length = _source(tensor, folder, where, here)
        size = path.stat().st_size
        if offset + length > size:
            raise ValueError(
                f"{where}: {here} reads bytes {offset}..{offset + length} of its external data "
                f"file {_location(tensor)!r}, which has only {size} bytes")
    check_metadata(proto, where)


def _no_folder(where: str, here: str, location) -> str:
    return (f"{where}: {here} uses external data ({location!r}); load the model from its file "
            "path so the data can be found in the model's folder")


def _location(tensor: onnx.TensorProto) -> str | None:
    return next((e.value for e in tensor.external_data if e.key == "location"), None)


def _check_location(location: str | None, where: str, here: str) -> None:
    """A plain relative path below the model's folder: no absolute path, drive, URL, ``..``
    or NUL, in POSIX or Windows spelling."""
    if not location:
        raise ValueError(f"{where}: {here} has external data without a location")
    win = PureWindowsPath(location)
    bad = (
        "\0" in location or ":" in location or location.startswith(("/", "\\"))
        or os.path.isabs(location) or win.is_absolute() or bool(win.drive)
        or ".." in PurePosixPath(location.replace("\\", "/")).parts
    )
    if bad:
        raise ValueError(
            f"{where}: {here} points to external data outside the model's folder "
            f"({location!r}); only relative paths below the folder are read; refusing to read it")


def _source(tensor: onnx.TensorProto, folder: Path, where: str,
            here: str) -> tuple[Path, int, int]:
    """The vetted file, offset and byte count of an external tensor."""
    location = _location(tensor)
    _check_location(location, where, here)
    target = (folder / location).resolve()
    if not target.is_relative_to(folder):  # a symlink leaving the folder
        raise ValueError(
            f"{where}: {here} points to external data outside the model's folder "
            f"({location!r} resolves to a path outside it); refusing to read it")
    if not target.exists():
        raise FileNotFoundError(f"{where}: {here}: external data file {location!r} is "
                                "missing from the model's folder")
    if not stat.S_ISREG(target.stat().st_mode):
        raise ValueError(f"{where}: external data {location!r} of {here} is not a regular file")
    entries = {e.key: e.value for e in tensor.external_data}
    offset = _int_entry(entries, "offset", 0, where, here)
    expected = _byte_size(tensor, where, here)
    length = _int_entry(entries, "length", expected, where, here)
    if length != expected:
        raise ValueError(
            f"{where}: {here} declares {length} bytes of external data but its shape and type "
            f"need {expected}")
    return target, offset, length


def _int_entry(entries: dict, key: str, default: int, where: str, here: str) -> int:
    raw = entries.get(key)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ValueError(f"{where}: {here} has external data {key} {raw!r}; expected a "
                         "non-negative integer")
    return int(raw)


def _byte_size(tensor: onnx.TensorProto, where: str, here: str) -> int:
    if any(d < 0 for d in tensor.dims):
        raise ValueError(f"{where}: {here} has negative dimensions {list(tensor.dims)}")
    numel = 1
    for d in tensor.dims:
        numel *= int(d)
    if tensor.data_type in _PACKED:
        return -(-numel // _PACKED[tensor.data_type])
    if tensor.data_type in (onnx.TensorProto.STRING, onnx.TensorProto.UNDEFINED):
        raise ValueError(f"{where}: {here} has external data of type "
                         f"{onnx.TensorProto.DataType.Name(tensor.data_type)}, which cannot be "
                         "stored externally")
    try:
        item = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception as exc:
        raise ValueError(f"{where}: {here} has an unknown data type {tensor.data_type}") from exc
    return numel * item


def _read_range(path: Path, offset: int, length: int, where: str, here: str) -> bytes:
    # O_NONBLOCK: a FIFO swapped in after the checks cannot hang the open; fstat re-checks
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or offset + length > info.st_size:
            raise ValueError(f"{where}: external data of {here} changed while it was read")
        fh.seek(offset)
        data = fh.read(length)
    if len(data) != length:
        raise ValueError(f"{where}: external data of {here} is shorter than declared")
    return data


def model_bytes(proto: onnx.ModelProto) -> bytes:
    return proto.SerializeToString()


def content_hash(proto: onnx.ModelProto) -> str:
    return hashlib.sha256(model_bytes(proto)).hexdigest()


def image_input_names(proto: onnx.ModelProto) -> list[str]:
    init_names = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.name not in init_names]


def metadata(proto: onnx.ModelProto) -> dict[str, str]:
    return {p.key: p.value for p in proto.metadata_props}
