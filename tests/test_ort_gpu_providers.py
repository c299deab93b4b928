"""ONNX Runtime's CUDA and TensorRT provider branches, checked as data and run through a
recording session, plus the fp16 conversion run for real on the CPU.

The option names and the ``name:NxCxHxW`` profile format are those of the ONNX Runtime CUDA and
TensorRT execution-provider documentation. The recording session cannot speak for what the
providers do with the options on a GPU; ``tests/test_backends.py`` (``-m gpu``) does that.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_models import make_unet_like

from uqseg import backends
from uqseg.backends._model import content_hash
from uqseg.backends.onnxruntime import OnnxRuntimeRunner, _trt_profile_shapes

# documented provider options (onnxruntime.ai/docs/execution-providers/...)
CUDA_OPTIONS = {"device_id", "gpu_mem_limit", "arena_extend_strategy", "cudnn_conv_algo_search",
                "do_copy_in_default_stream", "cudnn_conv_use_max_workspace",
                "cudnn_conv1d_pad_to_nc1d", "enable_cuda_graph", "tunable_op_enable",
                "use_tf32", "prefer_nhwc"}
TRT_OPTIONS = {"device_id", "trt_max_workspace_size", "trt_fp16_enable", "trt_int8_enable",
               "trt_engine_cache_enable", "trt_engine_cache_path", "trt_timing_cache_enable",
               "trt_timing_cache_path", "trt_profile_min_shapes", "trt_profile_max_shapes",
               "trt_profile_opt_shapes", "trt_builder_optimization_level",
               "trt_dump_subgraphs", "trt_cuda_graph_enable"}


def _fixed(spatial=(16, 16), **kw):
    return make_unet_like(dims=len(spatial), spatial=spatial, **kw)


def test_cpu_provider_list():
    assert OnnxRuntimeRunner._providers(_fixed(), "cpu", None, 32, False, 0) == [
        "CPUExecutionProvider"]


def test_cuda_provider_options_are_documented_values():
    providers = OnnxRuntimeRunner._providers(_fixed(), "cuda", None, 32, False, 3)
    assert providers == [("CUDAExecutionProvider", {
        "device_id": 3, "cudnn_conv_use_max_workspace": "1",
        "cudnn_conv_algo_search": "EXHAUSTIVE"}), "CPUExecutionProvider"]
    assert set(providers[0][1]) <= CUDA_OPTIONS
    assert providers[0][1]["cudnn_conv_algo_search"] in {"EXHAUSTIVE", "HEURISTIC", "DEFAULT"}


@pytest.mark.parametrize("fp16", [False, True])
def test_tensorrt_provider_options_cache_and_profiles(tmp_path, fp16):
    proto = _fixed()
    providers = OnnxRuntimeRunner._providers(proto, "tensorrt", tmp_path, 8, fp16, 1)
    (name, opts), cuda, cpu = providers
    assert name == "TensorrtExecutionProvider" and cpu == "CPUExecutionProvider"
    assert cuda[0] == "CUDAExecutionProvider" and cuda[1]["device_id"] == 1
    assert set(opts) <= TRT_OPTIONS
    cache = tmp_path / "ort_trt" / content_hash(proto)[:16]
    assert cache.is_dir()  # created up front: the provider does not create it
    assert opts == {
        "device_id": 1, "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache),
        "trt_fp16_enable": fp16,
        "trt_profile_min_shapes": "image:1x1x16x16",
        "trt_profile_opt_shapes": "image:4x1x16x16",
        "trt_profile_max_shapes": "image:8x1x16x16",
    }
    other = OnnxRuntimeRunner._providers(_fixed(seed=4), "tensorrt", tmp_path, 8, fp16, 1)
    assert other[0][1]["trt_engine_cache_path"] != str(cache)  # one folder per model


def test_profile_shapes_multi_input_static_batch_and_dynamic_spatial():
    proto = _fixed((8, 12))
    # a second image input with a static batch of 2, and an initializer listed as an input
    extra = onnx.helper.make_tensor_value_info("aux", onnx.TensorProto.FLOAT, [2, 3, 8, 12])
    proto.graph.input.append(extra)
    w = proto.graph.initializer[0]
    proto.graph.input.append(onnx.helper.make_tensor_value_info(w.name, w.data_type, w.dims))
    assert _trt_profile_shapes(proto, 6) == {
        "trt_profile_min_shapes": "image:1x1x8x12,aux:2x3x8x12",
        "trt_profile_opt_shapes": "image:3x1x8x12,aux:2x3x8x12",
        "trt_profile_max_shapes": "image:6x1x8x12,aux:2x3x8x12",
    }
    assert _trt_profile_shapes(_fixed(), 1)["trt_profile_opt_shapes"] == "image:1x1x16x16"
    assert _trt_profile_shapes(make_unet_like(dims=2), 8) is None  # dynamic H, W
    opts = OnnxRuntimeRunner._providers(make_unet_like(dims=2), "tensorrt", None, 8, False, 0)
    assert not any(k.startswith("trt_profile") for k in opts[0][1])


def test_unknown_onnxruntime_device_is_refused():
    with pytest.raises(ValueError, match="unknown device 'npu'.*'cpu', 'cuda' or 'tensorrt'"):
        OnnxRuntimeRunner._providers(_fixed(), "npu", None, 8, False, 0)


_REAL_SESSION = ort.InferenceSession


class _RecordingSession:
    """Stands in for ``ort.InferenceSession`` on a GPU: records the providers and runs the
    graph on the CPU, with the documented I/O-binding calls."""

    last = None

    def __init__(self, model, opts, providers):
        self.providers_asked = providers
        self._sess = _REAL_SESSION(model, opts, providers=["CPUExecutionProvider"])
        self.bound_inputs, self.bound_outputs = {}, []
        _RecordingSession.last = self

    def get_providers(self):
        return [p[0] if isinstance(p, tuple) else p for p in self.providers_asked]

    def get_inputs(self):
        return self._sess.get_inputs()

    def get_outputs(self):
        return self._sess.get_outputs()

    def run(self, *a, **k):
        raise AssertionError("a GPU device must run through I/O binding")

    def io_binding(self):
        sess = self

        class Binding:
            def bind_cpu_input(self, name, arr):
                assert arr.flags.c_contiguous
                sess.bound_inputs[name] = arr

            def bind_output(self, name, device_type, device_id=0):
                sess.bound_outputs.append((name, device_type, device_id))

            def copy_outputs_to_cpu(self):
                names = [n for n, _, _ in sess.bound_outputs]
                return sess._sess.run(names, sess.bound_inputs)

        return Binding()

    def run_with_iobinding(self, binding):
        assert self.bound_inputs and self.bound_outputs


@pytest.mark.parametrize("device", ["cuda", "tensorrt"])
def test_gpu_devices_run_through_io_binding(monkeypatch, tmp_path, device):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [
        "TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", _RecordingSession)
    proto = _fixed()
    runner = OnnxRuntimeRunner(proto, device, cache_dir=tmp_path, max_batch=4, device_id=2)
    sess = _RecordingSession.last
    want = "TensorrtExecutionProvider" if device == "tensorrt" else "CUDAExecutionProvider"
    assert runner.providers[0] == want
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16))  # float64: cast first
    out = runner.run({"image": x})["logits"]
    assert sess.bound_outputs == [("logits", "cuda", 2)]
    assert sess.bound_inputs["image"].dtype == np.float32
    monkeypatch.undo()  # the real session for the reference
    cpu = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    np.testing.assert_allclose(out, cpu.run(None, {"image": x.astype(np.float32)})[0],
                               rtol=1e-6, atol=1e-6)


def test_missing_gpu_provider_names_the_extra(monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(RuntimeError, match=r"no CUDAExecutionProvider.*uqseg\[gpu\]"):
        OnnxRuntimeRunner(_fixed(), "cuda")
    with pytest.raises(RuntimeError, match=r"no TensorrtExecutionProvider"):
        OnnxRuntimeRunner(_fixed(), "tensorrt")


def test_fp16_graph_runs_on_the_cpu_close_to_fp32(tmp_path):
    pytest.importorskip("onnxconverter_common")
    from uqseg.backends.tensorrt import to_fp16

    proto = make_unet_like(dims=2, width=8, seed=2)
    half = to_fp16(proto)
    weights = {t.name: t.data_type for t in half.graph.initializer}
    assert weights["w1"] == weights["w2"] == onnx.TensorProto.FLOAT16  # conv weights halved
    # inputs and outputs stay float32 (keep_io_types), so callers feed the same arrays
    assert half.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert half.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    x = np.random.default_rng(1).standard_normal((2, 1, 24, 20)).astype(np.float32)
    runner = backends.load(proto, backend="onnxruntime", device="cpu", precision="fp16")
    out = runner.run({"image": x})["logits"]
    ref = ort.InferenceSession(proto.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"image": x})[0]
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, ref, atol=1e-2 * np.abs(ref).max())
    assert np.abs(out - ref).max() > 0  # the half-precision graph really ran
    assert (out.argmax(1) == ref.argmax(1)).mean() > 0.97
