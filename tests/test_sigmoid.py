"""Sigmoid (binary and multi-label) and probability outputs: OnnxSegmenter and EnsembleSegmenter
against scipy references computed from the raw network outputs."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper
from onnx_models import make_unet_like
from scipy.special import expit, softmax
from scipy.stats import entropy as sp_entropy

import uqseg
from uqseg import EnsembleSegmenter, OnnxSegmenter
from uqseg.backends._checks import ModelOutputError


def with_head(model: onnx.ModelProto, op: str | None, *, axis: int | None = None,
              meta: dict | None = None) -> onnx.ModelProto:
    """The same network with its logits renamed ``pre`` and an ``op`` node on top (output
    ``probs``), as exporters write ``torch.sigmoid``/``softmax`` at the end of a model."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    if op is not None:
        for node in m.graph.node:
            node.output[:] = ["pre" if o == "logits" else o for o in node.output]
        kw = {} if axis is None else {"axis": axis}
        m.graph.node.append(helper.make_node(op, ["pre"], ["probs"], **kw))
        m.graph.output[0].name = "probs"
    if meta:
        props = {p.key: p.value for p in m.metadata_props}
        props.update(meta)
        del m.metadata_props[:]
        helper.set_model_props(m, props)
    onnx.checker.check_model(m)
    return m


def raw(model_path, X, name="logits"):
    """The network's own tensor, by a plain ONNX Runtime session."""
    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    return sess.run([name], {"image": X})[0]


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    d = tmp_path_factory.mktemp("sigmoid")
    paths = {}

    def save(name, model):
        paths[name] = str(d / f"{name}.onnx")
        onnx.save(model, paths[name])

    for i in range(3):
        save(f"bin{i}", make_unet_like(n_classes=1, seed=10 + i))
        base = make_unet_like(n_classes=3, seed=20 + i)
        save(f"ml{i}", base)
        save(f"ml_sig{i}", with_head(base, "Sigmoid"))
    base3 = make_unet_like(n_classes=3, seed=20)
    save("softmax_node", with_head(base3, "Softmax", axis=1))
    save("ml_meta", with_head(base3, None, meta={"uqseg.activation": "sigmoid"}))
    save("bad_meta", with_head(base3, None, meta={"uqseg.activation": "tanh"}))
    save("probs_meta", with_head(base3, "Softmax", axis=1, meta={"uqseg.activation": "none"}))
    return paths


@pytest.fixture(scope="module")
def X():
    return np.random.default_rng(0).standard_normal((4, 1, 12, 10)).astype(np.float32)


def test_one_channel_means_binary_sigmoid(nets, X):
    seg = OnnxSegmenter(nets["bin0"]).fit()
    assert seg.activation_ == "sigmoid" and seg.n_classes_ == 1
    z = raw(nets["bin0"], X)
    np.testing.assert_allclose(seg.predict_proba(X), expit(z), rtol=1e-5, atol=1e-7)
    labels = seg.predict(X)
    assert labels.dtype == bool and labels.shape == (4, 1, 12, 10)
    np.testing.assert_array_equal(labels, expit(z) >= 0.5)
    with pytest.raises(ValueError, match="softmax needs at least 2 classes.*activation='sigmoid'"):
        OnnxSegmenter(nets["bin0"], activation="softmax").fit()


@pytest.mark.parametrize("name", ["ml_sig0", "ml_meta"])
def test_multilabel_sigmoid_from_the_graph_or_metadata(nets, X, name):
    seg = OnnxSegmenter(nets[name]).fit()
    assert seg.activation_ == "sigmoid"
    z = raw(nets["ml0"], X)  # the same weights without the head
    np.testing.assert_allclose(seg.transform(X), z, rtol=1e-5, atol=1e-5)  # true logits
    p = seg.predict_proba(X)
    np.testing.assert_allclose(p, expit(z), rtol=1e-5, atol=1e-6)
    assert not np.allclose(p.sum(axis=1), 1)  # independent channels
    np.testing.assert_array_equal(seg.predict(X), z >= 0)
    if name == "ml_sig0":
        assert seg.output_name_ == "pre"
        np.testing.assert_allclose(p, raw(nets[name], X, "probs"), atol=1e-6)


def test_softmax_node_gives_its_logits_and_none_reads_probabilities(nets, X):
    seg = OnnxSegmenter(nets["softmax_node"]).fit()
    assert seg.activation_ == "softmax" and seg.output_name_ == "pre"
    z = raw(nets["ml0"], X)
    np.testing.assert_allclose(seg.transform(X), z, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(seg.predict_proba(X), softmax(z, axis=1), atol=1e-6)
    probs = OnnxSegmenter(nets["probs_meta"]).fit()  # metadata: the output is probabilities
    assert probs.activation_ == "none" and probs.output_name_ == "probs"
    np.testing.assert_allclose(probs.predict_proba(X), softmax(z, axis=1), atol=1e-6)
    np.testing.assert_array_equal(probs.predict(X), z.argmax(axis=1))
    with pytest.raises(ModelOutputError, match="outside \\[0, 1\\].*not probabilities"):
        OnnxSegmenter(nets["ml0"], activation="none").fit().predict_proba(X)


def test_bad_activation_values(nets):
    with pytest.raises(ValueError, match="'uqseg.activation' must be one of"):
        OnnxSegmenter(nets["bad_meta"]).fit()
    with pytest.raises(ValueError, match="activation must be one of"):
        OnnxSegmenter(nets["ml0"], activation="relu").fit()


def _bern_h(p):
    return sp_entropy(np.stack([p, 1 - p]), axis=0)


@pytest.mark.parametrize("fuse", [False, "auto"])
def test_sigmoid_ensemble_against_scipy(nets, X, fuse):
    names = ["ml0", "ml1", "ml2"]
    ens = EnsembleSegmenter([nets[n] for n in names], fuse=fuse).fit()
    # three-channel logits without metadata: softmax unless told
    assert ens.activation_ == "softmax"
    ens = EnsembleSegmenter([nets[n.replace("ml", "ml_sig")] for n in names], fuse=fuse).fit()
    assert ens.activation_ == "sigmoid" and ens.fused_ is False  # inner logits: not fused
    P = np.stack([expit(raw(nets[n], X).astype(np.float64)) for n in names])
    mean = P.mean(axis=0)
    proba, maps = ens.predict_with_uncertainty(
        X, kinds=("entropy", "expected_entropy", "mutual_information", "variance"))
    np.testing.assert_allclose(proba, mean, atol=1e-6)
    np.testing.assert_allclose(maps["entropy"], _bern_h(mean), atol=1e-5)
    eh = np.mean([_bern_h(p) for p in P], axis=0)
    np.testing.assert_allclose(maps["expected_entropy"], eh, atol=1e-5)
    np.testing.assert_allclose(maps["mutual_information"], np.maximum(_bern_h(mean) - eh, 0),
                               atol=1e-5)
    assert maps["mutual_information"].shape == (4, 3, 12, 10)
    assert np.all(maps["mutual_information"] <= maps["entropy"] + 1e-6)
    np.testing.assert_allclose(maps["variance"], P.var(axis=0), atol=1e-6)
    np.testing.assert_array_equal(ens.predict(X), mean >= 0.5)
    np.testing.assert_allclose(ens.transform(X), np.log(mean) - np.log1p(-mean), atol=1e-4)
    np.testing.assert_allclose(ens.predict_members(X), P, atol=1e-6)


def test_binary_logit_members_fuse(nets, X):
    members = [nets[f"bin{i}"] for i in range(3)]
    fused = EnsembleSegmenter(members, fuse=True).fit()
    sep = EnsembleSegmenter(members, fuse=False).fit()
    assert fused.fused_ and fused.activation_ == "sigmoid"
    a, ma = fused.predict_with_uncertainty(X)
    b, mb = sep.predict_with_uncertainty(X)
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(ma["mutual_information"], mb["mutual_information"], atol=1e-6)
    P = np.stack([expit(raw(m, X).astype(np.float64)) for m in members])
    np.testing.assert_allclose(a, P.mean(0), atol=1e-6)
    with pytest.raises(ValueError, match="cannot be fused.*its own activation"):
        EnsembleSegmenter([nets[f"ml_sig{i}"] for i in range(2)], fuse=True).fit()


def test_members_must_agree_on_activation(nets):
    with pytest.raises(ValueError, match="activation 'sigmoid'.*activation 'softmax'"):
        EnsembleSegmenter([nets["ml0"], nets["ml_sig1"]]).fit()


def test_activation_persists(nets, X, tmp_path):
    seg = OnnxSegmenter(nets["ml0"], activation="sigmoid").fit()
    uqseg.save(seg, tmp_path / "seg")
    back = uqseg.load(tmp_path / "seg")
    assert back.activation == "sigmoid" and back.activation_ == "sigmoid"
    np.testing.assert_allclose(back.predict_proba(X), seg.predict_proba(X))
    manifest = json.loads((tmp_path / "seg" / "manifest.json").read_text())
    text = json.dumps(manifest).replace('"sigmoid"', '"relu"')
    (tmp_path / "seg" / "manifest.json").write_text(text)
    with pytest.raises((ValueError, TypeError), match="activation"):
        uqseg.load(tmp_path / "seg")


def test_estimators_around_sigmoid_networks(nets, X):
    from uqseg import (
        ConformalRiskController,
        QualityRegressor,
        SpectralOODDetector,
    )

    seg = OnnxSegmenter(nets["ml_sig0"]).fit()
    rng = np.random.default_rng(1)
    Xf = rng.standard_normal((16, 1, 12, 10)).astype(np.float32)
    det = SpectralOODDetector(seg).fit(Xf)  # features: any output kind
    out = uqseg.assess(X, seg, ood=det)
    np.testing.assert_allclose(out["ood_score"], det.score_samples(X), atol=1e-5)
    np.testing.assert_allclose(out["entropy"], _bern_h(expit(raw(nets["ml0"], X))), atol=1e-5)
    y = rng.random((16, 3, 12, 10)) < 0.4  # indicator targets
    crc = ConformalRiskController(seg, alpha=0.3).fit(Xf, y)
    assert crc.target_kind_ == "indicator" and crc.predict(X).shape == (4, 3, 12, 10)
    with pytest.raises(ValueError, match="independent sigmoid channels: y must be indicator"):
        ConformalRiskController(seg, alpha=0.3).fit(Xf, y.argmax(axis=1))
    soft = OnnxSegmenter(nets["ml0"]).fit()
    with pytest.raises(ValueError, match="exclusive classes: y must be class labels"):
        ConformalRiskController(soft, alpha=0.3).fit(Xf, y)
    assert QualityRegressor(seg).fit(Xf, y).predict(X).shape == (4, 3)  # Dice per channel


@pytest.mark.parametrize("score", ["entropy", "max_softmax", "mutual_information"])
@pytest.mark.parametrize("region", ["image", "foreground"])
def test_uncertainty_detector_on_sigmoid_outputs(nets, X, score, region):
    from uqseg import UncertaintyOODDetector

    members = [nets[f"ml_sig{i}"] for i in range(3)]
    ens = EnsembleSegmenter(members).fit()
    rng = np.random.default_rng(2)
    Xf = rng.standard_normal((12, 1, 12, 10)).astype(np.float32)
    det = UncertaintyOODDetector(ens, score=score, region=region).fit(Xf)
    # independent reference: per channel binary maps from the members' own logits (scipy)
    P = np.stack([expit(raw(nets[f"ml{i}"], X).astype(np.float64)) for i in range(3)])
    mean = P.mean(axis=0)
    h = _bern_h(mean)
    u = {"entropy": h, "max_softmax": 1 - np.maximum(mean, 1 - mean),
         "mutual_information": np.maximum(h - np.mean([_bern_h(p) for p in P], axis=0), 0)}
    u = u[score].mean(axis=1)  # (N, H, W): mean over the three labels
    if region == "image":
        want = u.mean(axis=(1, 2))
    else:
        fg = (mean >= 0.5).any(axis=1)
        want = np.array([u[i][fg[i]].mean() if fg[i].any() else u[i].mean()
                         for i in range(len(X))])
    np.testing.assert_allclose(det.score_samples(X), -want, atol=1e-5)
    out = uqseg.assess(X, ens, ood=det)  # one shared pass, same scores
    assert out["passes"] == 1
    np.testing.assert_allclose(out["ood_score"], -want, atol=1e-5)


def test_multilabel_report_against_brute_force():
    from uqseg.metrics import multilabel_report

    rng = np.random.default_rng(5)
    p = rng.random((6, 3, 8, 8))
    t = rng.random((6, 3, 8, 8)) < p  # roughly calibrated
    r = multilabel_report(p, t, n_bins=10, names=["a", "b", "c"])

    def ece(q, y):  # binary top-label ECE, (lo, hi] bins, from the definition
        conf = np.maximum(q, 1 - q).ravel()
        correct = ((q >= 0.5) == y).ravel()
        correct = np.where(q.ravel() == 0.5, ~y.ravel(), correct)  # argmax tie -> class 0
        total = 0.0
        for b in range(10):
            sel = (conf > b / 10) & (conf <= (b + 1) / 10)
            if sel.any():
                total += sel.sum() * abs(correct[sel].mean() - conf[sel].mean())
        return total / conf.size

    for i, name in enumerate("abc"):
        q, y = p[:, i], t[:, i]
        assert r[name]["ece"] == pytest.approx(ece(q, y), abs=1e-9)
        assert r[name]["brier"] == pytest.approx(np.mean((q - y) ** 2), rel=1e-9)
        nll = -np.mean(np.log(np.clip(np.where(y, q, 1 - q), 1e-7, 1)))
        assert r[name]["nll"] == pytest.approx(nll, rel=1e-6)
        m = q >= 0.5
        assert r[name]["dice"] == pytest.approx(2 * (m & y).sum() / (m.sum() + y.sum()))
    pooled_nll = -np.mean(np.log(np.clip(np.where(t, p, 1 - p), 1e-7, 1)))
    assert r["pooled"]["nll"] == pytest.approx(pooled_nll, rel=1e-6)
    assert r["pooled"]["brier"] == pytest.approx(np.mean((p - t) ** 2), rel=1e-9)
    with pytest.raises(ValueError, match="class labels \\(N, \\*spatial\\) belong to softmax"):
        multilabel_report(p, t[:, 0].astype(int))
    with pytest.raises(ValueError, match="boolean or 0/1"):
        multilabel_report(p, t.astype(int) * 2)
    one = multilabel_report(p[:, :1], t[:, 0])  # binary target for one channel
    assert one["channel 0"]["dice"] == pytest.approx(r["a"]["dice"])


@pytest.mark.parametrize("fuse", [False, "auto"])
def test_ensemble_activation_reaches_path_members(nets, X, fuse, tmp_path):
    names = ["ml0", "ml1", "ml2"]
    ens = EnsembleSegmenter([nets[n] for n in names], fuse=fuse, activation="sigmoid").fit()
    assert ens.activation_ == "sigmoid"
    assert all(m.activation == "sigmoid" for m in ens.members_)
    P = np.stack([expit(raw(nets[n], X).astype(np.float64)) for n in names])
    proba, maps = ens.predict_with_uncertainty(X)
    np.testing.assert_allclose(proba, P.mean(axis=0), atol=1e-6)
    eh = np.mean([_bern_h(p) for p in P], axis=0)
    np.testing.assert_allclose(maps["mutual_information"],
                               np.maximum(_bern_h(P.mean(axis=0)) - eh, 0), atol=1e-5)
    # a member given as a segmenter keeps its own activation: here they disagree
    with pytest.raises(ValueError, match="activation 'softmax'.*activation 'sigmoid'"):
        EnsembleSegmenter([nets["ml0"], OnnxSegmenter(nets["ml1"])], activation="sigmoid").fit()
    with pytest.raises(ValueError, match="activation must be one of"):
        EnsembleSegmenter([nets["ml0"]], activation="tanh").fit()
    uqseg.save(ens, tmp_path / "ens")
    back = uqseg.load(tmp_path / "ens")
    assert back.activation == "sigmoid"
    np.testing.assert_allclose(back.predict_proba(X), proba, atol=1e-6)
