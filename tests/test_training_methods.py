"""Tests of the training-side methods: VLS (CALSeg), hierarchical U-Net, multi-task training."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from torch.nn import functional as F  # noqa: E402

from uqseg.training import fit_segmenter  # noqa: E402
from uqseg.training.hierarchical import (  # noqa: E402
    HierarchicalLoss,
    HierarchicalUNet,
    export_hierarchical_onnx,
    kl_standard_normal,
    sample_onnx,
    sample_torch,
)
from uqseg.training.multitask import (  # noqa: E402
    dataset_probabilities,
    fit_multitask,
    restrict_to_task,
    sample_probabilities,
)
from uqseg.training.networks import UNet  # noqa: E402
from uqseg.training.vls import (  # noqa: E402
    VariationalLabelSmoothing,
    fit_soft_targets,
    fit_vls,
    kl_divergence_standard_normal,
    smooth_labels,
    soft_target_cross_entropy,
    vls_soft_labels,
)

pytestmark = pytest.mark.torch
torch.set_num_threads(1)


def _blobs(n=8, size=16, seed=0):
    """Smooth random images; label 1 where bright, 2 where very bright."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, 1, size, size)).astype(np.float32)
    for _ in range(3):  # cheap smoothing: blobs a few pixels wide
        X = (X + np.roll(X, 1, 2) + np.roll(X, 1, 3) + np.roll(X, -1, 2) + np.roll(X, -1, 3)) / 2
    X = (X - X.mean()) / X.std()
    y = (X[:, 0] > 0.3).astype(np.int64) + (X[:, 0] > 1.2)
    return X, y


# ---------------------------------------------------------------------- VLS
def test_vls_kl_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    mu, logvar = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    q = torch.distributions.Normal(mu, torch.exp(0.5 * logvar))
    p = torch.distributions.Normal(torch.zeros(3), torch.ones(3))
    ref = torch.distributions.kl_divergence(q, p).sum(-1)
    torch.testing.assert_close(kl_divergence_standard_normal(mu, logvar), ref)
    assert torch.allclose(
        kl_divergence_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3)), torch.zeros(2)
    )
    torch.testing.assert_close(kl_standard_normal(mu, logvar).sum(-1), ref)


def test_vls_loss_parts_and_soft_labels():
    X, y = _blobs(4)
    torch.manual_seed(0)
    vls = VariationalLabelSmoothing(1, 3, width=4, depth=2)
    xt, yt = torch.from_numpy(X), torch.from_numpy(y)
    parts = vls.loss(xt, yt, torch.Generator().manual_seed(1))
    total = parts["ce"] + parts["mse"] + parts["kl"]
    torch.testing.assert_close(parts["total"], total)
    assert float(parts["kl"].detach()) >= 0
    soft = vls.soft_labels(xt, yt, m=3, tau=2.0, alpha=0.4)
    assert soft.shape == (4, 3, 16, 16)
    torch.testing.assert_close(soft.sum(1), torch.ones(4, 16, 16))
    assert float(soft.min()) >= 0
    hard = vls.soft_labels(xt, yt, m=2, tau=0.5, alpha=0.0)
    torch.testing.assert_close(hard, F.one_hot(yt, 3).permute(0, 3, 1, 2).float())
    # the hard-label share stays: the labelled class keeps at least 1 - alpha
    picked = soft.gather(1, yt[:, None])
    assert float(picked.min()) >= 0.6 - 1e-6


def test_soft_target_ce_equals_ce_for_one_hot():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, 5, generator=g)
    y = torch.randint(0, 3, (2, 5, 5), generator=g)
    target = torch.from_numpy(smooth_labels(y.numpy(), 3, 0.0))
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, target), F.cross_entropy(logits, y)
    )
    eps = 0.2
    ls = torch.from_numpy(smooth_labels(y.numpy(), 3, eps))
    torch.testing.assert_close(
        soft_target_cross_entropy(logits, ls), F.cross_entropy(logits, y, label_smoothing=eps)
    )
    with pytest.raises(ValueError, match="target must have"):
        soft_target_cross_entropy(logits, target[:, :2])


def test_vls_two_epoch_runs_decrease_loss():
    X, y = _blobs(16)
    torch.manual_seed(0)
    vls = VariationalLabelSmoothing(1, 3, width=4, depth=2)
    h = fit_vls(vls, X, y, epochs=2, batch_size=4, lr=1e-2, augment=False)
    assert h["loss"][1] < h["loss"][0]
    soft = vls_soft_labels(vls, X, y, m=2, tau=1.5, alpha=0.3)
    np.testing.assert_allclose(soft.sum(1), 1.0, atol=1e-5)
    torch.manual_seed(0)
    net = UNet(1, 3, width=4, depth=2)
    h2 = fit_soft_targets(net, X, soft, X, y, epochs=2, batch_size=4, lr=1e-2, augment=False)
    assert h2["loss"][1] < h2["loss"][0]
    # the best epoch is the first one with the highest validation Dice, whatever it is
    assert len(h2["val_dice"]) == 2
    assert h2["best_epoch"] == int(np.argmax(h2["val_dice"]))
    assert h2["best_val_dice"] == max(h2["val_dice"])


# ---------------------------------------------------------------------- hierarchical
def _hier(seed=0, **kw):
    torch.manual_seed(seed)
    net = HierarchicalUNet(1, 3, width=4, depth=3, **kw)
    with torch.no_grad():  # non-trivial BatchNorm statistics and skip heads
        net.train()
        net(torch.randn(4, 1, 16, 16))
        for head in net.skip_heads:
            head.weight.add_(0.1 * torch.randn_like(head.weight))
            head.bias.add_(0.5 * torch.randn_like(head.bias))
    return net.eval()


def test_hierarchical_shapes_and_noise_determinism():
    net = _hier()
    x = torch.randn(2, 1, 16, 32)
    assert net.noise_shapes((16, 32)) == [(4, 16, 32), (8, 8, 16)]
    n1 = net.sample_noise(2, (16, 32), torch.Generator().manual_seed(1))
    n2 = net.sample_noise(2, (16, 32), torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = net(x, n1), net(x, [t.clone() for t in n1])
        c = net(x, n2)
        mean = net(x)
        zero = net(x, [torch.zeros_like(t) for t in n1])
    assert a.shape == (2, 3, 16, 32)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert float((a - c).abs().max()) > 1e-4
    torch.testing.assert_close(mean, zero)  # eval without noise = mean skip features
    assert float(net.kl) > 0
    with pytest.raises(ValueError, match="multiples"):
        net.noise_shapes((15, 32))
    with pytest.raises(ValueError, match="one per level"):
        net(x, n1[:1])
    samples = sample_torch(net, x.numpy(), n_samples=3, seed=0, batch_size=1)
    again = sample_torch(net, x.numpy(), n_samples=3, seed=0, batch_size=2)
    np.testing.assert_array_equal(samples, again)  # noise independent of batching
    assert samples.shape == (3, 2, 3, 16, 32)


def test_three_d_forward_shapes():
    torch.manual_seed(0)
    net = HierarchicalUNet(1, 2, dims=3, width=2, depth=2).eval()
    x = torch.randn(1, 1, 8, 8, 4)
    noise = net.sample_noise(1, (8, 8, 4), torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in noise] == [(1, 2, 8, 8, 4)]
    assert net(x, noise).shape == (1, 2, 8, 8, 4)
    vls = VariationalLabelSmoothing(1, 2, dims=3, width=2, depth=2)
    y = torch.randint(0, 2, (1, 8, 8, 4))
    assert vls.soft_labels(x, y, m=2).shape == (1, 2, 8, 8, 4)


def test_hierarchical_onnx_matches_torch(tmp_path):
    import onnxruntime as ort

    net = _hier()
    rep = export_hierarchical_onnx(net, tmp_path / "h.onnx", torch.randn(1, 1, 16, 16))
    assert rep["inputs"] == ["image", "noise_1", "noise_2"]
    # another batch and spatial size than the example: axes are dynamic
    x = torch.randn(3, 1, 24, 32)
    noise = net.sample_noise(3, (24, 32), torch.Generator().manual_seed(5))
    sess = ort.InferenceSession(str(tmp_path / "h.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"image": x.numpy(), "noise_1": noise[0].numpy(), "noise_2": noise[1].numpy()}
    out = sess.run(["logits"], feeds)[0]
    with torch.no_grad():
        ref = net(x, noise).numpy()
    np.testing.assert_allclose(out, ref, atol=1e-4, rtol=0)
    agg = sample_onnx(rep["path"], x.numpy(), n_samples=4, seed=3, batch_size=2, device="cpu")
    ref_s = sample_torch(net, x.numpy(), n_samples=4, seed=3)
    np.testing.assert_allclose(agg["proba"], ref_s.mean(0), atol=1e-4)
    # MI against a numpy reference from the torch samples: H(mean) - mean of H(sample)
    def h(p):
        return -(p * np.log(np.clip(p, 1e-12, None))).sum(axis=-3)

    mi_ref = h(ref_s.mean(0)) - h(ref_s).mean(0)
    assert agg["mutual_information"].shape == mi_ref.shape == (3, 24, 32)
    # the untrained network's samples disagree only a little (MI ~1e-5): compare tightly
    assert float(mi_ref.max()) > 5e-6
    np.testing.assert_allclose(agg["mutual_information"], mi_ref, atol=1e-6)


def test_hierarchical_mean_model_runs_in_onnx_segmenter(tmp_path):
    from uqseg import OnnxSegmenter
    from uqseg.training import export_onnx

    net = _hier()
    export_onnx(
        net, tmp_path / "m.onnx", torch.randn(2, 1, 16, 16), feature_layers=["decoder_last"]
    )
    seg = OnnxSegmenter(str(tmp_path / "m.onnx"), backend="onnxruntime", device="cpu").fit()
    X = np.random.default_rng(0).standard_normal((2, 1, 24, 16)).astype(np.float32)
    with torch.no_grad():
        ref = torch.softmax(net(torch.from_numpy(X)), 1).numpy()  # zero noise = mean model
    np.testing.assert_allclose(seg.predict_proba(X), ref, atol=1e-5)
    assert seg.feature_layers_[0] == "decoder_last"


def test_hierarchical_two_epoch_run_decreases_loss():
    X, y = _blobs(16)
    torch.manual_seed(0)
    net = HierarchicalUNet(1, 3, width=4, depth=2)
    h = fit_segmenter(
        net,
        X,
        y,
        loss=HierarchicalLoss(net, "dice_ce", 1e-3),
        epochs=2,
        batch_size=4,
        lr=1e-2,
        augment=False,
        progress=False,
        device="cpu",
    )
    assert h["loss"][1] < h["loss"][0]


# ---------------------------------------------------------------------- multi-task
def test_multitask_sampling_probabilities():
    sizes = [100, 25, 4]
    p = sample_probabilities(sizes)
    k = len(sizes)
    ref = np.concatenate([np.full(n, 1 / (k * np.sqrt(n))) for n in sizes])
    np.testing.assert_allclose(p, ref / ref.sum())
    np.testing.assert_allclose(p.sum(), 1.0)
    np.testing.assert_allclose(dataset_probabilities(sizes), np.sqrt(sizes) / np.sqrt(sizes).sum())
    with pytest.raises(ValueError, match="sizes"):
        sample_probabilities([3, 0])


def test_restrict_to_task():
    g = np.random.default_rng(0)
    p = g.dirichlet(np.ones(4), size=(2, 3)).transpose(0, 2, 1)  # (2, 4, 3)
    r = restrict_to_task(p, [0, 3])
    np.testing.assert_allclose(r.sum(1), 1.0)
    np.testing.assert_allclose(r[:, 1], p[:, 3])


def test_multitask_run_decreases_loss_and_samples_all_tasks():
    a = _blobs(16, seed=0)
    b = _blobs(4, seed=1)
    b = (b[0], np.where(b[1] > 0, 3, 0))  # second task: binary mask with its own class
    torch.manual_seed(0)
    net = UNet(1, 4, width=4, depth=2)
    h = fit_multitask(
        net, [a, b], [a, b], steps=8, batch_size=4, lr=1e-2, eval_every=4, augment=False
    )
    assert len(h["loss"]) == 2 and h["loss"][1] < h["loss"][0]
    assert sum(h["draws"]) == 32 and min(h["draws"]) > 0
    # evaluations at steps 4 and 8; the best step is the first with the highest Dice
    assert len(h["val_dice"]) == 2
    assert h["best_step"] == 4 * (int(np.argmax(h["val_dice"])) + 1)
    assert h["best_val_dice"] == max(h["val_dice"])
