"""QualityNet: training lowers the loss, ONNX export round trip, use through QualityRegressor."""

from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.torch
torch = pytest.importorskip("torch")

from uqseg.quality import QualityRegressor  # noqa: E402
from uqseg.training.quality_net import (  # noqa: E402
    QualityNet,
    QualityNetRegressor,
    export_quality_net,
    train_quality_net,
)


def _maps(n=48, seed=0):
    """Maps whose uncertainty channel's mean decides the 'quality'."""
    rng = np.random.default_rng(seed)
    level = rng.random(n)
    maps = rng.random((n, 5, 16, 16)).astype(np.float32) * 0.2
    maps[:, -1] += level[:, None, None].astype(np.float32)
    return maps, np.stack([1 - 0.8 * level, 1 - 0.5 * level], axis=1).astype(np.float32)


def test_training_learns_and_export_round_trip(tmp_path):
    torch.set_num_threads(1)
    maps, q = _maps()
    torch.manual_seed(0)
    net = QualityNet(5, 2, width=8, depth=2)
    hist = train_quality_net(net, maps, q, epochs=40, batch_size=16, lr=5e-3)
    assert hist["loss"][-1] < 0.5 * hist["loss"][0]
    test, q_test = _maps(16, seed=1)
    with torch.no_grad():
        pred = net(torch.from_numpy(test)).numpy()
    assert np.abs(pred - q_test).mean() < 0.08
    rep = export_quality_net(net, tmp_path / "q.onnx", test[:2], info={"target": "dice"})
    assert rep["max_abs_diff"] <= 1e-4
    import onnxruntime as ort

    sess = ort.InferenceSession(rep["path"], providers=["CPUExecutionProvider"])
    big = np.concatenate([test, test])[:, :, :, :]  # another batch size
    out = sess.run(None, {"maps": big})[0]
    np.testing.assert_allclose(out[:16], pred, atol=1e-4)
    with pytest.raises(ValueError, match="maps has 48 samples but targets has 3"):
        train_quality_net(net, maps, q[:3], epochs=1)


def test_quality_net_through_quality_regressor(tiny_2d, tmp_path):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    X = rng.random((12, 1, 16, 16)).astype(np.float32)
    y = rng.integers(0, 3, (12, 16, 16))
    reg = QualityNetRegressor(width=4, depth=2, epochs=2, batch_size=8)
    qr = QualityRegressor(tiny_2d, regressor=reg, regressor_input="maps").fit(X, y)
    q = qr.predict(X)
    assert q.shape == (12, 2) and 0 <= q.min() and q.max() <= 1
    # the exported network gives the same predictions through the ONNX path
    from uqseg.quality import maps_input

    seg = qr.estimator_
    p = seg.predict_proba(X[:2])
    h = -(p * np.log(p)).sum(axis=1)
    path = qr.regressor_.export_onnx(tmp_path / "qn.onnx", maps_input(X[:2], p, h, "entropy"))
    onnx_qr = QualityRegressor(tiny_2d, regressor=path["path"]).fit(X, y)
    np.testing.assert_allclose(onnx_qr.predict(X), q, atol=1e-4)
