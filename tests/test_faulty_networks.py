"""Faulty networks and lying metadata fail loudly, naming the model (and the member)."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx_models import make_unet_like

from uqseg import EnsembleSegmenter, OnnxSegmenter
from uqseg.backends._checks import ModelOutputError, check_logits
from uqseg.backends.fuse import fuse_members

X = np.random.default_rng(0).standard_normal((3, 1, 8, 8)).astype(np.float32)


def faulty(kind: str, *, spatial=None, **meta) -> onnx.ModelProto:
    """The tiny U-Net (3 classes) with its logits spoilt as ``kind`` says; ``meta`` overrides
    metadata entries."""
    model = make_unet_like(dims=2, spatial=spatial, seed=4)
    g = model.graph
    g.node[-1].output[0] = "raw"
    sp = list(spatial) if spatial else ["s0", "s1"]
    elem, shape = TensorProto.FLOAT, ["N", 3, *sp]
    if kind == "half":
        g.node.append(helper.make_node("MaxPool", ["raw"], ["logits"], kernel_shape=[2, 2],
                                       strides=[2, 2]))
        shape = ["N", 3, *([s // 2 for s in spatial] if spatial else ["h", "w"])]
    elif kind == "nan":  # NaN wherever the raw logit is negative
        g.node.append(helper.make_node("Sqrt", ["raw"], ["logits"]))
    elif kind == "inf":
        g.initializer.append(numpy_helper.from_array(
            np.array([np.inf, 0, 0], np.float32).reshape(1, 3, 1, 1), "inf"))
        g.node.append(helper.make_node("Add", ["raw", "inf"], ["logits"]))
    elif kind == "int":
        g.node.append(helper.make_node("Cast", ["raw"], ["logits"], to=TensorProto.INT64))
        elem = TensorProto.INT64
    elif kind == "two_channels":  # symbolic class axis: only a run shows the count
        g.initializer.extend([numpy_helper.from_array(np.array([v], np.int64), n)
                              for n, v in (("st", 0), ("en", 2), ("ax", 1))])
        g.node.append(helper.make_node("Slice", ["raw", "st", "en", "ax"], ["logits"]))
        shape = ["N", "K", *sp]
    elif kind == "ok":
        g.node.append(helper.make_node("Identity", ["raw"], ["logits"]))
    else:
        raise ValueError(kind)
    del g.output[:]
    g.output.append(helper.make_tensor_value_info("logits", elem, shape))
    props = {p.key: p.value for p in model.metadata_props}
    props.update(meta)
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    return model


@pytest.fixture
def write(tmp_path):
    def save(kind: str, name: str | None = None, **kw) -> str:
        path = tmp_path / f"{name or kind}.onnx"
        path.write_bytes(faulty(kind, **kw).SerializeToString())
        return str(path)
    return save


def _check_reference_is_faulty():
    """The NaN model really yields NaN somewhere on X (otherwise the tests prove nothing)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(faulty("nan").SerializeToString(),
                                providers=["CPUExecutionProvider"])
    z = sess.run(None, {"image": X})[0]
    assert np.isnan(z).any() and not np.isnan(z).all()


# ------------------------------------------------------------------ run-time output checks
@pytest.mark.parametrize(("kind", "match"), [
    ("half", r"of shape \(3, 3, 4, 4\) for an input of 3 image\(s\) of spatial size \(8, 8\); "
             r"expected \(3, 3, 8, 8\)"),
    ("nan", r"non-finite 'logits' \([1-9][0-9]* NaN and 0 infinite of 576 values\)"),
    ("inf", r"non-finite 'logits' \(0 NaN and 192 infinite"),
    ("two_channels", r"of shape \(3, 2, 8, 8\).*expected \(3, 3, 8, 8\)"),
])
def test_single_model_output_is_checked(kind, match, write):
    _check_reference_is_faulty()
    path = write(kind)
    seg = OnnxSegmenter(path, device="cpu").fit()
    for method in (seg.transform, seg.predict_proba, seg.predict):
        with pytest.raises(ModelOutputError, match=rf"model '.*{kind}\.onnx': .*{match}"):
            method(X)
    with pytest.raises(ModelOutputError, match=kind):  # images of several sizes: each checked
        seg.transform([X[0], X[1, :, :6, :6]])


def test_sliding_window_output_is_checked(write):
    path = write("nan", spatial=(8, 8))
    seg = OnnxSegmenter(path, device="cpu").fit()
    big = np.random.default_rng(1).standard_normal((1, 1, 20, 20)).astype(np.float32)
    with pytest.raises(ModelOutputError, match=r"nan\.onnx.*non-finite"):
        seg.transform(big)


def test_fixed_half_size_output_is_refused_at_fit(write):
    with pytest.raises(ValueError, match=r"half\.onnx.*spatial shape \[4, 4\] but its input "
                                         r"has \[8, 8\]"):
        OnnxSegmenter(write("half", spatial=(8, 8))).fit()


def test_integer_logits_are_refused(write):
    with pytest.raises(ValueError, match=r"int\.onnx.*of type INT64; a segmentation network "
                                         "must output floating-point logits"):
        OnnxSegmenter(write("int")).fit()
    with pytest.raises(ValueError, match=r"member 1\b.*INT64"):
        fuse_members([write("ok"), write("int")])
    with pytest.raises(ModelOutputError, match="dtype int64"):  # engines that ignore the type
        check_logits(np.zeros((1, 3, 4, 4), np.int64), n=1, n_classes=3, spatial=(4, 4),
                     where="m")


def test_check_logits_accepts_good_logits_of_any_float_width():
    for dtype in (np.float16, np.float32, np.float64):
        check_logits(np.zeros((2, 3, 4, 5), dtype), n=2, n_classes=3, spatial=(4, 5), where="m")


@pytest.mark.parametrize("kind", ["nan", "inf", "half", "two_channels"])
@pytest.mark.parametrize("mode", ["separate", "fused_numpy", "fused_graph"])
def test_ensemble_names_the_faulty_member(kind, mode, write):
    ens = EnsembleSegmenter([write("ok"), write(kind)], fuse=mode != "separate",
                            device="cpu", fused_stats=mode.split("_")[-1] if mode != "separate"
                            else "auto").fit()
    assert ens.fused_ == (mode != "separate")
    for call in (ens.predict_proba, ens.predict, ens.predict_with_uncertainty):
        with pytest.raises(ModelOutputError, match=rf"member 1\b.*{kind}\.onnx"):
            call(X)
        ens.clear_cache()


def test_healthy_ensemble_is_unchanged_by_the_checks(write):
    """The checks raise nothing on a healthy ensemble, and the fused and separate paths agree."""
    paths = [write("ok"), write("ok", "ok2")]
    got = [EnsembleSegmenter(paths, fuse=f, device="cpu").fit().predict_proba(X)
           for f in (True, False)]
    np.testing.assert_allclose(got[0], got[1], atol=1e-6)


# ------------------------------------------------------------------ metadata checks
@pytest.mark.parametrize(("key", "value", "match"), [
    ("uqseg.spatial_divisor", "0", r"must lie in 1..4096, got 0"),
    ("uqseg.spatial_divisor", "65536", r"must lie in 1..4096, got 65536"),
    ("uqseg.spatial_divisor", "-8", r"must be a positive integer, got '-8'"),
    ("uqseg.spatial_divisor", "8.5", r"must be a positive integer, got '8.5'"),
    ("uqseg.spatial_divisor", "eight", r"must be a positive integer, got 'eight'"),
    ("uqseg.spatial_divisor", "", r"must be a positive integer, got ''"),
    ("uqseg.n_classes", "0", r"must lie in 1..65536, got 0"),
    ("uqseg.n_classes", "3.0", r"must be a positive integer, got '3.0'"),
    ("uqseg.n_classes", "1e9", r"must be a positive integer"),
    ("uqseg.n_classes", "99999999", r"must lie in 1..65536"),
    ("uqseg.n_classes", "4", r"says 4 classes but the output 'logits' has 3 channels"),
    ("uqseg.mc_dropout", "{not json", r"is not valid JSON"),
    ("uqseg.mc_dropout", '{"input": "nope", "p": 0.5, "size": 4}',
     r"names the input 'nope', which the model does not take"),
    ("uqseg.mc_dropout", '[1, 2]', r"must be a JSON object"),
    ("uqseg.feature_layers", '["decoder_last", "ghost"]', r"names \['ghost'\], which are not "
                                                           "tensors of the model's graph"),
    ("uqseg.feature_layers", '{"a": 1}', r"must be a JSON list of names"),
])
def test_bad_metadata_is_refused(key, value, match, write):
    path = write("ok", "bad_meta", **{key: value})
    match = rf"metadata '{key}' {match}"
    with pytest.raises(ValueError, match=rf"model '.*bad_meta\.onnx': {match}"):
        OnnxSegmenter(path).fit()
    with pytest.raises(ValueError, match=rf"member 1\b.*bad_meta\.onnx.*{match}"):
        EnsembleSegmenter([write("ok"), path]).fit()
    with pytest.raises(ValueError, match=rf"member 1\b.*{match}"):
        fuse_members([write("ok"), path])


def _mc_model(tmp_path, spec: dict | str, mask_shape=("N", 4)) -> str:
    model = make_unet_like(dims=2, mc_mask=True)
    model.graph.input[1].CopyFrom(helper.make_tensor_value_info("mc_mask", TensorProto.FLOAT,
                                                                list(mask_shape)))
    props = {p.key: p.value for p in model.metadata_props}
    props["uqseg.mc_dropout"] = spec if isinstance(spec, str) else json.dumps(spec)
    del model.metadata_props[:]
    helper.set_model_props(model, props)
    path = tmp_path / "mc.onnx"
    path.write_bytes(model.SerializeToString())
    return str(path)


@pytest.mark.parametrize(("spec", "shape", "match"), [
    ({"input": "mc_mask", "p": 1.5, "size": 4}, ("N", 4), r"p=1.5; expected a dropout "
                                                          r"probability in \[0, 1\)"),
    ({"input": "mc_mask", "p": True, "size": 4}, ("N", 4), r"p=True"),
    ({"input": "mc_mask", "p": 0.5, "size": 0}, ("N", 4), r"size=0; expected an integer"),
    ({"input": "mc_mask", "p": 0.5, "size": "4"}, ("N", 4), r"size='4'"),
    ({"input": "mc_mask", "p": 0.5, "size": 5}, ("N", 4), r"\(size=5\) does not match the mask "
                                                          r"input 'mc_mask' of shape \[None, 4\]"),
    ({"input": "mc_mask", "p": 0.5, "size": 4}, ("N", 4, 1), r"of shape \[None, 4, 1\]"),
    ({"input": "mc_mask", "p": 0.5, "size": None}, ("N", "D"), r"mask input 'mc_mask' has no "
                                                               "fixed width"),
    ({"input": "mc_mask", "p": 0.5, "extra": 1}, ("N", 4), r"must be a JSON object with keys"),
])
def test_bad_mc_dropout_metadata_is_refused(spec, shape, match, tmp_path):
    with pytest.raises(ValueError, match=rf"mc\.onnx.*{match}"):
        OnnxSegmenter(_mc_model(tmp_path, spec, shape)).fit()


def test_good_mc_dropout_metadata_is_kept(tmp_path):
    spec = {"input": "mc_mask", "p": 0.25, "size": 4}
    seg = OnnxSegmenter(_mc_model(tmp_path, spec)).fit()
    assert seg.mc_dropout_ == spec


def test_large_divisor_within_bound_still_works(write):
    """The bound refuses absurd values only: a divisor of 16 pads 8x8 to 16x16 as before."""
    seg = OnnxSegmenter(write("ok", "d16", **{"uqseg.spatial_divisor": "16"}),
                        device="cpu").fit()
    ref = OnnxSegmenter(write("ok"), device="cpu").fit()
    assert seg.spatial_divisor_ == 16
    padded = np.pad(X, [(0, 0), (0, 0), (0, 8), (0, 8)], mode="reflect")
    np.testing.assert_allclose(seg.transform(X), ref.transform(padded)[..., :8, :8], atol=1e-6)


def test_coprime_divisors_cannot_blow_up_the_ensemble_padding(write):
    """Each divisor is within bounds, their least common multiple (4093 * 4091) is not."""
    paths = [write("ok", f"d{d}", **{"uqseg.spatial_divisor": str(d)}) for d in (4093, 4091)]
    with pytest.raises(ValueError, match=r"spatial divisors \[4093, 4091\] have a least common "
                                         r"multiple of 16744463, above 4096"):
        EnsembleSegmenter(paths).fit()
    with pytest.raises(ValueError, match="member 1: .*least common multiple of 16744463"):
        fuse_members(paths)
