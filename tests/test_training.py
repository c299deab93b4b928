"""Tests of uqseg.training: U-Net, losses, training loop and ONNX export."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from uqseg.training import (  # noqa: E402
    CrossEntropyLoss,
    DiceCELoss,
    DiceLoss,
    UNet,
    export_onnx,
    fit_segmenter,
    predict_logits,
)
from uqseg.training import export as export_mod  # noqa: E402

pytestmark = pytest.mark.torch
torch.set_num_threads(2)


def _net(dims=2, dropout=0.25, seed=0, **kw):
    torch.manual_seed(seed)
    kw = {"width": 4, "depth": 3, **kw}
    net = UNet(1, 3, dims=dims, dropout=dropout, **kw)
    # a few training-mode passes give BatchNorm non-trivial running statistics
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(4, 1, *([8] * dims)) * 2 + 1)
    return net.eval()


def _softmax(z, axis=1):
    e = np.exp(z - z.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------- network
@pytest.mark.parametrize(
    "dims, shape, depth", [(2, (16, 24), 3), (2, (8, 8), 4), (3, (8, 16, 8), 3)]
)
def test_unet_shapes_and_features(dims, shape, depth):
    net = UNet(2, 4, dims=dims, width=4, depth=depth, dropout=0.1).eval()
    x = torch.randn(3, 2, *shape)
    logits, feats = net.forward_features(x)
    assert logits.shape == (3, 4, *shape)
    assert list(feats) == net.feature_names
    assert net.feature_names[depth - 1] == "bottleneck"
    assert net.feature_names[-1] == "decoder_last"
    assert net.spatial_divisor == 2 ** (depth - 1)
    down = net.spatial_divisor
    assert feats["bottleneck"].shape == (3, 4 * down, *[s // down for s in shape])
    assert feats["decoder_last"].shape == (3, 4, *shape)
    assert feats["enc1"].shape == (3, 4, *shape)
    # mask layout: bottleneck channels first, then decoder blocks deepest first
    assert net.mc_size == sum(4 * 2**i for i in range(depth))
    assert torch.equal(net(x), logits)


def test_unet_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dims"):
        UNet(1, 3, dims=4)
    with pytest.raises(ValueError, match="dropout"):
        UNet(1, 3, dropout=1.0)
    with pytest.raises(ValueError, match="depth"):
        UNet(1, 3, depth=1)
    with pytest.raises(ValueError, match="norm"):
        UNet(1, 3, norm="layer")
    net = UNet(1, 3, width=4, depth=3, dropout=0.2).eval()
    with pytest.raises(ValueError, match="mc_mask must have shape"):
        net(torch.zeros(1, 1, 8, 8), torch.ones(1, 5))
    with pytest.raises(ValueError, match="no dropout"):
        UNet(1, 3, width=4, depth=3)(torch.zeros(1, 1, 8, 8), torch.ones(1, 0))


def test_mc_mask_semantics():
    net = _net()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        ref = net(x)
        ones = net(x, torch.ones(2, net.mc_size))
        torch.testing.assert_close(ones, ref, rtol=0, atol=1e-6)
        zeros = net(x, torch.zeros(2, net.mc_size))
        assert (zeros - ref).abs().max() > 1e-3
        mask = net.sample_mc_mask(2, generator=torch.Generator().manual_seed(1))
        values = mask.numpy()
        assert np.all((values == 0) | np.isclose(values, 1 / 0.75))
        assert 0 < (values == 0).mean() < 1
        assert torch.equal(net(x, mask), net(x, mask))
        assert (net(x, mask) - ref).abs().max() > 1e-4
        # the first channels of the mask act on the bottleneck, in channel order
        cb = net.width * net.spatial_divisor
        m = torch.ones(2, net.mc_size)
        m[:, 1] = 0.0
        _, feats = net.forward_features(x, m)
        _, clean = net.forward_features(x)
        assert torch.all(feats["bottleneck"][:, 1] == 0)
        torch.testing.assert_close(feats["bottleneck"][:, 2:cb], clean["bottleneck"][:, 2:cb])
        # eval without mask is deterministic; mc_dropout=True samples
        assert torch.equal(net(x), net(x))
        net.mc_dropout = True
        assert not torch.equal(net(x), net(x))
        net.mc_dropout = False


# ---------------------------------------------------------------- losses
def _dice_by_hand(logits, y, k, smooth, classes, valid=None):
    p = _softmax(logits)
    onehot = np.eye(k)[y].transpose(0, 3, 1, 2)
    if valid is not None:
        p, onehot = p * valid[:, None], onehot * valid[:, None]
    dice = [
        (2 * (p[:, c] * onehot[:, c]).sum() + smooth)
        / (p[:, c].sum() + onehot[:, c].sum() + smooth)
        for c in classes
    ]
    return 1 - np.mean(dice)


def test_dice_loss_matches_hand_computation():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 4, 5))
    y = rng.integers(0, 3, size=(2, 4, 5))
    lt, yt = torch.tensor(logits), torch.tensor(y)
    got = DiceLoss(smooth=1e-3)(lt, yt).item()
    assert got == pytest.approx(_dice_by_hand(logits, y, 3, 1e-3, [1, 2]), rel=1e-9)
    got_bg = DiceLoss(smooth=1e-3, include_background=True)(lt, yt).item()
    assert got_bg == pytest.approx(_dice_by_hand(logits, y, 3, 1e-3, [0, 1, 2]), rel=1e-9)
    # ignore_index: ignored voxels count for nothing
    y_ign = y.copy()
    y_ign[:, 0] = 255
    got_ign = DiceLoss(smooth=1e-3, ignore_index=255)(lt, torch.tensor(y_ign)).item()
    valid = (y_ign != 255).astype(float)
    expected = _dice_by_hand(logits, np.where(y_ign == 255, 0, y_ign), 3, 1e-3, [1, 2], valid)
    assert got_ign == pytest.approx(expected, rel=1e-9)


def test_perfect_prediction_and_gradients():
    y = torch.tensor([[[0, 1, 2], [2, 2, 1]]])
    logits = 30.0 * torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).double()
    assert DiceLoss()(logits, y).item() == pytest.approx(0.0, abs=1e-9)
    assert DiceCELoss()(logits, y).item() == pytest.approx(0.0, abs=1e-9)
    wrong = 30.0 * torch.nn.functional.one_hot((y + 1) % 3, 3).permute(0, 3, 1, 2).double()
    assert DiceLoss()(wrong, y).item() == pytest.approx(1.0, abs=1e-5)
    z = torch.zeros(1, 3, 2, 3, dtype=torch.double, requires_grad=True)
    DiceLoss()(z, y).backward()
    assert z.grad.abs().sum() > 0


def test_cross_entropy_and_sum():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 3, 4))
    y = rng.integers(0, 3, size=(2, 3, 4))
    p = _softmax(logits)
    nll = -np.log(np.take_along_axis(p, y[:, None], axis=1)).mean()
    lt, yt = torch.tensor(logits), torch.tensor(y)
    assert CrossEntropyLoss()(lt, yt).item() == pytest.approx(nll, rel=1e-9)
    y_ign = y.copy()
    y_ign[0] = 7
    keep = y_ign != 7
    nll_ign = -np.log(np.take_along_axis(p, y[:, None], axis=1)[:, 0][keep]).mean()
    got = CrossEntropyLoss(ignore_index=7)(lt, torch.tensor(y_ign)).item()
    assert got == pytest.approx(nll_ign, rel=1e-9)
    combo = DiceCELoss(dice_weight=0.5, ce_weight=2.0)(lt, yt).item()
    expected = 0.5 * _dice_by_hand(logits, y, 3, 1e-5, [1, 2]) + 2.0 * nll
    assert combo == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="target must have shape"):
        DiceLoss()(lt, yt[:, :2])
    with pytest.raises(TypeError, match="integer"):
        CrossEntropyLoss()(lt, yt.double())


# ---------------------------------------------------------------- training loop
def _disks(n, size=16, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    X = rng.normal(0, 0.3, size=(n, 1, size, size)).astype(np.float32)
    y = np.zeros((n, size, size), dtype=np.int64)
    for i in range(n):
        cy, cx = rng.integers(5, size - 5, 2)
        r = rng.uniform(3, 5)
        d = np.hypot(yy - cy, xx - cx)
        y[i][d < r] = 1
        y[i][d < r / 2] = 2
    X[:, 0] += y
    return X, y


def test_fit_decreases_loss_is_reproducible_and_restores_best():
    X, y = _disks(16)
    Xv, yv = _disks(6, seed=1)

    def run():
        torch.manual_seed(3)
        net = UNet(1, 3, width=4, depth=2, dropout=0.1)
        hist = fit_segmenter(
            net,
            X,
            y,
            Xv,
            yv,
            loss="dice_ce",
            epochs=3,
            batch_size=4,
            lr=1e-2,
            progress=False,
            device="cpu",
        )
        return net, hist

    net, hist = run()
    assert hist["epochs_run"] == 3 and len(hist["loss"]) == 3
    assert hist["loss"][-1] < hist["loss"][0]
    _, hist2 = run()
    assert hist2["loss"] == hist["loss"] and hist2["val_dice"] == hist["val_dice"]
    # the returned weights are those of the best validation epoch
    pred = predict_logits(net, Xv, batch_size=4, device="cpu").argmax(1)
    dice = []
    for i in range(len(yv)):
        for k in (1, 2):
            p, t = pred[i] == k, yv[i] == k
            dice.append(2 * (p & t).sum() / (p.sum() + t.sum()) if p.sum() + t.sum() else 1.0)
    assert np.mean(dice) == pytest.approx(hist["best_val_dice"], abs=1e-9)
    assert hist["best_val_dice"] == max(hist["val_dice"])


def test_fit_rejects_bad_inputs():
    X, y = _disks(4)
    net = UNet(1, 3, width=4, depth=3)
    with pytest.raises(ValueError, match="y must have shape"):
        fit_segmenter(net, X, y[:, :8], epochs=1, progress=False)
    with pytest.raises(TypeError, match="integer"):
        fit_segmenter(net, X, y.astype(float), epochs=1, progress=False)
    with pytest.raises(ValueError, match="spatial_divisor"):
        fit_segmenter(net, X[..., :15, :15], y[..., :15, :15], epochs=1, progress=False)
    with pytest.raises(ValueError, match="loss"):
        fit_segmenter(net, X, y, loss="focal", epochs=1, progress=False)
    with pytest.raises(ValueError, match="together"):
        fit_segmenter(net, X, y, X_val=X, epochs=1, progress=False)


# ---------------------------------------------------------------- export
@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def exported(request, tmp_path_factory):
    dims = request.param
    net = _net(dims=dims)
    path = tmp_path_factory.mktemp("export") / f"net{dims}.onnx"
    x = torch.randn(2, 1, *([8] * dims))
    report = export_onnx(
        net,
        path,
        x,
        feature_layers=["decoder_last", "bottleneck"],
        mc_dropout=True,
        info={"loss": "dice", "seed": 0},
    )
    return net, path, report, dims


def _session(model):
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])


def test_export_round_trip(exported):
    net, path, report, dims = exported
    assert report["max_abs_diff"] < 1e-4 and report["dynamic_spatial"]
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [i.name for i in model.graph.input] == ["image", "mc_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["uqseg.n_classes"] == "3"
    assert json.loads(meta["uqseg.feature_layers"]) == ["decoder_last", "bottleneck"]
    assert meta["uqseg.spatial_divisor"] == "4"
    assert json.loads(meta["uqseg.mc_dropout"]) == {
        "input": "mc_mask",
        "p": 0.25,
        "size": net.mc_size,
    }
    assert json.loads(meta["uqseg.info"]) == {"loss": "dice", "seed": 0}
    sess = _session(path)
    # dynamic batch (1 and 3) and a spatial size other than the example's
    for n, size in [(1, 8), (3, 8), (2, 12)]:
        x = torch.randn(n, 1, *([size] * dims))
        mask = net.sample_mc_mask(n, generator=torch.Generator().manual_seed(n))
        for m in (torch.ones(n, net.mc_size), mask):
            out = sess.run(["logits"], {"image": x.numpy(), "mc_mask": m.numpy()})[0]
            with torch.no_grad():
                ref = net(x, m).numpy()
            np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)


def test_export_feature_tensors_are_named_intermediates(exported):
    net, path, _, dims = exported
    model = onnx.load(str(path))
    produced = {o for node in model.graph.node for o in node.output}
    assert {"decoder_last", "bottleneck"} <= produced
    # exposing them as outputs gives torch's features
    inferred = onnx.shape_inference.infer_shapes(model)
    by_name = {v.name: v for v in inferred.graph.value_info}
    for name in ("decoder_last", "bottleneck"):
        model.graph.output.append(by_name[name])
    x = torch.randn(2, 1, *([8] * dims))
    ones = torch.ones(2, net.mc_size)
    outs = _session(model).run(
        ["decoder_last", "bottleneck"], {"image": x.numpy(), "mc_mask": ones.numpy()}
    )
    with torch.no_grad():
        _, feats = net.forward_features(x)
    np.testing.assert_allclose(outs[0], feats["decoder_last"].numpy(), atol=1e-4)
    np.testing.assert_allclose(outs[1], feats["bottleneck"].numpy(), atol=1e-4)


def test_export_without_mask_and_refuses_mismatch(tmp_path, monkeypatch):
    net = _net(dims=2, dropout=0.2, seed=1)
    net.mc_dropout = True  # must not leak random sampling into a plain export
    x = torch.randn(2, 1, 8, 8)
    report = export_onnx(net, tmp_path / "plain.onnx", x.numpy(), opset=18)
    assert report["inputs"] == ["image"] and report["mc_size"] == 0
    assert net.mc_dropout is True and not net.training
    net.mc_dropout = False
    model = onnx.load(str(tmp_path / "plain.onnx"))
    meta = {p.key: p.value for p in model.metadata_props}
    assert "uqseg.mc_dropout" not in meta and json.loads(meta["uqseg.feature_layers"]) == []
    out = _session(model).run(None, {"image": np.ones((3, 1, 8, 8), np.float32)})[0]
    with torch.no_grad():
        np.testing.assert_allclose(out, net(torch.ones(3, 1, 8, 8)).numpy(), atol=1e-4)

    real = export_mod._ort_outputs
    monkeypatch.setattr(
        export_mod, "_ort_outputs", lambda proto, feeds: [o + 0.01 for o in real(proto, feeds)]
    )
    with pytest.raises(ValueError, match="max abs diff 0.01"):
        export_onnx(net, tmp_path / "bad.onnx", x)
    assert not (tmp_path / "bad.onnx").exists()


def test_export_rejects_bad_arguments(tmp_path):
    net = _net(dims=2, dropout=0.0)
    with pytest.raises(ValueError, match="mc_dropout"):
        export_onnx(net, tmp_path / "a.onnx", torch.zeros(1, 1, 8, 8), mc_dropout=True)
    with pytest.raises(ValueError, match="multiple"):
        export_onnx(net, tmp_path / "a.onnx", torch.zeros(1, 1, 10, 8))
    with pytest.raises(ValueError, match="not produced"):
        export_onnx(net, tmp_path / "a.onnx", torch.zeros(1, 1, 8, 8), feature_layers=["x"])
    with pytest.raises(ValueError, match="example"):
        export_onnx(net, tmp_path / "a.onnx", torch.zeros(8, 8))
    with pytest.raises(TypeError, match="Module"):
        export_onnx("net", tmp_path / "a.onnx", torch.zeros(1, 1, 8, 8))


def test_export_writes_the_preprocessing_description(tmp_path):
    from uqseg.preprocessing import Preprocessing, read_preprocessing

    net = _net(dims=2, dropout=0.0)
    prep = {"orientation": "RAS", "plane": "axial", "size": [8, 8],
            "intensity": {"method": "percentile"}}
    export_onnx(net, tmp_path / "p.onnx", torch.zeros(1, 1, 8, 8), preprocessing=prep)
    assert read_preprocessing(tmp_path / "p.onnx") == Preprocessing.from_dict(prep)
    with pytest.raises(ValueError, match="2-D network"):  # a 2-D network needs a plane
        export_onnx(net, tmp_path / "q.onnx", torch.zeros(1, 1, 8, 8),
                    preprocessing={"orientation": "RAS"})
    with pytest.raises(ValueError, match="unknown preprocessing key"):
        export_onnx(net, tmp_path / "q.onnx", torch.zeros(1, 1, 8, 8),
                    preprocessing={"orient": "RAS"})
    assert not (tmp_path / "q.onnx").exists()
