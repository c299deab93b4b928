"""OnnxSegmenter: outputs against direct onnxruntime calls, windows, flips, errors, sklearn API."""

from __future__ import annotations

import pickle

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from uqseg import OnnxSegmenter
from uqseg._segmenter_engine import gaussian_importance as _gaussian_importance
from uqseg.segmenter import softmax

RNG = np.random.default_rng(0)


def _ort(path, x, **extra):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return sess.run(["logits"], {"image": x, **extra})[0]


def _pointwise_model(path, size=16, k=3, c=2):
    """1x1 convolution with a fixed input size: any tiling of it is exact."""
    w = RNG.standard_normal((k, c, 1, 1)).astype(np.float32)
    b = RNG.standard_normal(k).astype(np.float32)
    g = helper.make_graph(
        [helper.make_node("Conv", ["image", "w", "b"], ["logits"], kernel_shape=[1, 1])], "pw",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", c, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", k, size, size])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    onnx.save(m, path)
    return w[:, :, 0, 0], b


@pytest.mark.parametrize("fixture", ["tiny_2d", "tiny_3d"])
def test_transform_equals_direct_onnxruntime(request, fixture):
    path = request.getfixturevalue(fixture)
    dims = 2 if fixture == "tiny_2d" else 3
    x = RNG.standard_normal((5, 1, *[8] * dims)).astype(np.float32)
    seg = OnnxSegmenter(path, batch_size=2).fit(x)
    assert seg.n_classes_ == 3 and seg.spatial_dims_ == dims and seg.n_input_channels_ == 1
    assert seg.input_shape_ == (1, *[None] * dims)
    assert seg.feature_layers_[0] == "bottleneck"
    logits = seg.transform(x)
    assert logits.dtype == np.float32 and logits.shape == (5, 3, *[8] * dims)
    np.testing.assert_allclose(logits, _ort(path, x), atol=1e-5)
    proba = seg.predict_proba(x)
    np.testing.assert_allclose(proba.sum(axis=1), 1, atol=1e-5)
    ref = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(proba, ref, atol=1e-6)
    np.testing.assert_array_equal(seg.predict(x), logits.argmax(axis=1))


def test_auto_batch_size_chunks_by_voxels_on_cpu(tiny_2d, monkeypatch):
    seg = OnnxSegmenter(tiny_2d).fit()
    assert seg.batch_size == "auto" and seg.device_ == "cpu"
    runner = seg._engine()._runner(())
    calls = []
    real_run = runner.run
    monkeypatch.setattr(runner, "run", lambda feeds, outputs: (
        calls.append(feeds["image"].shape[0]), real_run(feeds, outputs))[1])
    big = RNG.standard_normal((5, 1, 256, 256)).astype(np.float32)  # 2**16 voxels: 2 per call
    np.testing.assert_allclose(seg.transform(big), _ort(tiny_2d, big), atol=1e-5)
    assert calls == [2, 2, 1]
    calls.clear()
    small = RNG.standard_normal((20, 1, 16, 16)).astype(np.float32)  # capped at 16 per call
    np.testing.assert_allclose(seg.transform(small), _ort(tiny_2d, small), atol=1e-5)
    assert calls == [16, 4]


def test_resolve_batch_size():
    from uqseg._inference import resolve_batch_size

    assert resolve_batch_size("auto", (128, 128), "cpu") == 8
    assert resolve_batch_size("auto", (256, 256), "cpu") == 2
    assert resolve_batch_size("auto", (96, 96, 96), "cpu") == 1  # never 0
    assert resolve_batch_size("auto", (32, 32), "cpu") == 16  # upper bound
    assert resolve_batch_size("auto", (96, 96, 96), "cuda") == 16
    assert resolve_batch_size(3, (96, 96, 96), "cpu") == 3


def test_dynamic_model_pads_to_divisor_and_crops(tiny_2d):
    x = RNG.standard_normal((2, 1, 9, 13)).astype(np.float32)
    out = OnnxSegmenter(tiny_2d).fit().transform(x)
    assert out.shape == (2, 3, 9, 13)
    padded = np.pad(x, [(0, 0), (0, 0), (0, 1), (0, 1)], mode="reflect")
    np.testing.assert_allclose(out, _ort(tiny_2d, padded)[:, :, :9, :13], atol=1e-5)


def test_run_returns_logits_and_features_from_one_pass(tiny_2d):
    x = RNG.standard_normal((3, 1, 8, 8)).astype(np.float32)
    seg = OnnxSegmenter(tiny_2d).fit()
    out = seg.run(x, layers=["auto", "enc1"], maps="entropy")
    assert set(out) == {"logits", "proba", "entropy", "bottleneck", "enc1"}
    assert out["bottleneck"].shape == (3, 8, 4, 4) and out["enc1"].shape == (3, 4, 8, 8)
    ref = _ort(tiny_2d, x)
    np.testing.assert_allclose(out["logits"], ref, atol=1e-5)  # proba did not overwrite them
    p_ref = np.exp(ref) / np.exp(ref).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(out["proba"], p_ref, atol=1e-6)
    np.testing.assert_allclose(out["entropy"], -(p_ref * np.log(p_ref)).sum(axis=1), atol=1e-5)
    assert set(seg.run(x, layers="enc1", proba=False)) == {"logits", "enc1"}
    with pytest.raises(ValueError, match="several predictions per image"):
        seg.run(x, maps=["mutual_information"])
    with pytest.raises(ValueError, match="unknown uncertainty map"):
        seg.run(x, maps=["entropyy"])
    sess = ort.InferenceSession(tiny_2d)
    assert not any(o.name == "enc1" for o in sess.get_outputs())
    with pytest.raises(ValueError, match="unknown layer"):
        seg.run(x, layers=["no_such_layer"])


def test_sliding_window_is_exact_for_a_pointwise_network(tmp_path):
    path = str(tmp_path / "pw.onnx")
    w, b = _pointwise_model(path)
    seg = OnnxSegmenter(path, batch_size=3, overlap=0.5).fit()
    assert seg.input_shape_ == (2, 16, 16)
    x = RNG.standard_normal((2, 2, 37, 21)).astype(np.float32)
    got = seg.transform(x)
    ref = np.einsum("kc,nchw->nkhw", w, x) + b[None, :, None, None]
    assert got.shape == (2, 3, 37, 21)
    np.testing.assert_allclose(got, ref, atol=1e-4)
    small = RNG.standard_normal((1, 2, 10, 16)).astype(np.float32)  # padded up, then cropped
    ref_small = np.einsum("kc,nchw->nkhw", w, small) + b[None, :, None, None]
    np.testing.assert_allclose(seg.transform(small), ref_small, atol=1e-4)


def test_sliding_window_on_the_model_size_is_plain_inference(tiny_fixed):
    x = RNG.standard_normal((2, 1, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(OnnxSegmenter(tiny_fixed).fit().transform(x),
                               _ort(tiny_fixed, x), atol=1e-5)
    big = RNG.standard_normal((1, 1, 40, 24)).astype(np.float32)
    out = OnnxSegmenter(tiny_fixed).fit().transform(big)
    assert out.shape == (1, 3, 40, 24) and np.isfinite(out).all()
    # the top-left window alone covers the corner: its centre region is dominated by it
    corner = _ort(tiny_fixed, np.ascontiguousarray(big[:, :, :16, :16]))
    np.testing.assert_allclose(out[:, :, :4, :4], corner[:, :, :4, :4], atol=1e-3)


def test_gaussian_importance_peaks_in_centre():
    imp = _gaussian_importance((9, 9))
    assert imp[4, 4] == pytest.approx(1.0)
    assert imp.min() > 0 and imp[0, 0] < imp[2, 2] < imp[4, 4]


def test_flips_average_flipped_passes(tiny_2d):
    x = RNG.standard_normal((2, 1, 8, 8)).astype(np.float32)
    got = OnnxSegmenter(tiny_2d, tta="flips").fit().transform(x)
    ref = np.zeros_like(got)
    for axes in [(), (2,), (3,), (2, 3)]:
        xf = np.ascontiguousarray(np.flip(x, axes)) if axes else x
        out = _ort(tiny_2d, xf)
        ref += np.flip(out, axes) if axes else out
    np.testing.assert_allclose(got, ref / 4, atol=1e-5)
    one = OnnxSegmenter(tiny_2d, tta=[(1,)]).fit().transform(x)
    ref1 = (_ort(tiny_2d, x) + np.flip(_ort(tiny_2d, np.ascontiguousarray(np.flip(x, 3))), 3)) / 2
    np.testing.assert_allclose(one, ref1, atol=1e-5)
    with pytest.raises(ValueError, match="tta"):
        OnnxSegmenter(tiny_2d, tta=[(5,)]).fit().transform(x)


def test_list_of_differently_sized_images(tiny_2d):
    imgs = [RNG.standard_normal((1, 8, 8)).astype(np.float32),
            RNG.standard_normal((1, 12, 6)).astype(np.float32),
            RNG.standard_normal((1, 8, 8)).astype(np.float32)]
    seg = OnnxSegmenter(tiny_2d).fit()
    out = seg.transform(imgs)
    assert [o.shape for o in out] == [(3, 8, 8), (3, 12, 6), (3, 8, 8)]
    for img, o in zip(imgs, out, strict=True):
        np.testing.assert_allclose(o, _ort(tiny_2d, img[None])[0], atol=1e-5)
    labels = seg.predict(imgs)
    assert labels[1].shape == (12, 6)
    np.testing.assert_allclose(seg.predict_proba(imgs)[1].sum(0), 1, atol=1e-5)


def test_mc_mask_input(tiny_mc):
    x = RNG.standard_normal((2, 1, 8, 8)).astype(np.float32)
    seg = OnnxSegmenter(tiny_mc).fit()
    assert seg.mc_dropout_ == {"input": "mc_mask", "p": 0.5, "size": 4}
    ones = np.ones((2, 4), np.float32)
    np.testing.assert_allclose(seg.transform(x), _ort(tiny_mc, x, mc_mask=ones), atol=1e-5)
    mask = np.array([[2, 0, 2, 0], [0, 2, 0, 2]], np.float32)
    got = seg.run(x, layers=[], mc_mask=mask)["logits"]
    np.testing.assert_allclose(got, _ort(tiny_mc, x, mc_mask=mask), atol=1e-5)
    assert not np.allclose(got, seg.transform(x))
    with pytest.raises(ValueError, match="mc_mask must have shape"):
        seg.run(x, layers=[], mc_mask=np.ones((2, 3)))


def test_float16_model_gives_float32_close_to_fp32(tiny_fp16, tiny_2d):
    x = RNG.standard_normal((2, 1, 8, 8)).astype(np.float32)
    out16 = OnnxSegmenter(tiny_fp16).fit().transform(x)
    assert out16.dtype == np.float32
    np.testing.assert_allclose(out16, OnnxSegmenter(tiny_2d).fit().transform(x), atol=2e-2)


def test_sklearn_conventions(tiny_2d):
    seg = OnnxSegmenter(tiny_2d, batch_size=4)
    assert seg.get_params()["batch_size"] == 4
    with pytest.raises(NotFittedError):
        seg.transform(np.zeros((1, 1, 8, 8), np.float32))
    seg.fit()
    c = clone(seg)
    assert c.get_params() == seg.get_params() and not hasattr(c, "n_classes_")
    seg.set_params(batch_size=1)
    assert seg.batch_size == 1
    x = RNG.standard_normal((2, 1, 8, 8)).astype(np.float32)
    before = seg.transform(x)
    again = pickle.loads(pickle.dumps(seg))
    assert again._runtime is None  # sessions are rebuilt lazily
    np.testing.assert_array_equal(again.transform(x), before)
    np.testing.assert_allclose(seg.fit_transform(x), before, atol=1e-6)


@pytest.mark.parametrize(
    ("X", "exc", "match"),
    [
        (np.zeros((1, 8, 8), np.float32), ValueError, "dims"),
        (np.zeros((1, 2, 8, 8), np.float32), ValueError, "2 channels.*expects 1"),
        (np.full((1, 1, 8, 8), np.nan, np.float32), ValueError, "NaN"),
        (np.full((1, 1, 8, 8), np.inf, np.float32), ValueError, "infinite"),
        (np.array([[[["a"]]]]), TypeError, "real numbers"),
        (np.zeros((0, 1, 8, 8), np.float32), ValueError, "empty batch"),
        ([], ValueError, "empty list"),
        (np.zeros((1, 1, 8, 8, 8), np.float32), ValueError, "2 spatial axes"),
    ],
)
def test_bad_inputs(tiny_2d, X, exc, match):
    seg = OnnxSegmenter(tiny_2d).fit()
    with pytest.raises(exc, match=match):
        seg.transform(X)


def test_spatial_size_the_model_cannot_take(make_model, tmp_path):
    import onnx

    # metadata says divisor 1 (wrong): odd sizes break the Concat, with a clear error
    proto = onnx.load(make_model("nometa", metadata=False))
    onnx.helper.set_model_props(proto, {"uqseg.spatial_divisor": "1"})
    path = tmp_path / "div1.onnx"
    onnx.save(proto, path)
    seg = OnnxSegmenter(path).fit()
    with pytest.raises(ValueError, match="spatial size"):
        seg.transform(np.zeros((1, 1, 7, 7), np.float32))


def test_spatial_divisor_inferred_without_metadata(make_model):
    import onnxruntime as ort

    path = make_model("nometa", metadata=False)  # one 2x2 pooling on the way to the bottleneck
    seg = OnnxSegmenter(path).fit()
    assert seg.spatial_divisor_ == 2
    x = np.random.default_rng(0).standard_normal((2, 1, 7, 9)).astype(np.float32)
    padded = np.pad(x, [(0, 0), (0, 0), (0, 1), (0, 1)], mode="reflect")
    ref = ort.InferenceSession(path).run(None, {"image": padded})[0][:, :, :7, :9]
    np.testing.assert_allclose(seg.transform(x), ref, rtol=1e-5, atol=1e-5)


def test_bad_models_and_settings(tmp_path, tiny_2d):
    with pytest.raises(FileNotFoundError):
        OnnxSegmenter(tmp_path / "missing.onnx").fit()
    junk = tmp_path / "junk.onnx"
    junk.write_text("this is not an onnx file")
    with pytest.raises(ValueError, match="not a valid ONNX"):
        OnnxSegmenter(junk).fit()
    from onnx_models import make_wrong_rank
    path = tmp_path / "cls.onnx"
    onnx.save(make_wrong_rank(), path)
    with pytest.raises(ValueError, match="rank 2.*segmentation"):
        OnnxSegmenter(path).fit()
    with pytest.raises(ValueError, match="unknown backend"):
        OnnxSegmenter(tiny_2d, backend="torch").fit()
    with pytest.raises(ValueError, match="unknown device"):
        OnnxSegmenter(tiny_2d, device="tpu").fit()
    with pytest.raises(ValueError, match="batch_size must be 'auto' or a positive integer"):
        OnnxSegmenter(tiny_2d, batch_size=0).fit()
    with pytest.raises(ValueError, match="got 'big'"):
        OnnxSegmenter(tiny_2d, batch_size="big").fit()
    with pytest.raises(ValueError, match="overlap"):
        OnnxSegmenter(tiny_2d, overlap=1.0).fit()
    with pytest.raises(TypeError, match="path"):
        OnnxSegmenter(12).fit()


def test_softmax_is_stable():
    z = np.array([[[1000.0]], [[0.0]]], np.float32)[None]
    p = softmax(z)
    assert np.isfinite(p).all() and p[0, 0, 0, 0] == pytest.approx(1.0)
