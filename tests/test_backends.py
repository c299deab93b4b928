"""Backends: runner interface, provider selection, graph surgery, model checks."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx_models import make_unet_like, make_wrong_rank

from uqseg import backends
from uqseg.backends import graph
from uqseg.backends._model import read_model


def _direct(path, feeds, outputs=None):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(outputs, feeds)


def test_import_uqseg_is_light():
    code = ("import sys, uqseg; import uqseg.metrics, uqseg.backends; "
            "print(sorted(m for m in ('torch','tensorrt','onnxruntime_gpu','ray','matplotlib') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_load_runs_like_onnxruntime(tiny_2d):
    x = np.random.default_rng(0).standard_normal((2, 1, 12, 10)).astype(np.float32)
    with backends.load(tiny_2d, backend="onnxruntime", device="cpu") as runner:
        assert runner.input_names == ["image"]
        assert runner.output_names == ["logits"]
        assert runner.input_shapes["image"] == (None, 1, None, None)
        got = runner.run({"image": x})["logits"]
    (ref,) = _direct(tiny_2d, {"image": x})
    np.testing.assert_allclose(got, ref, atol=1e-5)


def test_auto_resolves_to_a_present_backend():
    backend, device = backends.resolve("auto", "auto")
    assert (backend, device) in backends.available_backends()
    assert backends.resolve("auto", "cpu") == ("onnxruntime", "cpu")


def test_exposed_outputs_match_a_truncated_graph(tiny_2d):
    x = np.random.default_rng(1).standard_normal((1, 1, 8, 8)).astype(np.float32)
    runner = backends.load(tiny_2d, device="cpu", outputs=["bottleneck", "enc1"])
    out = runner.run({"image": x})
    assert set(out) == {"logits", "bottleneck", "enc1"}
    # independent: extract the sub-graph that ends at 'bottleneck' with onnx.utils
    model = onnx.shape_inference.infer_shapes(onnx.load(tiny_2d))
    sub = onnx.utils.Extractor(model).extract_model(["image"], ["bottleneck"])
    (ref,) = ort.InferenceSession(sub.SerializeToString()).run(None, {"image": x})
    np.testing.assert_allclose(out["bottleneck"], ref, atol=1e-5)
    assert out["bottleneck"].shape == (1, 8, 4, 4)


def test_candidate_layers_deepest_first_and_metadata_first():
    with_meta = graph.candidate_layers(make_unet_like(spatial=(16, 16)))
    assert [c.name for c in with_meta[:3]] == ["bottleneck", "decoder_last", "enc1"]
    plain = graph.candidate_layers(make_unet_like(spatial=(16, 16), metadata=False))
    names = [c.name for c in plain]
    assert names[0] in {"bottleneck", "c2", "p1"}  # an 8x8 tensor comes before 16x16 ones
    assert plain[0].shape[2:] == (8, 8)
    assert all(c.shape[2:] in {(8, 8), (16, 16)} for c in plain)
    assert "logits" not in names and "image" not in names


def test_expose_unknown_layer_names_candidates(tiny_2d):
    with pytest.raises(ValueError, match="unknown layer.*'nope'.*candidate"):
        backends.load(tiny_2d, device="cpu", outputs=["nope"])


def test_runner_checks_feeds(tiny_2d):
    runner = backends.load(tiny_2d, device="cpu")
    with pytest.raises(ValueError, match="missing input"):
        runner.run({})
    with pytest.raises(ValueError, match="unknown input"):
        runner.run({"image": np.zeros((1, 1, 4, 4), np.float32), "x": np.zeros(1)})
    with pytest.raises(ValueError, match="unknown output"):
        runner.run({"image": np.zeros((1, 1, 4, 4), np.float32)}, outputs=["enc1"])
    # float64 feeds are cast to the model's float32
    out = runner.run({"image": np.zeros((1, 1, 4, 4), np.float64)})
    assert out["logits"].dtype == np.float32


@pytest.mark.parametrize(
    ("backend", "device", "exc", "match"),
    [
        ("nope", "cpu", ValueError, "unknown backend"),
        ("onnxruntime", "gpu9", ValueError, "unknown device"),
        ("onnxruntime", "cuda:x", ValueError, "unknown device"),
    ],
)
def test_unknown_backend_or_device(tiny_2d, backend, device, exc, match):
    with pytest.raises(exc, match=match):
        backends.load(tiny_2d, backend=backend, device=device)


def test_unavailable_engines_name_the_extra(tiny_2d):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(RuntimeError, match=r"uqseg\[gpu\]"):
            backends.load(tiny_2d, backend="onnxruntime", device="cuda")
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"uqseg\[trt\]"):
            backends.load(tiny_2d, backend="tensorrt", device="cuda")
    with pytest.raises(ValueError, match="unknown precision"):
        backends.load(tiny_2d, precision="int4")


def test_missing_corrupt_and_non_onnx_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_model(tmp_path / "absent.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01garbage not a protobuf \xff" * 10)
    with pytest.raises(ValueError, match="not a valid ONNX model"):
        read_model(bad)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        read_model(empty)
    with pytest.raises(TypeError, match="path, bytes or onnx.ModelProto"):
        read_model(3.5)


def test_external_data_outside_folder_is_refused(tmp_path):
    model = make_unet_like()
    t = model.graph.initializer[0]
    t.data_location = onnx.TensorProto.EXTERNAL
    t.ClearField("raw_data")
    t.ClearField("float_data")
    entry = t.external_data.add()
    entry.key, entry.value = "location", "../../etc/passwd"
    path = tmp_path / "evil.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ValueError, match="outside the model's folder"):
        read_model(path)


def test_model_without_inputs_is_refused():
    model = make_wrong_rank()
    del model.graph.input[:]
    with pytest.raises(ValueError, match="no input"):
        read_model(model)


@pytest.mark.gpu
def test_cuda_provider_matches_cpu(tiny_2d):
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime-gpu with CUDA is not installed here")
    x = np.random.default_rng(0).standard_normal((2, 1, 16, 16)).astype(np.float32)
    gpu = backends.load(tiny_2d, backend="onnxruntime", device="cuda").run({"image": x})
    cpu = backends.load(tiny_2d, backend="onnxruntime", device="cpu").run({"image": x})
    np.testing.assert_allclose(gpu["logits"], cpu["logits"], atol=1e-4)


@pytest.mark.tensorrt
@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_native_tensorrt_matches_cpu(make_model, precision, tmp_path):
    pytest.importorskip("tensorrt")
    pytest.importorskip("cupy")
    if precision == "fp16":
        pytest.importorskip("onnxconverter_common")
    path = make_model("fixed32", spatial=(32, 32))
    x = np.random.default_rng(0).standard_normal((3, 1, 32, 32)).astype(np.float32)
    trt_out = backends.load(path, backend="tensorrt", device="cuda", precision=precision,
                            cache_dir=tmp_path).run({"image": x})["logits"]
    cpu = backends.load(path, device="cpu").run({"image": x})["logits"]
    np.testing.assert_allclose(trt_out, cpu, atol=1e-3 if precision == "fp32" else 5e-2)
    assert list((tmp_path / "trt").glob("*.engine"))  # cached by content hash
