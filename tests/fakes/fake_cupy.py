"""A fake ``cupy`` with host memory behind "device" pointers, for the TensorRT runner's tests.

It implements only what :class:`uqseg.backends.tensorrt.TensorRTRunner` calls: ``asarray``,
``empty``, ``asnumpy(a, stream=...)``, ``ndarray.data.ptr``, ``cuda.Device(i).use()``,
``cuda.Stream(non_blocking=True)`` (a context manager with ``ptr`` and ``synchronize``) and
``cuda.runtime.getDeviceProperties / runtimeGetVersion / getDeviceCount``. Pointers resolve to
numpy arrays through :data:`MEMORY`, which the fake TensorRT reads and writes.

What it cannot speak for: real device copies are asynchronous on the stream; here every copy
is immediate, so ordering bugs between ``asnumpy`` and ``synchronize`` would not show.
"""

from __future__ import annotations

import itertools
import types

import numpy as np

MEMORY: dict[int, np.ndarray] = {}  # "device address" -> the array stored there
CALLS: list[tuple] = []
_next_ptr = itertools.count(0x7F0000000000, 0x1000)


class _Memory:
    def __init__(self, ptr: int):
        self.ptr = ptr


class ndarray:  # noqa: N801 - mirrors cupy.ndarray
    def __init__(self, host: np.ndarray):
        self._host = host
        self.data = _Memory(next(_next_ptr))
        MEMORY[self.data.ptr] = host

    @property
    def shape(self):
        return self._host.shape

    @property
    def dtype(self):
        return self._host.dtype


def asarray(a, dtype=None) -> ndarray:
    if isinstance(a, ndarray):
        return a
    CALLS.append(("asarray", np.shape(a)))
    return ndarray(np.array(a, dtype=dtype, copy=True, order="C"))


def empty(shape, dtype=np.float32) -> ndarray:
    shape = tuple(int(s) for s in shape)
    if any(s < 0 for s in shape):
        raise ValueError(f"negative dimensions are not allowed: {shape}")
    CALLS.append(("empty", shape, np.dtype(dtype)))
    # NaN-filled, not zeros: an output the engine never wrote must not look like a result
    arr = np.empty(shape, dtype=dtype)
    if arr.dtype.kind == "f":
        arr.fill(np.nan)
    return ndarray(arr)


def asnumpy(a, stream=None, order="C", out=None, *, blocking=True) -> np.ndarray:
    if not isinstance(a, ndarray):
        raise TypeError("asnumpy of a non-device array")
    CALLS.append(("asnumpy", a.shape, stream))
    return a._host.copy()


class Device:
    current = None

    def __init__(self, device: int = 0):
        if not 0 <= int(device) < runtime.getDeviceCount():
            raise RuntimeError(f"cudaErrorInvalidDevice: device {device}")
        self.id = int(device)

    def use(self):
        Device.current = self.id
        CALLS.append(("use", self.id))


class Stream:
    def __init__(self, null: bool = False, non_blocking: bool = False, ptds: bool = False):
        self.ptr = next(_next_ptr)
        self.non_blocking = non_blocking
        self.synchronized = 0
        self.entered = 0

    def __enter__(self):
        self.entered += 1
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self):
        self.synchronized += 1


class _Runtime:
    device_count = 2
    props = {"name": b"Fake GPU 80GB", "major": 9, "minor": 0}
    version = 12040

    def getDeviceCount(self):  # noqa: N802 - cupy's name
        return self.device_count

    def getDeviceProperties(self, device):  # noqa: N802
        return dict(self.props)

    def runtimeGetVersion(self):  # noqa: N802
        return self.version


runtime = _Runtime()
cuda = types.SimpleNamespace(Device=Device, Stream=Stream, runtime=runtime)
