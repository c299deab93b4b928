"""The native TensorRT runner executed against a fake ``tensorrt`` and a fake ``cupy``.

The fakes (tests/fakes) implement the documented TensorRT 10/11 Python API and check its
contracts; the "engine" runs the ONNX graph with ONNX Runtime on the CPU. These tests prove the
runner's engine building, caching (and its cache key), dynamic-shape handling, dtype mapping,
stream use and error paths. They cannot speak for TensorRT's kernels, numerics on a GPU or its
exact messages: ``tests/test_backends.py::test_native_tensorrt_matches_cpu`` (``-m tensorrt``)
does that on a machine with TensorRT.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from fakes import fake_cupy
from fakes.fake_tensorrt import make_tensorrt
from onnx_models import make_unet_like

from uqseg import backends
from uqseg.backends import tensorrt as trt_backend
from uqseg.backends.tensorrt import TensorRTRunner, _trt_dtype_to_numpy


@pytest.fixture(params=["10.13.0", "11.0.0"], ids=["trt10", "trt11"])
def fake_trt(request, monkeypatch):
    fake_cupy.MEMORY.clear()
    fake_cupy.CALLS.clear()
    mod = make_tensorrt(request.param, memory=fake_cupy.MEMORY)
    monkeypatch.setitem(sys.modules, "tensorrt", mod)
    monkeypatch.setitem(sys.modules, "cupy", fake_cupy)
    monkeypatch.setattr(fake_cupy.runtime, "props", dict(fake_cupy._Runtime.props))
    monkeypatch.setattr(fake_cupy.runtime, "version", fake_cupy._Runtime.version)
    return mod


def _fixed(spatial=(16, 16), **kw):
    return make_unet_like(dims=len(spatial), spatial=spatial, **kw)


def _cpu(proto, x):
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": x})[0]


def _calls(mod, name):
    return [d for n, d in mod.log if n == name]


def test_builds_runs_and_matches_onnxruntime(fake_trt, tmp_path):
    proto = _fixed()
    x = np.random.default_rng(0).standard_normal((3, 1, 16, 16)).astype(np.float32)
    with TensorRTRunner(proto, max_batch=8, cache_dir=tmp_path) as runner:
        assert runner.input_names == ["image"] and runner.output_names == ["logits"]
        assert runner.input_shapes == {"image": (None, 1, 16, 16)}  # -1 -> None
        assert runner.input_dtypes == {"image": np.dtype(np.float32)}
        out = runner.run({"image": x})["logits"]
        assert runner.providers == ["TensorRT"] and runner.device == "cuda"
    np.testing.assert_allclose(out, _cpu(proto, x), rtol=1e-5, atol=1e-6)
    assert runner._engine is None and runner._context is None  # close() released them


def test_build_calls_follow_the_documented_api(fake_trt, tmp_path):
    proto = _fixed()
    TensorRTRunner(proto, max_batch=8, cache_dir=tmp_path, workspace_gib=0.5)
    flag = int(fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    assert _calls(fake_trt, "create_network") == [{"flags": 1 << flag}]
    # the parser got exactly the serialised model
    assert _calls(fake_trt, "parse") == [{"nbytes": len(proto.SerializeToString())}]
    assert _calls(fake_trt, "set_memory_pool_limit") == [
        {"pool": fake_trt.MemoryPoolType.WORKSPACE, "size": 1 << 29}]
    # one profile over the batch axis: 1 .. max_batch // 2 .. max_batch, spatial fixed
    assert _calls(fake_trt, "set_shape") == [
        {"input": "image", "min": (1, 1, 16, 16), "opt": (4, 1, 16, 16), "max": (8, 1, 16, 16)}]
    assert _calls(fake_trt, "add_optimization_profile") == [{"valid": True}]
    assert _calls(fake_trt, "create_timing_cache") == [{"blob": b""}]  # no cache yet
    assert _calls(fake_trt, "set_timing_cache") == [{"ignore_mismatch": False}]
    assert "set_flag" not in {n for n, _ in fake_trt.log}  # strongly typed: no FP16 flag


def test_engine_and_timing_cache_are_reused(fake_trt, tmp_path):
    proto = _fixed()
    TensorRTRunner(proto, max_batch=4, cache_dir=tmp_path)
    engines = list((tmp_path / "trt").glob("*.engine"))
    assert len(engines) == 1 and not list((tmp_path / "trt").glob("*.tmp"))
    timing = (tmp_path / "trt" / "timing.cache").read_bytes()
    assert json.loads(timing.split(b"\n", 1)[1]) == {"entries": 1}
    fake_trt.log.clear()
    x = np.ones((2, 1, 16, 16), np.float32)
    out = TensorRTRunner(proto, max_batch=4, cache_dir=tmp_path).run({"image": x})["logits"]
    assert _calls(fake_trt, "build_serialized_network") == []  # loaded, not rebuilt
    assert _calls(fake_trt, "deserialize_cuda_engine") == [{"nbytes": engines[0].stat().st_size}]
    np.testing.assert_allclose(out, _cpu(proto, x), rtol=1e-5, atol=1e-6)
    # another profile is another engine; its build starts from the saved timing cache
    TensorRTRunner(proto, max_batch=8, cache_dir=tmp_path)
    assert _calls(fake_trt, "create_timing_cache") == [{"blob": timing}]
    assert len(list((tmp_path / "trt").glob("*.engine"))) == 2


def _key(fake_trt, proto, **kw):
    args = {"fp16": False, "max_batch": 4}
    args.update(kw)
    runner = TensorRTRunner.__new__(TensorRTRunner)
    runner._trt, runner._cp = fake_trt, fake_cupy
    data = (trt_backend.to_fp16(proto) if args["fp16"] else proto).SerializeToString()
    shapes = runner._profile(proto, args["max_batch"])
    return runner._cache_key(data, args["fp16"], shapes, args.get("device_id", 0))


def test_cache_key_covers_everything_an_engine_depends_on(fake_trt, monkeypatch):
    proto = _fixed()
    base = _key(fake_trt, proto)
    assert base == _key(fake_trt, proto) and len(base) == 32
    # reference: the documented ingredients, hashed independently
    ident = {"model": hashlib.sha256(proto.SerializeToString()).hexdigest(), "fp16": False,
             "profile": {"image": [[1, 1, 16, 16], [2, 1, 16, 16], [4, 1, 16, 16]]},
             "trt": fake_trt.__version__, "cuda": 12040, "gpu": "Fake GPU 80GB", "cc": "9.0"}
    assert base == hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    changed = {
        "model": _key(fake_trt, _fixed(seed=1)),
        "fp16": _key(fake_trt, proto, fp16=True),
        "profile": _key(fake_trt, proto, max_batch=8),
    }
    monkeypatch.setattr(fake_trt, "__version__", "10.99.0")
    changed["trt"] = _key(fake_trt, proto)
    monkeypatch.undo()
    monkeypatch.setattr(fake_cupy.runtime, "version", 13000)
    changed["cuda"] = _key(fake_trt, proto)
    monkeypatch.setattr(fake_cupy.runtime, "version", 12040)
    monkeypatch.setattr(fake_cupy.runtime, "props", {"name": "Other GPU", "major": 9, "minor": 0})
    changed["gpu"] = _key(fake_trt, proto)
    monkeypatch.setattr(fake_cupy.runtime, "props", {"name": b"Fake GPU 80GB", "major": 8,
                                                     "minor": 6})
    changed["cc"] = _key(fake_trt, proto)
    assert len({base, *changed.values()}) == 1 + len(changed), changed


def test_corrupt_or_foreign_cached_engine_is_rebuilt(fake_trt, tmp_path):
    proto = _fixed()
    TensorRTRunner(proto, max_batch=4, cache_dir=tmp_path)
    (engine,) = (tmp_path / "trt").glob("*.engine")
    engine.write_bytes(b"\x00garbage")  # deserialize_cuda_engine returns None for this
    fake_trt.log.clear()
    runner = TensorRTRunner(proto, max_batch=4, cache_dir=tmp_path)
    assert len(_calls(fake_trt, "build_serialized_network")) == 1
    assert engine.read_bytes().startswith(b"FAKE-TRT-ENGINE")  # replaced by the new build
    x = np.zeros((1, 1, 16, 16), np.float32)
    np.testing.assert_allclose(runner.run({"image": x})["logits"], _cpu(proto, x), atol=1e-6)


def test_dynamic_batch_within_the_profile_and_refused_beyond(fake_trt, tmp_path):
    proto = _fixed()
    runner = TensorRTRunner(proto, max_batch=4, cache_dir=tmp_path)
    rng = np.random.default_rng(1)
    for n in (1, 3, 4, 2):  # shapes change between calls: set_input_shape every time
        x = rng.standard_normal((n, 1, 16, 16)).astype(np.float32)
        np.testing.assert_allclose(runner.run({"image": x})["logits"], _cpu(proto, x),
                                   rtol=1e-5, atol=1e-6)
    assert [d["shape"][0] for d in _calls(fake_trt, "set_input_shape")] == [1, 3, 4, 2]
    with pytest.raises(ValueError, match=r"image.*\(5, 1, 16, 16\).*1, 1, 16, 16.*4, 1, 16, 16"):
        runner.run({"image": np.zeros((5, 1, 16, 16), np.float32)})
    with pytest.raises(ValueError, match=r"\(1, 1, 8, 8\)"):
        runner.run({"image": np.zeros((1, 1, 8, 8), np.float32)})


def test_float64_feeds_are_cast_before_the_device_copy(fake_trt, tmp_path):
    proto = _fixed()
    runner = TensorRTRunner(proto, max_batch=2, cache_dir=tmp_path)
    x = np.random.default_rng(2).standard_normal((2, 1, 16, 16))
    out = runner.run({"image": x})["logits"]  # the fake asserts the buffer dtype is float32
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _cpu(proto, x.astype(np.float32)), rtol=1e-5, atol=1e-6)


def test_stream_device_and_output_buffers(fake_trt, tmp_path):
    runner = TensorRTRunner(_fixed(), max_batch=2, cache_dir=tmp_path, device_id=1)
    assert ("use", 1) in fake_cupy.CALLS
    assert runner._stream.non_blocking  # TensorRT warns on the legacy default stream
    fake_cupy.CALLS.clear()
    fake_trt.log.clear()
    runner.run({"image": np.zeros((2, 1, 16, 16), np.float32)})
    (execute,) = _calls(fake_trt, "execute_async_v3")
    assert execute == {"stream": runner._stream.ptr}
    assert ("empty", (2, 3, 16, 16), np.dtype(np.float32)) in fake_cupy.CALLS
    assert [c[2] for c in fake_cupy.CALLS if c[0] == "asnumpy"] == [runner._stream]
    assert runner._stream.synchronized >= 1
    assert {d["name"] for d in _calls(fake_trt, "set_tensor_address")} == {"image", "logits"}
    with pytest.raises(RuntimeError, match="cudaErrorInvalidDevice"):
        TensorRTRunner(_fixed(), cache_dir=tmp_path, device_id=7)


def test_execution_failure_is_an_error(fake_trt, tmp_path):
    runner = TensorRTRunner(_fixed(), max_batch=2, cache_dir=tmp_path)
    fake_trt.fail_execute = True
    with pytest.raises(RuntimeError, match="TensorRT execution failed"):
        runner.run({"image": np.zeros((1, 1, 16, 16), np.float32)})


def test_parser_errors_are_reported(fake_trt, tmp_path):
    proto = _fixed()
    proto.graph.node[1].op_type = "NotATensorRTOp"  # the fake parser has no importer for it
    proto.graph.node[1].domain = "custom.domain"
    proto.opset_import.append(onnx.helper.make_opsetid("custom.domain", 1))
    with pytest.raises(ValueError, match="could not parse.*No importer registered.*NotATensorRT"):
        TensorRTRunner(proto, cache_dir=tmp_path)
    assert not list((tmp_path / "trt").glob("*.engine"))


def test_build_failure_is_an_error_and_caches_nothing(fake_trt, tmp_path):
    fake_trt.fail_build = True
    with pytest.raises(RuntimeError, match="failed to build"):
        TensorRTRunner(_fixed(), cache_dir=tmp_path)
    assert not list((tmp_path / "trt").glob("*.engine"))
    assert not (tmp_path / "trt" / "timing.cache").exists()


def test_dynamic_spatial_axes_are_refused_before_building(fake_trt, tmp_path):
    with pytest.raises(ValueError, match="dynamic spatial axes.*dynamic_spatial=False"):
        TensorRTRunner(make_unet_like(dims=2), cache_dir=tmp_path)
    assert fake_trt.log == []


def test_static_batch_model_gets_a_profile_equal_to_its_batch(fake_trt, tmp_path):
    proto = _fixed()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2  # exported with batch 2
    runner = TensorRTRunner(proto, max_batch=8, cache_dir=tmp_path)
    assert _calls(fake_trt, "set_shape")[0]["min"] == (2, 1, 16, 16)
    assert _calls(fake_trt, "set_shape")[0]["max"] == (2, 1, 16, 16)
    x = np.ones((2, 1, 16, 16), np.float32)
    np.testing.assert_allclose(runner.run({"image": x})["logits"], _cpu(proto, x), atol=1e-6)


def test_fp16_engine_keeps_fp32_io_and_stays_close(fake_trt, tmp_path):
    pytest.importorskip("onnxconverter_common")
    proto = _fixed()
    x = np.random.default_rng(3).standard_normal((2, 1, 16, 16)).astype(np.float32)
    runner = TensorRTRunner(proto, fp16=True, max_batch=2, cache_dir=tmp_path)
    assert runner.input_dtypes == {"image": np.dtype(np.float32)}
    out = runner.run({"image": x})["logits"]
    assert out.dtype == np.float32
    ref = _cpu(proto, x)
    np.testing.assert_allclose(out, ref, atol=2e-2 * np.abs(ref).max())
    assert not np.array_equal(out, ref)  # the fp16 graph really ran
    fp32 = TensorRTRunner(proto, fp16=False, max_batch=2, cache_dir=tmp_path)
    np.testing.assert_allclose(fp32.run({"image": x})["logits"], ref, rtol=1e-5, atol=1e-6)
    assert len(list((tmp_path / "trt").glob("*.engine"))) == 2  # fp16 is part of the key


def test_dtype_table_matches_the_documented_datatypes(fake_trt):
    want = {fake_trt.float32: np.float32, fake_trt.float16: np.float16, fake_trt.int32: np.int32,
            fake_trt.int8: np.int8, fake_trt.bool: np.bool_, fake_trt.int64: np.int64}
    for trt_type, np_type in want.items():
        assert _trt_dtype_to_numpy(fake_trt, trt_type) is np_type
    with pytest.raises(TypeError, match="BF16"):
        _trt_dtype_to_numpy(fake_trt, fake_trt.bfloat16)


def test_load_selects_the_native_backend_when_tensorrt_and_a_gpu_exist(fake_trt, tmp_path):
    assert backends.available_backends()[0] == ("tensorrt", "cuda")
    assert backends.resolve("auto", "cuda") == ("tensorrt", "cuda")
    proto = _fixed()
    runner = backends.load(proto, backend="tensorrt", device="cuda:1", max_batch=2,
                           cache_dir=tmp_path)
    assert isinstance(runner, TensorRTRunner) and ("use", 1) in fake_cupy.CALLS
    with pytest.raises(ValueError, match="GPU only"):
        backends.load(proto, backend="tensorrt", device="cpu")
    monkey_count = fake_cupy.runtime.device_count
    try:
        fake_cupy.runtime.device_count = 0
        assert ("tensorrt", "cuda") not in backends.available_backends()
    finally:
        fake_cupy.runtime.device_count = monkey_count
