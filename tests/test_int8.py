"""precision="int8": static QDQ quantisation with ONNX Runtime's tools, cached, drift-checked."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import uqseg
from uqseg import EnsembleSegmenter, OnnxSegmenter, SpectralOODDetector
from uqseg import _segmenter_engine as segmod

# the tiny test networks are too small for int8 to pay; fit says so (tested below)
pytestmark = pytest.mark.filterwarnings("ignore:.*does not pay for this network:UserWarning")


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UQSEG_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def X():
    rng = np.random.default_rng(0)
    X = rng.random((12, 1, 16, 16)).astype(np.float32)
    X[:, :, 4:12, 4:12] += 1.0
    return X


def test_quantised_graph_is_int8_and_close_to_float32(tiny_2d, X, cache):
    seg8 = OnnxSegmenter(tiny_2d, precision="int8").fit(X)
    seg32 = OnnxSegmenter(tiny_2d).fit()
    path = seg8.quantized_model_
    assert path.startswith(str(cache / "int8"))
    q = onnx.load(path)
    ops = {n.op_type for n in q.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = [numpy_helper.to_array(t) for t in q.graph.initializer]
    assert any(w.dtype == np.int8 and w.ndim == 4 for w in weights)  # per-channel conv weights
    p8, p32 = seg8.predict_proba(X), seg32.predict_proba(X)
    assert np.abs(p8 - p32).mean() < 0.02
    labels8, labels32 = seg8.predict(X), seg32.predict(X)
    assert np.mean(labels8 == labels32) > 0.95
    # the recorded drift is what an independent count on the same images gives
    d = seg8.int8_drift_
    assert d["images"] == 12
    assert d["label_agreement"] == pytest.approx(np.mean(labels8 == labels32))
    assert d["mean_abs_proba_diff"] == pytest.approx(np.abs(p8 - p32.astype(np.float64)).mean(),
                                                     rel=1e-4)
    assert d["speedup_on_fit_images"] > 0
    # features still come out (for the OOD detector), from the quantised graph
    det = SpectralOODDetector(seg8).fit(X)
    assert det.score_samples(X[:3]).shape == (3,)


def test_cache_is_reused_and_keyed_on_the_data(tiny_2d, X):
    a = OnnxSegmenter(tiny_2d, precision="int8").fit(X)
    mtime = __import__("os").stat(a.quantized_model_).st_mtime_ns
    b = OnnxSegmenter(tiny_2d, precision="int8").fit(X)
    assert b.quantized_model_ == a.quantized_model_
    assert __import__("os").stat(b.quantized_model_).st_mtime_ns == mtime
    c = OnnxSegmenter(tiny_2d, precision="int8").fit(X[:6] * 2)
    assert c.quantized_model_ != a.quantized_model_


def test_errors(tiny_2d, X, monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="calibrates the activation ranges on images"):
        OnnxSegmenter(tiny_2d, precision="int8").fit()
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        OnnxSegmenter(tiny_2d, precision="int4").fit(X)
    with pytest.raises(ValueError, match="unknown precision"):
        EnsembleSegmenter([tiny_2d], precision="int4").fit(X)
    bad = X.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        OnnxSegmenter(tiny_2d, precision="int8").fit(bad)
    monkeypatch.setattr(segmod, "INT8_MAX_MEAN_DIFF", 0.0)
    with pytest.raises(ValueError, match=r"drifts from float32 on 12 of the fit images.*"
                                         r"keep precision='fp32'"):
        OnnxSegmenter(tiny_2d, precision="int8").fit(X)
    monkeypatch.undo()
    seg8 = OnnxSegmenter(tiny_2d, precision="int8").fit(X)
    with pytest.raises(ValueError, match="int8.*not stored"):
        uqseg.save(seg8, tmp_path / "s")


def test_int8_ensemble_runs_members_separately(tiny_members, X):
    ens8 = EnsembleSegmenter(tiny_members[:2], precision="int8").fit(X)
    ens32 = EnsembleSegmenter(tiny_members[:2]).fit()
    assert not ens8.fused_ and all(m.precision == "int8" for m in ens8.members_)
    with pytest.raises(ValueError, match="int8 members run their own quantised graphs"):
        EnsembleSegmenter(tiny_members[:2], precision="int8", fuse=True).fit(X)
    p8, m8 = ens8.predict_with_uncertainty(X)
    p32, m32 = ens32.predict_with_uncertainty(X)
    assert np.abs(p8 - p32).mean() < 0.02
    assert np.abs(m8["mutual_information"] - m32["mutual_information"]).mean() < 0.02


def test_warns_when_int8_does_not_pay(tiny_2d, X, monkeypatch):
    monkeypatch.setattr(segmod, "INT8_MIN_SPEEDUP", 1e9)  # no network is that much faster
    with pytest.warns(UserWarning, match="it does not pay for this network"):
        OnnxSegmenter(tiny_2d, precision="int8").fit(X)


def _upsampling_model(with_bias: bool) -> onnx.ModelProto:
    """x -> ConvTranspose(k=2, s=2) -> y, and x -> ConvTranspose(k=3, s=2, pads) -> z, which
    stays (its kernel is not its stride)."""
    from onnx import TensorProto, helper

    rng = np.random.default_rng(1)
    w = numpy_helper.from_array(rng.normal(size=(3, 4, 2, 2)).astype(np.float32), "w")
    v = numpy_helper.from_array(rng.normal(size=(3, 2, 3, 3)).astype(np.float32), "v")
    b = numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b")
    nodes = [helper.make_node("ConvTranspose", ["x", "w"] + (["b"] if with_bias else []), ["y"],
                              strides=[2, 2], kernel_shape=[2, 2], name="up"),
             helper.make_node("ConvTranspose", ["x", "v"], ["z"], strides=[2, 2],
                              kernel_shape=[3, 3], pads=[1, 1, 0, 0], name="up_padded")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 5, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 10, 12]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 2, 10, 12])], [w, v, b])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("with_bias", [True, False])
def test_upsampling_rewritten_as_depth_to_space_gives_the_same_outputs(with_bias):
    import onnxruntime as ort

    from uqseg.backends.quantize import _upsampling_as_depth_to_space

    model = _upsampling_model(with_bias)
    new, count = _upsampling_as_depth_to_space(model)
    onnx.checker.check_model(new)
    assert count == 1
    assert sorted(n.op_type for n in new.graph.node) == ["Conv", "ConvTranspose", "DepthToSpace"]
    producer = {o: n.op_type for n in new.graph.node for o in n.output}
    assert producer["y"] == "DepthToSpace" and producer["z"] == "ConvTranspose"  # names kept
    assert {i.name for i in new.graph.initializer} >= {"v"} and "w" not in {
        i.name for i in new.graph.initializer}
    x = np.random.default_rng(2).normal(size=(2, 3, 5, 6)).astype(np.float32)
    want = ort.InferenceSession(model.SerializeToString(),
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})
    got = ort.InferenceSession(new.SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})
    for a, b in zip(want, got, strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    assert _upsampling_as_depth_to_space(new)[1] == 0  # nothing left to rewrite


def test_mask_multiplies_stay_float32(tiny_mc, X):
    from uqseg.backends.quantize import _fed_by_other_inputs

    proto = onnx.load(tiny_mc)
    image = proto.graph.input[0].name
    names = _fed_by_other_inputs(proto, image)
    by_name = {n.name: n for n in proto.graph.node}
    assert names and all(by_name[n].op_type == "Mul" for n in names)
    seg = OnnxSegmenter(tiny_mc, precision="int8").fit(X)
    q = onnx.load(seg.quantized_model_)
    ops = {n.name: n.op_type for n in q.graph.node}
    assert all(ops.get(n) == "Mul" for n in names)  # not replaced by a quantised multiply
    # and the MC-dropout ensemble of passes still runs on the int8 graph
    assert seg.predict_proba(X[:2]).shape[0] == 2
