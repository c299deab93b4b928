"""Sliding-window inference against an independent numpy + ONNX Runtime reference.

The reference cuts the windows itself (step ``round(w * (1 - overlap))``, the last window
flush with the border), runs each patch through a plain ``onnxruntime.InferenceSession`` and
blends with the closed-form Gaussian ``exp(-(x - (w - 1) / 2)^2 / (2 (w / 8)^2))`` (peak 1,
floor 1e-3). A network with a receptive field (not pointwise) makes every window position and
weight visible in the result.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnxruntime as ort
import pytest

from uqseg import OnnxSegmenter
from uqseg._segmenter_engine import gaussian_importance as _gaussian_importance
from uqseg._segmenter_engine import window_starts as _window_starts


def ref_gaussian(window):
    g = 1.0
    for w in window:
        x = np.arange(w) - (w - 1) / 2
        g = np.multiply.outer(g, np.exp(-0.5 * (x / (w / 8)) ** 2))
    g = g / g.max()
    return np.maximum(g, 1e-3)


def ref_starts(size, window, step):
    if size <= window:
        return [0]
    starts = list(range(0, size - window, step)) + [size - window]
    return sorted(set(starts))


def ref_sliding(path, x, window, overlap):
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    spatial = x.shape[2:]
    padded = tuple(max(s, w) for s, w in zip(spatial, window, strict=True))
    xp = np.zeros(x.shape[:2] + padded, np.float32)
    xp[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)] = x
    g = ref_gaussian(window)
    out, norm = None, np.zeros(padded)
    steps = [max(1, int(round(w * (1 - overlap)))) for w in window]
    for st in itertools.product(*[ref_starts(s, w, t)
                                  for s, w, t in zip(padded, window, steps, strict=True)]):
        region = tuple(slice(a, a + w) for a, w in zip(st, window, strict=True))
        patch = np.ascontiguousarray(xp[(slice(None), slice(None)) + region])
        logits = sess.run(None, {"image": patch})[0].astype(np.float64)
        if out is None:
            out = np.zeros(x.shape[:1] + logits.shape[1:2] + padded)
        out[(slice(None), slice(None)) + region] += logits * g
        norm[region] += g
    out /= norm
    return out[(slice(None), slice(None)) + tuple(slice(0, s) for s in spatial)]


@pytest.mark.parametrize("window", [(16, 16), (9, 12), (5, 7, 6)])
def test_gaussian_importance_closed_form(window):
    got = _gaussian_importance(window)
    assert got.dtype == np.float32 and got.shape == window
    np.testing.assert_allclose(got, ref_gaussian(window), rtol=1e-6, atol=1e-9)
    for ax in range(len(window)):  # centred: symmetric along every axis
        np.testing.assert_allclose(got, np.flip(got, ax), rtol=1e-6)


@pytest.mark.parametrize(("size", "window", "step"), [
    (40, 16, 8), (37, 16, 8), (16, 16, 8), (10, 16, 8), (33, 16, 16), (17, 16, 1), (50, 7, 3)])
def test_window_starts_against_the_reference(size, window, step):
    assert _window_starts(size, window, step) == ref_starts(size, window, step)
    starts = _window_starts(size, window, step)
    covered = np.zeros(max(size, window), bool)
    for s in starts:
        covered[s:s + window] = True
    assert covered[:size].all()  # every voxel lies in a window


@pytest.mark.parametrize(("shape", "overlap", "batch_size"), [
    ((1, 1, 40, 24), 0.5, 4),
    ((2, 1, 37, 21), 0.5, 1),
    ((1, 1, 29, 40), 0.25, 3),
    ((1, 1, 10, 33), 0.5, 2),   # smaller than the window along one axis: padded, cropped
    ((1, 1, 33, 17), 0.0, 8),
])
def test_sliding_window_equals_the_reference(make_model, shape, overlap, batch_size):
    path = make_model("fixed16_ref", dims=2, spatial=(16, 16), seed=5)
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    seg = OnnxSegmenter(path, device="cpu", overlap=overlap, batch_size=batch_size).fit()
    got = seg.transform(x)
    ref = ref_sliding(path, x, (16, 16), overlap)
    assert got.shape == ref.shape == (shape[0], 3, *shape[2:])
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(seg.predict(x), ref.argmax(axis=1))


def test_sliding_window_3d_equals_the_reference(make_model):
    path = make_model("fixed3d_ref", dims=3, spatial=(8, 8, 8), seed=6)
    x = np.random.default_rng(7).standard_normal((1, 1, 14, 8, 11)).astype(np.float32)
    got = OnnxSegmenter(path, device="cpu", batch_size=2).fit().transform(x)
    np.testing.assert_allclose(got, ref_sliding(path, x, (8, 8, 8), 0.5), rtol=1e-4, atol=1e-5)
