"""Hardening: property-based input checks, extreme values, thread safety, malformed models."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from onnx import TensorProto, helper
from onnx_models import make_unet_like, make_wrong_rank
from scipy.special import softmax as scipy_softmax

from uqseg import EnsembleSegmenter, OnnxSegmenter, backends, metrics
from uqseg import uncertainty as unc
from uqseg._validation import check_images, check_labels, check_scores
from uqseg.backends._model import read_model

PROPS = settings(max_examples=25, deadline=None,
                 suppress_health_check=[HealthCheck.function_scoped_fixture])
DTYPES = [np.float16, np.float32, np.float64, np.int8, np.int32, np.uint8, np.bool_]

image_shapes = st.tuples(st.integers(1, 3), st.integers(1, 2)).flatmap(
    lambda nc: st.lists(st.integers(1, 6), min_size=2, max_size=3).map(
        lambda sp: (*nc, *sp)))


def _array(dtype, shape):
    if dtype == np.bool_:
        return hnp.arrays(dtype, shape)
    if np.issubdtype(dtype, np.integer):
        return hnp.arrays(dtype, shape, elements=st.integers(-100 if dtype != np.uint8 else 0, 100))
    return hnp.arrays(dtype, shape, elements=st.floats(-1e3, 1e3, width=np.dtype(dtype).itemsize
                                                       * 8))


# ---------------------------------------------------------------------------- input validation
@PROPS
@given(data=st.data(), dtype=st.sampled_from(DTYPES), shape=image_shapes)
def test_check_images_casts_every_real_dtype(data, dtype, shape):
    x = data.draw(_array(dtype, shape))
    out = check_images(x)
    assert out.dtype == np.float32 and out.shape == shape
    np.testing.assert_array_equal(out, x.astype(np.float32))


@PROPS
@given(data=st.data(), shape=image_shapes, bad=st.sampled_from([np.nan, np.inf, -np.inf]),
       dtype=st.sampled_from([np.float16, np.float32, np.float64]))
def test_non_finite_images_are_refused(data, shape, bad, dtype):
    x = np.zeros(shape, dtype)
    x[tuple(data.draw(st.integers(0, s - 1)) for s in shape)] = bad
    with pytest.raises(ValueError, match="X contains 1 NaN or infinite values"):
        check_images(x)


@PROPS
@given(shape=st.lists(st.integers(1, 5), min_size=1, max_size=6))
def test_wrong_rank_is_named(shape):
    if len(shape) in (4, 5):
        shape = shape[:3]
    with pytest.raises(ValueError, match=rf"X must have shape \(N, C, \*spatial\).*got "
                                         rf"{len(shape)} dims"):
        check_images(np.zeros(shape, np.float32))


@pytest.mark.parametrize("x", [np.array([["a"]]), np.zeros((1, 1, 2, 2), complex),
                               np.array([[[[None]]]])])
def test_non_real_images_are_type_errors(x):
    with pytest.raises(TypeError, match="X must hold real numbers"):
        check_images(x)


@PROPS
@given(y=hnp.arrays(np.int64, st.tuples(st.integers(1, 3), st.integers(1, 5),
                                        st.integers(1, 5)), elements=st.integers(-2, 5)))
def test_labels_out_of_range_are_named(y):
    if y.min() >= 0 and y.max() < 3:
        np.testing.assert_array_equal(check_labels(y, n_classes=3), y)
    else:
        with pytest.raises(ValueError, match=rf"y holds labels in \[{y.min()}, {y.max()}\]"):
            check_labels(y, n_classes=3)


# ---------------------------------------------------------------------------- extreme values
logits_st = st.tuples(st.integers(2, 5), st.integers(1, 6)).flatmap(
    lambda ks: hnp.arrays(np.float32, (2, ks[0], ks[1], 3),
                          elements=st.sampled_from([-1e4, -30.0, 0.0, 1e-3, 30.0, 1e4])
                          | st.floats(-1e4, 1e4, width=32)))


@PROPS
@given(logits=logits_st)
def test_softmax_and_uncertainty_of_extreme_logits(logits):
    k = logits.shape[1]
    p = unc.softmax(logits)
    assert np.isfinite(p).all() and p.min() >= 0
    np.testing.assert_allclose(p, scipy_softmax(logits.astype(np.float64), axis=1), atol=1e-6)
    h = unc.entropy(p)
    assert np.isfinite(h).all() and h.min() >= 0 and h.max() <= np.log(k) + 1e-5
    members = np.stack([p, unc.softmax(logits[::-1])])
    mi, ee, total = (unc.mutual_information(members), unc.expected_entropy(members),
                     unc.entropy(members.mean(axis=0)))
    assert np.isfinite(mi).all() and mi.min() >= -1e-5
    np.testing.assert_allclose(ee + mi, total, atol=1e-5)  # total = aleatoric + epistemic
    assert np.isfinite(unc.variance(members)).all()


@PROPS
@given(logits=logits_st, data=st.data())
def test_calibration_metrics_finite_for_extreme_logits(logits, data):
    p = unc.softmax(logits)
    k = p.shape[1]
    y = data.draw(hnp.arrays(np.int64, (p.shape[0], *p.shape[2:]), elements=st.integers(0, k - 1)))
    ece = metrics.expected_calibration_error(p, y)
    brier = metrics.brier_score(p, y)
    nll = metrics.negative_log_likelihood(p, y)
    assert 0 <= ece <= 1 and 0 <= brier <= 2 and np.isfinite(nll) and nll >= 0
    # brier against its definition
    onehot = np.moveaxis(np.eye(k)[y], -1, 1)
    np.testing.assert_allclose(brier, ((p - onehot) ** 2).sum(axis=1).mean(), rtol=1e-4,
                               atol=1e-6)
    assert np.isfinite(metrics.maximum_calibration_error(p, y))
    conf, acc, count = metrics.reliability_curve(p, y)
    assert count.sum() == y.size


labels_st = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6)).flatmap(
    lambda s: st.tuples(hnp.arrays(np.int64, s, elements=st.integers(0, 2)),
                        hnp.arrays(np.int64, s, elements=st.integers(0, 2))))


@PROPS
@given(pair=labels_st, one_class=st.booleans())
def test_dice_with_empty_and_one_class_labels(pair, one_class):
    pred, y = pair
    if one_class:  # background only in the truth
        y = np.zeros_like(y)
    d = metrics.dice_score(pred, y, n_classes=3)
    for i in range(len(y)):
        for k in (1, 2):
            a, b = pred[i] == k, y[i] == k
            if a.sum() + b.sum() == 0:
                assert np.isnan(d[i, k - 1])  # undefined, documented as NaN
            else:
                assert d[i, k - 1] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_scores_checks_name_the_problem():
    with pytest.raises(ValueError, match="proba contains NaN or infinite"):
        check_scores(np.full((1, 2, 2, 2), np.nan, np.float32), name="proba", kind="proba")
    with pytest.raises(ValueError, match="at least 2 classes"):
        check_scores(np.ones((1, 1, 2, 2), np.float32), name="proba", kind="proba")
    with pytest.raises(ValueError, match="are these logits"):
        check_scores(np.full((1, 2, 2, 2), 3.0, np.float32), name="proba", kind="proba")


# ---------------------------------------------------------------------------- the segmenter
@PROPS
@given(data=st.data(), dtype=st.sampled_from(DTYPES),
       spatial=st.lists(st.integers(1, 9), min_size=2, max_size=2))
def test_segmenter_any_dtype_and_size(tiny_2d, data, dtype, spatial):
    seg = _fitted(tiny_2d)
    x = data.draw(_array(dtype, (2, 1, *spatial)))
    out = seg.transform(x)
    assert out.shape == (2, 3, *spatial) and out.dtype == np.float32 and np.isfinite(out).all()
    np.testing.assert_array_equal(out, seg.transform(x.astype(np.float32)))
    np.testing.assert_array_equal(seg.predict(x), out.argmax(axis=1))


def test_segmenter_extreme_inputs_give_finite_probabilities(tiny_2d):
    seg = _fitted(tiny_2d)
    x = np.full((2, 1, 8, 8), 1e4, np.float32)
    x[1] *= -1
    logits = seg.transform(x)
    assert np.abs(logits).max() > 100  # genuinely extreme logits
    p = seg.predict_proba(x)
    assert np.isfinite(p).all()
    np.testing.assert_allclose(p.sum(axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(p, scipy_softmax(logits.astype(np.float64), axis=1), atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_segmenter_refuses_non_finite(tiny_2d, bad):
    x = np.zeros((1, 1, 8, 8), np.float32)
    x[0, 0, 3, 3] = bad
    with pytest.raises(ValueError, match="X contains 1 NaN or infinite values"):
        _fitted(tiny_2d).predict(x)
    with pytest.raises(ValueError, match=r"X\[1\] contains 1 NaN"):
        _fitted(tiny_2d).predict([np.zeros((1, 8, 8)), x[0]])


_FITTED: dict[str, OnnxSegmenter] = {}


def _fitted(path):
    if path not in _FITTED:
        _FITTED[path] = OnnxSegmenter(path).fit()
    return _FITTED[path]


# ---------------------------------------------------------------------------- threads
def _hammer(fn, inputs, n_threads=4):
    """Call fn on every input from n_threads threads at once (released together)."""
    barrier = threading.Barrier(n_threads)

    def work(t):
        barrier.wait()
        return [fn(x) for x in inputs[t::n_threads]]

    with ThreadPoolExecutor(n_threads) as pool:
        parts = list(pool.map(work, range(n_threads)))
    out = [None] * len(inputs)
    for t, part in enumerate(parts):
        out[t::n_threads] = part
    return out


@pytest.fixture
def batches():
    rng = np.random.default_rng(4)
    return [rng.standard_normal((2, 1, 8 + 2 * (i % 3), 12)).astype(np.float32)
            for i in range(12)]


def test_concurrent_predict_matches_serial_and_builds_one_runner(tiny_2d, batches, monkeypatch):
    serial = OnnxSegmenter(tiny_2d).fit()
    want = [serial.predict_proba(x) for x in batches]
    loads = []
    real_load = backends.load

    def slow_load(*args, **kwargs):
        loads.append(args[0])
        threading.Event().wait(0.2)  # widen the race window between check and creation
        return real_load(*args, **kwargs)

    monkeypatch.setattr(backends, "load", slow_load)
    seg = OnnxSegmenter(tiny_2d).fit()
    got = _hammer(seg.predict_proba, batches)
    assert len(loads) == 1  # the lock held: one runner for 4 racing threads
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


def test_concurrent_ensemble_matches_serial(tiny_members, batches):
    serial = EnsembleSegmenter(tiny_members, tta="flips").fit()
    want = [(serial.predict_proba(x), serial.uncertainty(x, kind="mutual_information"))
            for x in batches]
    ens = EnsembleSegmenter(tiny_members, tta="flips").fit()
    got = _hammer(lambda x: (ens.predict_proba(x), ens.uncertainty(x, kind="mutual_information")),
                  batches)
    for (gp, gu), (wp, wu) in zip(got, want, strict=True):
        np.testing.assert_array_equal(gp, wp)
        np.testing.assert_array_equal(gu, wu)


# ---------------------------------------------------------------------------- malformed models
def _write(tmp_path, name, proto_or_bytes):
    path = tmp_path / name
    data = proto_or_bytes if isinstance(proto_or_bytes, bytes) \
        else proto_or_bytes.SerializeToString()
    path.write_bytes(data)
    return str(path)


def test_wrong_output_rank_is_refused(tmp_path):
    path = _write(tmp_path, "cls.onnx", make_wrong_rank())
    with pytest.raises(ValueError, match="output 'logits' has rank 2 but a segmentation "
                                         r"network must output \(N, K, \*spatial\) of rank 4"):
        OnnxSegmenter(path).fit()


def test_model_without_input_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Constant", [], ["logits"], value=helper.make_tensor(
            "c", TensorProto.FLOAT, [1, 2, 2, 2], [0.0] * 8))],
        "no_input", [], [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 2, 2, 2])])
    path = _write(tmp_path, "noinput.onnx", helper.make_model(graph))
    with pytest.raises(ValueError, match="ONNX model has no input"):
        OnnxSegmenter(path).fit()


def test_model_with_two_image_inputs_is_refused(tmp_path):
    model = make_unet_like(dims=2)
    model.graph.input.append(helper.make_tensor_value_info("extra", TensorProto.FLOAT,
                                                           ["N", 1, 4, 4]))
    path = _write(tmp_path, "two.onnx", model)
    with pytest.raises(ValueError, match=r"exactly one image input.*\['image', 'extra'\]"):
        OnnxSegmenter(path).fit()


@pytest.mark.parametrize("location", ["../outside.bin", "/etc/passwd", "sub/../../outside.bin"])
def test_external_data_outside_folder_is_refused(tmp_path, location):
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "outside.bin").write_bytes(b"\0" * 4096)
    model = make_unet_like(dims=2)
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value=location)
    path = _write(folder, "ext.onnx", model)
    with pytest.raises(ValueError, match="outside the model's folder.*refusing to read it"):
        OnnxSegmenter(path).fit()
    with pytest.raises(ValueError, match="outside the model's folder"):
        backends.load(path)


def test_missing_external_data_is_named(tmp_path):
    model = make_unet_like(dims=2)
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    tensor.external_data.add(key="location", value="weights.bin")
    path = _write(tmp_path, "ext.onnx", model)
    with pytest.raises(FileNotFoundError, match="external data file 'weights.bin'.*missing"):
        read_model(path)


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_model_is_refused(tmp_path, cut):
    data = make_unet_like(dims=2).SerializeToString()
    path = _write(tmp_path, "cut.onnx", data[:int(len(data) * cut)])
    with pytest.raises(ValueError, match="is not a valid ONNX model"):
        OnnxSegmenter(path).fit()


@pytest.mark.parametrize("data, match", [(b"", "is empty"), (b"not onnx at all \xff\x00",
                                                             "not a valid ONNX model")])
def test_garbage_model_files_are_refused(tmp_path, data, match):
    path = _write(tmp_path, "bad.onnx", data)
    with pytest.raises(ValueError, match=match):
        OnnxSegmenter(path).fit()


def test_missing_model_and_wrong_types(tmp_path):
    with pytest.raises(FileNotFoundError, match="model file not found"):
        OnnxSegmenter(str(tmp_path / "nope.onnx")).fit()
    with pytest.raises(ValueError, match="got a directory"):
        OnnxSegmenter(str(tmp_path)).fit()
    with pytest.raises(TypeError, match="model must be a path to an ONNX file, got int"):
        OnnxSegmenter(3).fit()
