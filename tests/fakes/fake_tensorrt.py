"""A fake ``tensorrt`` module: the documented TensorRT 10/11 Python API surface that
:class:`uqseg.backends.tensorrt.TensorRTRunner` uses, with the documented contracts checked.

Implemented (names and return conventions as in the TensorRT Python API reference):
``Logger(Logger.WARNING)``; ``Builder(logger).create_network(flags)`` with
``NetworkDefinitionCreationFlag`` (TensorRT 10: ``EXPLICIT_BATCH=0`` deprecated,
``STRONGLY_TYPED=1``; TensorRT 11: ``STRONGLY_TYPED=0``, deprecated and ignored);
``OnnxParser(network, logger).parse(bytes) -> bool`` with ``num_errors`` / ``get_error(i)``;
``create_builder_config()`` with ``set_memory_pool_limit(MemoryPoolType.WORKSPACE, int)``,
``add_optimization_profile(profile) -> index`` (-1 when invalid),
``create_timing_cache(buffer)``, ``set_timing_cache(cache, ignore_mismatch) -> bool``,
``get_timing_cache().serialize()``; ``create_optimization_profile().set_shape(name, min, opt,
max)``; ``build_serialized_network(network, config) -> IHostMemory | None``;
``Runtime(logger).deserialize_cuda_engine(buffer) -> ICudaEngine | None``; the engine's
``num_io_tensors``, ``get_tensor_name(i)``, ``get_tensor_mode``, ``get_tensor_dtype``,
``get_tensor_shape`` (-1 for dynamic axes) and ``create_execution_context()``; the context's
``set_input_shape(name, shape) -> bool`` (False outside the profile),
``get_tensor_shape(name)``, ``set_tensor_address(name, ptr) -> bool`` and
``execute_async_v3(stream_handle) -> bool``.

What the fake cannot speak for: real kernels and their numerics (the "engine" runs the ONNX
graph with ONNX Runtime on the CPU), layer fusions, fp16 accuracy on a GPU, tactic timing,
memory limits, and the exact text of TensorRT's error messages. Contract violations that real
TensorRT would turn into silent garbage (a buffer of the wrong shape or dtype behind an
address) raise ``AssertionError`` here so that the tests see them.
"""

from __future__ import annotations

import enum
import json
import types

import numpy as np
import onnx
import onnxruntime as ort

_MAGIC = b"FAKE-TRT-ENGINE\n"
_TC_MAGIC = b"FAKE-TRT-TIMING\n"


class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9


class TensorIOMode(enum.Enum):
    NONE = 0
    INPUT = 1
    OUTPUT = 2


class MemoryPoolType(enum.Enum):
    WORKSPACE = 0
    DLA_MANAGED_SRAM = 1
    DLA_LOCAL_DRAM = 2
    DLA_GLOBAL_DRAM = 3
    TACTIC_DRAM = 4


_ONNX_TO_TRT = {
    onnx.TensorProto.FLOAT: DataType.FLOAT,
    onnx.TensorProto.FLOAT16: DataType.HALF,
    onnx.TensorProto.INT8: DataType.INT8,
    onnx.TensorProto.INT32: DataType.INT32,
    onnx.TensorProto.BOOL: DataType.BOOL,
    onnx.TensorProto.UINT8: DataType.UINT8,
    onnx.TensorProto.BFLOAT16: DataType.BF16,
    onnx.TensorProto.INT64: DataType.INT64,
}
_NUMPY_OF = {DataType.FLOAT: np.float32, DataType.HALF: np.float16, DataType.INT8: np.int8,
             DataType.INT32: np.int32, DataType.BOOL: np.bool_, DataType.UINT8: np.uint8,
             DataType.INT64: np.int64}


def make_tensorrt(version: str = "10.13.0", memory: dict | None = None) -> types.ModuleType:
    """A fresh fake ``tensorrt`` module; ``memory`` maps device pointers to numpy arrays
    (the fake CuPy's table). ``mod.log`` records every call the runner makes."""
    major = int(version.split(".")[0])
    if major not in (10, 11):
        raise ValueError("the fake models TensorRT 10 and 11 only")
    mod = types.ModuleType("tensorrt")
    mod.__version__ = version
    mod.log = []  # (call name, details) in call order
    mod.fail_build = False  # build_serialized_network returns None (e.g. out of memory)
    mod.fail_execute = False  # execute_async_v3 returns False
    memory = {} if memory is None else memory
    mod.memory = memory
    mod.DataType, mod.TensorIOMode, mod.MemoryPoolType = DataType, TensorIOMode, MemoryPoolType
    mod.float32, mod.float16, mod.int8, mod.int32 = (DataType.FLOAT, DataType.HALF,
                                                     DataType.INT8, DataType.INT32)
    mod.bool, mod.uint8, mod.bfloat16, mod.int64 = (DataType.BOOL, DataType.UINT8,
                                                    DataType.BF16, DataType.INT64)
    if major == 10:
        flags = enum.IntEnum("NetworkDefinitionCreationFlag",
                             {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
        mod.BuilderFlag = enum.Enum("BuilderFlag", {"FP16": 0, "BF16": 1, "INT8": 2})
    else:  # TensorRT 11: strongly typed always; the flag stays for compatibility, ignored
        flags = enum.IntEnum("NetworkDefinitionCreationFlag",
                             {"STRONGLY_TYPED": 0, "PREFER_AOT_PYTHON_PLUGINS": 1,
                              "PREFER_JIT_PYTHON_PLUGINS": 2})
        mod.BuilderFlag = enum.Enum("BuilderFlag", {"DEBUG": 0, "REFIT": 1})
    mod.NetworkDefinitionCreationFlag = flags
    n_flag_bits = len(flags)

    def record(call, **details):
        mod.log.append((call, details))

    class ILogger:
        pass

    class Logger(ILogger):
        INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        def __init__(self, min_severity=1):
            if min_severity not in range(5):
                raise TypeError(f"Logger severity must be a Logger.Severity, got {min_severity}")
            self.min_severity = min_severity
            self.messages = []

        def log(self, severity, msg):
            self.messages.append((severity, msg))

    def _check_logger(logger):
        if not isinstance(logger, ILogger):
            raise TypeError(f"incompatible function arguments: logger is {type(logger)}")

    class _Tensor:
        def __init__(self, name, shape, dtype):
            self.name, self.shape, self.dtype = name, tuple(shape), dtype

    class INetworkDefinition:
        def __init__(self, flags):
            self.flags = flags
            self.inputs, self.outputs, self.model = [], [], None

        @property
        def num_inputs(self):
            return len(self.inputs)

        def get_input(self, i):
            return self.inputs[i]

    class ParserError:
        def __init__(self, desc, node=-1):
            self._desc, self._node = desc, node

        def desc(self):
            return self._desc

        def node(self):
            return self._node

        def __str__(self):
            return f"In node {self._node} with name: and operator: (parse): {self._desc}"

    supported_ops = {"Conv", "Relu", "MaxPool", "Resize", "Concat", "Mul", "Add", "Softmax",
                     "Cast", "Identity", "Sub", "Div", "Exp", "Log", "ReduceMax", "ReduceSum",
                     "Upsample", "Flatten", "Gemm", "MatMul", "Sigmoid", "Transpose",
                     "Reshape", "GlobalAveragePool", "AveragePool", "BatchNormalization",
                     "ConvTranspose", "Neg", "Slice", "Gather", "Unsqueeze", "Squeeze",
                     "Shape", "Constant", "ReduceMean", "Pow", "Sqrt", "Clip"}

    class OnnxParser:
        def __init__(self, network, logger):
            if not isinstance(network, INetworkDefinition):
                raise TypeError("OnnxParser needs an INetworkDefinition")
            _check_logger(logger)
            self.network, self.errors = network, []

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, index):
            return self.errors[index]

        def clear_errors(self):
            self.errors = []

        def parse(self, model, path=None):
            if not isinstance(model, (bytes, bytearray, memoryview)):
                raise TypeError(f"parse() takes a buffer of ONNX bytes, got {type(model)}")
            record("parse", nbytes=len(model))
            try:
                proto = onnx.load_from_string(bytes(model))
                onnx.checker.check_model(proto)
            except Exception as exc:  # the parser reports, it does not raise
                self.errors.append(ParserError(f"ModelImporter: cannot read the model: {exc}"))
                return False
            for i, node in enumerate(proto.graph.node):
                if node.op_type not in supported_ops or node.domain not in ("", "ai.onnx"):
                    self.errors.append(ParserError(
                        f"No importer registered for op: {node.op_type}", node=i))
            if self.errors:
                return False
            init = {t.name for t in proto.graph.initializer}
            for inp in proto.graph.input:
                if inp.name in init:
                    continue
                tt = inp.type.tensor_type
                shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
                self.network.inputs.append(_Tensor(inp.name, shape, _ONNX_TO_TRT[tt.elem_type]))
            for out in proto.graph.output:
                tt = out.type.tensor_type
                shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tt.shape.dim]
                self.network.outputs.append(_Tensor(out.name, shape,
                                                    _ONNX_TO_TRT[tt.elem_type]))
            self.network.model = bytes(model)
            return True

    class IOptimizationProfile:
        def __init__(self):
            self.shapes, self.valid = {}, True

        def set_shape(self, input, min, opt, max):  # noqa: A002 - TensorRT's names
            dims = [tuple(int(d) for d in s) for s in (min, opt, max)]
            record("set_shape", input=input, min=dims[0], opt=dims[1], max=dims[2])
            ok = len({len(d) for d in dims}) == 1 and all(
                0 < lo <= o <= hi for lo, o, hi in zip(*dims, strict=True))
            if not ok:  # TensorRT logs the error and marks the profile invalid
                self.valid = False
            self.shapes[input] = tuple(dims)

    class ITimingCache:
        def __init__(self, entries):
            self.entries = entries

        def serialize(self):
            return IHostMemory(_TC_MAGIC + json.dumps({"entries": self.entries}).encode())

    class IHostMemory(bytes):
        """Supports the buffer protocol, like TensorRT's IHostMemory."""

        @property
        def nbytes(self):
            return len(self)

    class IBuilderConfig:
        def __init__(self):
            self.pool_limits, self.profiles = {}, []
            self.timing_cache, self.ignore_mismatch = None, None

        def set_memory_pool_limit(self, pool, pool_size):
            if not isinstance(pool, MemoryPoolType):
                raise TypeError(f"pool must be a MemoryPoolType, got {pool!r}")
            if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 0:
                raise TypeError(f"pool_size must be a non-negative int, got {pool_size!r}")
            record("set_memory_pool_limit", pool=pool, size=pool_size)
            self.pool_limits[pool] = pool_size

        def add_optimization_profile(self, profile):
            record("add_optimization_profile", valid=profile.valid)
            if not profile.valid:
                return -1
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, serialized_timing_cache):
            blob = bytes(serialized_timing_cache)
            record("create_timing_cache", blob=blob)
            if not blob:
                return ITimingCache(0)
            if not blob.startswith(_TC_MAGIC):
                return ITimingCache(0)  # TensorRT drops a cache it cannot read
            return ITimingCache(json.loads(blob[len(_TC_MAGIC):])["entries"])

        def set_timing_cache(self, cache, ignore_mismatch):
            if not isinstance(cache, ITimingCache) or not isinstance(ignore_mismatch, bool):
                raise TypeError("set_timing_cache(cache: ITimingCache, ignore_mismatch: bool)")
            record("set_timing_cache", ignore_mismatch=ignore_mismatch)
            self.timing_cache, self.ignore_mismatch = cache, ignore_mismatch
            return True

        def get_timing_cache(self):
            return self.timing_cache

        def set_flag(self, flag):
            if not isinstance(flag, mod.BuilderFlag):
                raise TypeError(f"flag must be a BuilderFlag, got {flag!r}")
            record("set_flag", flag=flag)

    class Builder:
        def __init__(self, logger):
            _check_logger(logger)
            self.logger = logger

        def create_network(self, flags=0):
            if not isinstance(flags, int) or flags >> n_flag_bits:
                raise TypeError(f"create_network flags must be a bit mask of "
                                f"NetworkDefinitionCreationFlag, got {flags!r}")
            record("create_network", flags=flags)
            return INetworkDefinition(flags)

        def create_builder_config(self):
            return IBuilderConfig()

        def create_optimization_profile(self):
            return IOptimizationProfile()

        def build_serialized_network(self, network, config):
            record("build_serialized_network")

            def fail(msg):
                self.logger.log(Logger.ERROR, msg)
                return None

            if network.model is None:
                return fail("network has no layers: the parser did not succeed")
            if mod.fail_build:
                return fail("out of device memory while building")
            profile = config.profiles[0] if config.profiles else None
            for t in network.inputs:
                dynamic = any(d < 0 for d in t.shape)
                if profile is None or t.name not in profile.shapes:
                    if dynamic:
                        return fail(f"input {t.name} has dynamic dimensions but no profile")
                    continue
                for dims in profile.shapes[t.name]:
                    if len(dims) != len(t.shape):
                        return fail(f"profile rank mismatch for {t.name}")
                    if any(n >= 0 and p != n for p, n in zip(dims, t.shape, strict=True)):
                        return fail(f"profile dims {dims} of {t.name} differ from the "
                                    f"static network dimensions {t.shape}")
            extra = set(profile.shapes) - {t.name for t in network.inputs} if profile else ()
            if extra:
                return fail(f"profile names unknown inputs {sorted(extra)}")
            if config.timing_cache is not None:
                config.timing_cache.entries += 1
            header = {
                "version": mod.__version__,
                "profile": {k: [list(d) for d in v] for k, v in
                            (profile.shapes.items() if profile else ())},
                "inputs": [[t.name, list(t.shape), t.dtype.name] for t in network.inputs],
                "outputs": [[t.name, list(t.shape), t.dtype.name] for t in network.outputs],
                "workspace": config.pool_limits.get(MemoryPoolType.WORKSPACE),
            }
            return IHostMemory(_MAGIC + json.dumps(header).encode() + b"\n" + network.model)

    class Runtime:
        def __init__(self, logger):
            _check_logger(logger)
            self.logger = logger

        def deserialize_cuda_engine(self, serialized_engine):
            blob = bytes(serialized_engine)
            record("deserialize_cuda_engine", nbytes=len(blob))
            if not blob.startswith(_MAGIC):
                self.logger.log(Logger.ERROR, "engine plan file is corrupted")
                return None
            head, _, model = blob[len(_MAGIC):].partition(b"\n")
            try:
                header = json.loads(head)
            except ValueError:
                return None
            if header["version"] != mod.__version__:
                self.logger.log(Logger.ERROR, "engine built with another TensorRT version")
                return None
            return ICudaEngine(header, model)

    class ICudaEngine:
        def __init__(self, header, model):
            self.header, self.model = header, model
            self._io = [(n, TensorIOMode.INPUT, tuple(s), DataType[d])
                        for n, s, d in header["inputs"]]
            self._io += [(n, TensorIOMode.OUTPUT, tuple(s), DataType[d])
                         for n, s, d in header["outputs"]]
            self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])

        @property
        def num_io_tensors(self):
            return len(self._io)

        def get_tensor_name(self, index):
            return self._io[index][0]

        def _find(self, name):
            for entry in self._io:
                if entry[0] == name:
                    return entry
            raise KeyError(f"no tensor named {name!r}")  # real TRT logs and returns junk

        def get_tensor_mode(self, name):
            return self._find(name)[1]

        def get_tensor_shape(self, name):
            return self._find(name)[2]

        def get_tensor_dtype(self, name):
            return self._find(name)[3]

        def create_execution_context(self):
            return IExecutionContext(self)

    class IExecutionContext:
        def __init__(self, engine):
            self.engine = engine
            self.shapes, self.addresses = {}, {}
            self._out_shapes = {}

        def set_input_shape(self, name, shape):
            shape = tuple(int(d) for d in shape)
            record("set_input_shape", name=name, shape=shape)
            entry = self.engine._find(name)
            if entry[1] is not TensorIOMode.INPUT or len(shape) != len(entry[2]):
                return False
            if any(n >= 0 and d != n for d, n in zip(shape, entry[2], strict=True)):
                return False
            lo, _, hi = self.engine.header["profile"].get(name, (entry[2],) * 3)
            if any(not a <= d <= b for d, a, b in zip(shape, lo, hi, strict=True)):
                return False
            self.shapes[name] = shape
            self._out_shapes = {}
            return True

        def get_tensor_shape(self, name):
            entry = self.engine._find(name)
            if entry[1] is TensorIOMode.INPUT:
                return self.shapes.get(name, entry[2])
            inputs = [e for e in self.engine._io if e[1] is TensorIOMode.INPUT]
            if any(e[0] not in self.shapes for e in inputs):
                return entry[2]  # -1 where unknown, as TensorRT
            if not self._out_shapes:  # shape inference by running on zeros
                feeds = {e[0]: np.zeros(self.shapes[e[0]], _NUMPY_OF[e[3]]) for e in inputs}
                names = [e[0] for e in self.engine._io if e[1] is TensorIOMode.OUTPUT]
                outs = self.engine.session.run(names, feeds)
                self._out_shapes = {n: o.shape for n, o in zip(names, outs, strict=True)}
            return self._out_shapes[name]

        def set_tensor_address(self, name, memory):
            if not isinstance(memory, int):
                raise TypeError(f"set_tensor_address takes an int pointer, got {type(memory)}")
            record("set_tensor_address", name=name)
            if name not in {e[0] for e in self.engine._io}:
                return False
            self.addresses[name] = memory
            return True

        def execute_async_v3(self, stream_handle):
            if not isinstance(stream_handle, int):
                raise TypeError(f"stream_handle must be an int, got {type(stream_handle)}")
            record("execute_async_v3", stream=stream_handle)
            if mod.fail_execute:
                return False
            io = self.engine._io
            if any(e[0] not in self.addresses for e in io):
                return False  # TensorRT: "address is not set for tensor"
            feeds = {}
            for name, mode, _, dtype in io:
                if mode is not TensorIOMode.INPUT:
                    continue
                if name not in self.shapes:
                    return False
                buf = memory[self.addresses[name]]
                assert buf.shape == self.shapes[name], (
                    f"fake TensorRT: input {name} buffer is {buf.shape}, shape set "
                    f"{self.shapes[name]}")
                assert buf.dtype == _NUMPY_OF[dtype], (
                    f"fake TensorRT: input {name} buffer is {buf.dtype}, engine wants {dtype}")
                feeds[name] = buf
            names = [e[0] for e in io if e[1] is TensorIOMode.OUTPUT]
            for name, val in zip(names, self.engine.session.run(names, feeds), strict=True):
                buf = memory[self.addresses[name]]
                assert buf.shape == val.shape and buf.dtype == val.dtype, (
                    f"fake TensorRT: output {name} buffer {buf.shape} {buf.dtype}, engine "
                    f"writes {val.shape} {val.dtype}")
                buf[...] = val
            return True

    mod.ILogger, mod.Logger, mod.Builder, mod.OnnxParser = ILogger, Logger, Builder, OnnxParser
    mod.Runtime, mod.IHostMemory, mod.ITimingCache = Runtime, IHostMemory, ITimingCache
    return mod
